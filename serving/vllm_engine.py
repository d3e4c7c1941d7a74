"""vLLM as the serving engine: its async engine (continuous batching, paged KV cache, int4/int8 GPTQ
kernels: Marlin on GPU, WNA16 on CPU) behind the same requests, validation and outputs as ours.

Requests are validated and tokenized by `serving.requests.prepare_request` (so both engines refuse the
same inputs with the same messages) and handed to vLLM as token ids. Each request streams its deltas;
a cancelled request (client gone or deadline passed) is aborted in vLLM and frees its slot at once.
"""

from __future__ import annotations

import gc
import logging
import os
import uuid
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable

from transformers import GenerationConfig

from quantizer.decoder import load_tokenizer
from quantizer.errors import ConfigError
from quantizer.loading import quantization_config
from serving.requests import (GRPC_FIELDS, InvalidRequest, PreparedRequest, SamplingParams, StepOutput, eos_token_ids,
                              prepare_request)

log = logging.getLogger(__name__)

GiB = 1 << 30
# our kv_cache_dtype → vLLM's; "fp16" is vLLM's "auto" (the model dtype, fp16 for GPTQ)
VLLM_KV_CACHE_DTYPES = {"fp16": "auto", "fp8": "fp8", "fp8_e5m2": "fp8_e5m2"}


@dataclass(frozen=True)
class VLLMOptions:
    """The `vllm:` section of the serve config."""

    kv_cache_gb: float = 1.0  # memory for the paged KV cache per replica; 0 = vLLM's default (GPU share)
    enforce_eager: bool = True  # no torch.compile / CUDA graphs: fast start; False for GPU throughput
    gpu_memory_utilization: float = 0.9  # used when kv_cache_gb is 0

    def __post_init__(self) -> None:
        if self.kv_cache_gb < 0 or not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError("vllm.kv_cache_gb must be ≥ 0 and vllm.gpu_memory_utilization in (0, 1]")


def _finish_reason(reason: str | None, stop_reason: int | str | None) -> str | None:
    """vLLM says "stop" for both end-of-sequence and stop strings; ours tells them apart."""
    if reason == "stop":
        return "stop" if isinstance(stop_reason, str) else "eos"
    return reason


class VLLMEngine:
    """One vLLM AsyncLLM per Serve replica. max_batch_size bounds the sequences decoded together."""

    def __init__(self, model_dir: Path, kv_cache_dtype: str, max_new_tokens_limit: int, max_context: int,
                 max_batch_size: int, options: VLLMOptions, dtype: str = "float16",
                 on_kv_cache_usage: Callable[[float], None] | None = None) -> None:
        """dtype: activations and float weights (the serve config settles "auto" to the checkpoint's);
        on_kv_cache_usage: called with the used fraction of vLLM's KV cache blocks after each engine step."""
        if kv_cache_dtype not in VLLM_KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype {kv_cache_dtype!r} is not one of vLLM's here; use one of "
                              f"{sorted(VLLM_KV_CACHE_DTYPES)}, or engine: transformers for the int8 cache")
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # vLLM would hold back one core for itself
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        self.model_dir = Path(model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        try:
            generation_config = GenerationConfig.from_pretrained(self.model_dir)
        except OSError:
            generation_config = None
        self.eos_ids = eos_token_ids(self.tokenizer, generation_config)
        args = AsyncEngineArgs(
            model=str(self.model_dir), dtype=dtype, max_model_len=max_context or None,
            kv_cache_dtype=VLLM_KV_CACHE_DTYPES[kv_cache_dtype], max_num_seqs=max_batch_size,
            kv_cache_memory_bytes=int(options.kv_cache_gb * GiB) or None,
            gpu_memory_utilization=options.gpu_memory_utilization, enforce_eager=options.enforce_eager,
            disable_log_stats=on_kv_cache_usage is None)
        loggers = None
        if on_kv_cache_usage is not None:  # vLLM's stats, without its periodic log lines
            logging.getLogger("vllm.v1.metrics.loggers").setLevel(logging.WARNING)
            loggers = [_kv_cache_logger(on_kv_cache_usage)]
        self.engine = AsyncLLMEngine.from_engine_args(args, stat_loggers=loggers)
        self.max_context = int(self.engine.model_config.max_model_len)
        self.max_new_tokens_limit = max_new_tokens_limit
        self.quant_config = quantization_config(self.model_dir)
        self.dtype = dtype
        log.info("vLLM engine up: %s, dtype %s, KV cache %s, context %d", self.model_dir, dtype,
                 kv_cache_dtype, self.max_context)

    def prepare(self, prompt: str, messages: list[dict[str, str]], params: SamplingParams,
                fields: dict[str, str] = GRPC_FIELDS) -> PreparedRequest:
        """Our validation, then vLLM's own (a limit it has that ours does not know is still INVALID_ARGUMENT)."""
        request = prepare_request(self.tokenizer, prompt, messages, params, self.max_new_tokens_limit,
                                  self.max_context, fields)
        try:
            self._sampling(request.params)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc
        return request

    def _sampling(self, params: SamplingParams):
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.sampling_params import RequestOutputKind

        return VLLMSamplingParams(max_tokens=params.max_new_tokens, temperature=params.temperature,
                                  top_p=params.top_p, top_k=params.top_k, seed=params.seed, stop=list(params.stop),
                                  ignore_eos=params.ignore_eos, output_kind=RequestOutputKind.DELTA,
                                  skip_special_tokens=True)

    async def outputs(self, request: PreparedRequest) -> AsyncIterator[StepOutput]:
        """This request's outputs step by step; the last carries finish_reason and the token counts."""
        completed = 0
        steps = self.engine.generate({"prompt_token_ids": request.prompt_ids}, self._sampling(request.params),
                                     uuid.uuid4().hex)
        async with aclosing(steps):  # closed with this generator: vLLM aborts the request at once
            async for out in steps:
                step = out.outputs[0]
                tokens = [t for t in step.token_ids if t not in self.eos_ids or request.params.ignore_eos]
                completed += len(tokens)
                reason = _finish_reason(step.finish_reason, step.stop_reason) if out.finished else None
                yield StepOutput(step.text, tokens, reason, len(request.prompt_ids), completed)

    def shutdown(self) -> None:
        """Stop vLLM's engine process and drop the engine now (collected at interpreter exit, vLLM's own
        destructor would run again with its module globals gone)."""
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
            gc.collect()


def _kv_cache_logger(report: Callable[[float], None]):
    """A vLLM stat logger that hands each step's KV-cache usage (0–1) to `report`."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class KVCacheUsage(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                report(float(scheduler_stats.kv_cache_usage))

        def log_engine_initialized(self) -> None:
            pass

    return KVCacheUsage
