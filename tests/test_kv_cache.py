"""int8 KV cache: per-vector quantization error, cache bytes vs fp16, greedy agreement on SmolLM2."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from serving.engine import GenerationEngine, SamplingParams
from serving.kv_cache import cache_nbytes, dequantize_per_vector, make_cache, quantize_per_vector

PROMPTS = ["The capital of France is", "Photosynthesis is the process by which", "The French Revolution began in",
           "A prime number is", "The Pacific Ocean is", "Water boils at", "Shakespeare wrote",
           "The speed of light is"]


def test_per_vector_quantization_error_is_small():
    x = torch.randn(2, 3, 50, 64) * torch.linspace(0.1, 10, 50).view(1, 1, 50, 1)
    codes, scale, zero = quantize_per_vector(x)
    assert codes.dtype == torch.uint8 and scale.shape == (2, 3, 50, 1)
    back = dequantize_per_vector(codes, scale, zero, torch.float32)
    step = scale.float()
    assert ((back - x).abs() <= step * 0.51 + 1e-3 * x.abs()).all()  # within half a step (+ fp16 rounding)


def test_int8_cache_holds_at_most_055_of_fp16_bytes():
    caches = {kind: make_cache(kind) for kind in ("int8", "fp16")}
    for _ in range(3):  # prefill, then two decode steps
        k, v = torch.randn(2, 3, 17, 64), torch.randn(2, 3, 17, 64)
        for layer in range(4):
            outs = {kind: c.update(k, v, layer) for kind, c in caches.items()}
    assert torch.allclose(outs["int8"][0], outs["fp16"][0], atol=0.05)
    ratio = cache_nbytes(caches["int8"]) / cache_nbytes(caches["fp16"])
    assert ratio == pytest.approx(68 / 128) and ratio <= 0.55


@pytest.fixture(scope="module")
def engines(default_model):
    return {kind: GenerationEngine(default_model, kv_cache_dtype=kind) for kind in ("int8", "fp16")}


def test_greedy_agreement_with_fp16_cache_on_smollm2(engines):
    """Measured: 8 of 8 prompts identical over 24 greedy tokens (README figure); require 7 of 8."""
    identical = 0
    for prompt in PROMPTS:
        outs = {}
        for kind, engine in engines.items():
            outs[kind] = engine.generate(engine.prepare(prompt, [], SamplingParams(max_new_tokens=24, temperature=0)))
            outs[kind + "_bytes"] = cache_nbytes(engine.last_cache)
        identical += outs["int8"].token_ids == outs["fp16"].token_ids
        if len(outs["int8"].token_ids) == len(outs["fp16"].token_ids):
            assert outs["int8_bytes"] / outs["fp16_bytes"] <= 0.55
    assert identical >= 7


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp16"])
def test_decoding_steps_on_different_threads_match_one_thread(tiny_llama, kv_cache_dtype):
    """The server advances `stream` with asyncio.to_thread, so each step may run on another thread; inference
    mode is thread-local, and a step outside it fails ("Inference tensors cannot be saved for backward")."""
    engine = GenerationEngine(tiny_llama, kv_cache_dtype=kv_cache_dtype)
    requests = [engine.prepare(p, [], SamplingParams(max_new_tokens=12, temperature=0)) for p in PROMPTS[:3]]
    steps = engine.stream(requests)
    tokens: list[list[int]] = [[] for _ in requests]
    while True:
        with ThreadPoolExecutor(1) as pool:  # a new thread for every step
            try:
                step = pool.submit(next, steps).result()
            except StopIteration:
                break
        for i, out in enumerate(step):
            if out is not None:
                tokens[i] += out.token_ids
    assert tokens == [engine.generate(r).token_ids for r in requests]
    assert all(len(t) > 0 for t in tokens)
