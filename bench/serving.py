"""Serving benchmarks on the default model, CPU:

1. Decode speed and memory: float vs int4 weights (dequantized-weight cache on / off) × fp16 vs int8
   KV cache, greedy, one request: tokens/s, weight bytes, KV-cache bytes.
2. Greedy agreement of the int8 and fp16 KV caches on the test prompts.
3. Server throughput over gRPC on Ray Serve: 16 concurrent clients, max_batch_size 8 vs 1 (ratio).

Usage: python -m bench.serving [--int4 DIR]   (DIR: an int4 checkpoint; default: quantized here first)
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bench.common import free_port, run_cli, write_results
from serving.engine import GenerationEngine, SamplingParams
from serving.kv_cache import cache_nbytes

PROMPT = ("The history of the Royal Navy begins with the ships of the English kings. Over the following "
          "centuries it grew into the largest navy in the world, and its officers") * 4
AGREEMENT_PROMPTS = ["The capital of France is", "Photosynthesis is the process by which",
                     "The French Revolution began in", "A prime number is", "The Pacific Ocean is",
                     "Water boils at", "Shakespeare wrote", "The speed of light is"]


def weight_bytes(model: torch.nn.Module) -> int:
    from quantizer.qlinear import QuantLinear

    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    cached = sum(m._weight.numel() * m._weight.element_size() for m in model.modules()
                 if isinstance(m, QuantLinear) and m._weight is not None)
    return total + cached


def decode_rows(float_dir: Path, int4_dir: Path, tokens: int) -> list[dict]:
    rows = []
    for weights, path, cache_weights in (("float", float_dir, True), ("int4 (dequant cached)", int4_dir, True),
                                         ("int4 (dequant per call)", int4_dir, False)):
        for kv in ("fp16", "int8"):
            engine = GenerationEngine(path, kv_cache_dtype=kv, cache_dequantized_weights=cache_weights)
            request = engine.prepare(PROMPT, [], SamplingParams(max_new_tokens=tokens, temperature=0))
            engine.generate(engine.prepare("warm up", [], SamplingParams(max_new_tokens=2, temperature=0)))
            start = time.perf_counter()
            out = engine.generate(request)
            seconds = time.perf_counter() - start
            rows.append({"weights": weights, "kv_cache": kv, "prompt_tokens": len(request.prompt_ids),
                         "new_tokens": out.completion_tokens, "tokens_per_s": out.completion_tokens / seconds,
                         "weight_mb": weight_bytes(engine.model) / 2**20,
                         "kv_cache_kb": cache_nbytes(engine.last_cache) / 1024})
    return rows


def agreement(model_dir: Path, tokens: int = 24) -> dict:
    engines = {kind: GenerationEngine(model_dir, kv_cache_dtype=kind) for kind in ("fp16", "int8")}
    same_prompts, same_tokens, total_tokens = 0, 0, 0
    for prompt in AGREEMENT_PROMPTS:
        outs = {k: e.generate(e.prepare(prompt, [], SamplingParams(max_new_tokens=tokens, temperature=0))).token_ids
                for k, e in engines.items()}
        same_prompts += outs["fp16"] == outs["int8"]
        prefix = next((i for i, (a, b) in enumerate(zip(outs["fp16"], outs["int8"])) if a != b),
                      min(len(outs["fp16"]), len(outs["int8"])))
        same_tokens += prefix
        total_tokens += len(outs["fp16"])
    return {"prompts": len(AGREEMENT_PROMPTS), "identical_prompts": same_prompts,
            "tokens_before_first_divergence": f"{same_tokens}/{total_tokens}"}


def server_throughput(model_dir: Path, batch_size: int, clients: int = 16, per_client: int = 4,
                      tokens: int = 16) -> dict:
    import ray
    from ray import serve

    from serving.client import GenerationClient
    from serving.config import ServeConfig
    from serving.deployment import start_server

    port = free_port()
    config = ServeConfig(model=str(model_dir), engine="transformers", kv_cache_dtype="int8", max_batch_size=batch_size,
                         batch_wait_timeout_s=0.05, grpc_port=port, http_port=free_port(),
                         autoscaling={"min_replicas": 1, "max_replicas": 1}, ray_actor_options={"num_cpus": 1})
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
    try:
        start_server(config)
        client = GenerationClient(f"127.0.0.1:{port}")
        client.generate("warm up", max_new_tokens=2, temperature=0)

        def worker(i: int) -> int:
            c = GenerationClient(f"127.0.0.1:{port}")
            n = sum(c.generate(AGREEMENT_PROMPTS[(i + j) % 8], max_new_tokens=tokens, temperature=0,
                               stop=["\u2603"]).usage.completion_tokens for j in range(per_client))
            c.close()
            return n

        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            generated = sum(pool.map(worker, range(clients)))
        seconds = time.perf_counter() - start
    finally:
        serve.shutdown()
        ray.shutdown()
    return {"max_batch_size": batch_size, "requests": clients * per_client, "seconds": seconds,
            "requests_per_s": clients * per_client / seconds, "tokens_per_s": generated / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--int4", type=Path, help="an int4 checkpoint of the default model")
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()
    from quantizer.assets import default_model_dir

    float_dir = default_model_dir()
    with tempfile.TemporaryDirectory() as tmp:
        int4 = args.int4
        if int4 is None:
            int4 = Path(tmp) / "int4"
            run_cli("quantize", "--config", "configs/default.yaml", "--out", str(int4), "--num-samples", "64")
        rows = decode_rows(float_dir, int4, args.tokens)
        agree = agreement(float_dir)
        batched = [server_throughput(int4, b) for b in (1, 8)]
    for row in batched:
        row["speedup"] = row["requests_per_s"] / batched[0]["requests_per_s"]
    write_results("serving_decode", rows, ["weights", "kv_cache", "prompt_tokens", "new_tokens", "tokens_per_s",
                                           "weight_mb", "kv_cache_kb"],
                  {"model": "SmolLM2-135M-Instruct", "machine": "2 CPU cores", "decode": "greedy, batch 1",
                   "int8_vs_fp16_kv_greedy_agreement": json.dumps(agree)})
    write_results("serving_batching", batched, ["max_batch_size", "requests", "seconds", "requests_per_s",
                                                "tokens_per_s", "speedup"],
                  {"model": "SmolLM2-135M-Instruct int4 g64, int8 KV", "clients": "16 concurrent gRPC clients",
                   "machine": "2 CPU cores, 1 replica", "new_tokens": "16 per request"})


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
