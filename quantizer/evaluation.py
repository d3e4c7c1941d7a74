"""Perplexity on real text, in fixed-length windows."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from quantizer.errors import ConfigError


def perplexity(model: nn.Module, tokenizer, text_file: Path, window: int = 512, max_windows: int = 32,
               batch_size: int = 4) -> float:
    """exp(mean NLL) over non-overlapping `window`-token windows of the file (at most `max_windows`)."""
    text_file = Path(text_file)
    if not text_file.is_file():
        raise ConfigError(f"evaluation text {text_file} does not exist")
    ids = tokenizer(text_file.read_text(encoding="utf-8", errors="replace"), return_tensors="pt").input_ids[0]
    count = min(max_windows, len(ids) // window)
    if count == 0:
        raise ConfigError(f"{text_file} has {len(ids)} tokens, fewer than one {window}-token window")
    windows = ids[: count * window].reshape(count, window)
    device = next(model.parameters()).device
    nll, tokens = 0.0, 0
    with torch.inference_mode():
        for batch in windows.split(batch_size):
            batch = batch.to(device)
            logits = model(batch).logits[:, :-1].float()
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                               reduction="sum")
            nll += float(loss)
            tokens += batch[:, 1:].numel()
    return math.exp(nll / tokens)
