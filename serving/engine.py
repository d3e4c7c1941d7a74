"""Batched autoregressive generation with a KV cache, on a float or GPTQ checkpoint."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from quantizer.decoder import load_tokenizer
from quantizer.loading import load_model, quantization_config
from quantizer.qlinear import QuantLinear
from serving.kv_cache import KV_CACHE_DTYPES, make_cache
from serving.requests import (GRPC_FIELDS, PreparedRequest, SamplingParams, StepOutput, eos_token_ids,
                              prepare_request)

log = logging.getLogger(__name__)
DTYPES = ("auto", "float16", "bfloat16", "float32")


def checkpoint_dtype(model_dir: Path) -> str:
    """The float dtype config.json names ("bfloat16", "float16" or "float32")."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    return name if name in DTYPES else "float32"


def serving_dtype(model_dir: Path, chosen: str, half_precision: bool) -> str:
    """The dtype an engine computes in: the chosen one, or for "auto" the checkpoint's half type when the
    engine computes in half precision (bf16 stays bf16; fp16 and fp32 checkpoints get fp16, as vLLM's own
    "auto"), else float32."""
    if chosen != "auto":
        return chosen
    if not half_precision:
        return "float32"
    return "bfloat16" if checkpoint_dtype(model_dir) == "bfloat16" else "float16"


@dataclass
class _RowState:
    request: PreparedRequest
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of text already sent
    finished: bool = False


class GenerationEngine:
    def __init__(self, model_dir: Path, kv_cache_dtype: str = "fp16", max_new_tokens_limit: int = 512,
                 max_context: int = 0, device: str = "auto", cache_dequantized_weights: bool = True,
                 dtype: str = "auto") -> None:
        """dtype: "auto" = float32 on CPU (its fast kernels), the checkpoint's half type on GPU; or
        "float16" / "bfloat16" / "float32"."""
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} is unknown; use one of {KV_CACHE_DTYPES}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model_dir = Path(model_dir)
        self.dtype = serving_dtype(self.model_dir, dtype, half_precision=device != "cpu")
        self.model = load_model(self.model_dir, getattr(torch, self.dtype), device)
        for module in self.model.modules():
            if isinstance(module, QuantLinear):
                module.cache_weight = cache_dequantized_weights
        self.tokenizer = load_tokenizer(self.model_dir)
        self.kv_cache_dtype = kv_cache_dtype
        self.max_new_tokens_limit = max_new_tokens_limit
        self.max_context = max_context or int(self.model.config.max_position_embeddings)
        self.quant_config = quantization_config(self.model_dir)
        self.eos_ids = eos_token_ids(self.tokenizer, self.model.generation_config)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else next(iter(self.eos_ids))
        self.device = torch.device(device)

    # ---- requests ---------------------------------------------------------------------------------
    def prepare(self, prompt: str, messages: list[dict[str, str]], params: SamplingParams,
                fields: dict[str, str] = GRPC_FIELDS) -> PreparedRequest:
        """Validate and tokenize a request; raises InvalidRequest naming the problem (in `fields`' names)."""
        return prepare_request(self.tokenizer, prompt, messages, params, self.max_new_tokens_limit, self.max_context,
                               fields)

    # ---- decoding ---------------------------------------------------------------------------------
    def stream(self, requests: list[PreparedRequest]) -> Iterator[list[StepOutput | None]]:
        """Decode a batch together. Each step yields one entry per request: its new output, or None once
        that request has finished (its final StepOutput carries finish_reason) or was closed by its caller.
        Ends when every request has finished or been closed."""
        rows = [_RowState(r, torch.Generator().manual_seed(r.params.seed if r.params.seed is not None
                                                          else int.from_bytes(os.urandom(8), "little") >> 1))
                for r in requests]
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(requests):  # left padding: every row's last prompt token is at the end
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = make_cache(self.kv_cache_dtype)
        self.last_cache = cache
        while True:
            for row in rows:  # a caller that hung up or ran out of time frees its row
                row.finished = row.finished or row.request.closed
            if all(row.finished for row in rows):
                return
            # Entered per step: the server advances this generator from worker threads (asyncio.to_thread),
            # and inference mode is thread-local, so a `with` around the whole loop would not hold on
            # the thread that runs a later step.
            with torch.inference_mode():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                    position_ids=positions.to(self.device), past_key_values=cache,
                                    use_cache=True).logits[:, -1].float().cpu()
            step: list[StepOutput | None] = []
            next_ids = torch.full((len(rows),), self.pad_id, dtype=torch.long)
            for i, row in enumerate(rows):
                if row.finished:
                    step.append(None)
                    continue
                token = self._sample(logits[i], row)
                next_ids[i] = token
                step.append(self._advance(row, token))
            yield step
            ids = next_ids.unsqueeze(1)
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long)], dim=1)
            positions = positions[:, -1:] + 1

    def generate(self, request: PreparedRequest) -> StepOutput:
        """The whole completion of one request."""
        text, tokens, last = "", [], None
        for (out,) in self.stream([request]):
            if out is not None:
                text, tokens, last = text + out.text, tokens + out.token_ids, out
        return StepOutput(text, tokens, last.finish_reason, last.prompt_tokens, last.completion_tokens)

    def _sample(self, logits: torch.Tensor, row: _RowState) -> int:
        p = row.request.params
        if p.temperature == 0:
            return int(logits.argmax())
        logits = logits / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_logits.softmax(-1) > p.top_p  # keep the smallest set reaching top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        return int(torch.multinomial(logits.softmax(-1), 1, generator=row.generator))

    def _advance(self, row: _RowState, token: int) -> StepOutput:
        p = row.request.params
        reason = None
        ends = token in self.eos_ids and not p.ignore_eos
        if ends:
            reason = "eos"
        else:
            row.tokens.append(token)
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        hits = [text.find(s) for s in p.stop if s and s in text]
        if hits:
            text, reason = text[: min(hits)], "stop"
        elif reason is None and len(row.tokens) >= p.max_new_tokens:
            reason = "length"
        if reason is None:
            hold = max((len(s) - 1 for s in p.stop), default=0)  # a stop string may still be forming
            safe = len(text) - hold
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next token
                safe = min(safe, len(text) - 1)
            delta = text[row.emitted:max(safe, row.emitted)]
        else:
            delta = text[row.emitted:]
            row.finished = True
        row.emitted += len(delta)
        new_tokens = [] if ends else [token]
        return StepOutput(delta, new_tokens, reason, len(row.request.prompt_ids), len(row.tokens))
