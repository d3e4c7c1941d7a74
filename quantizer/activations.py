"""Calibration batches as they travel between layers (and between stages)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # [B, T] int64, right-padded
    mask: torch.Tensor  # [B, T] bool, False at padding

    @property
    def tokens(self) -> int:
        return int(self.mask.sum())


@dataclass
class ActivationChunk:
    hidden: torch.Tensor  # [B, T, hidden] in the compute dtype
    mask: torch.Tensor  # [B, T] bool, False at padding

    @property
    def nbytes(self) -> int:
        return self.hidden.numel() * self.hidden.element_size() + self.mask.numel()


class ActivationStore(Protocol):
    """Where a stage keeps the activations between layer passes (memory, or Ray's object store)."""

    def put(self, chunk: ActivationChunk) -> Any: ...

    def get(self, handle: Any) -> ActivationChunk: ...


class MemoryStore:
    """Keeps chunks in this process."""

    def put(self, chunk: ActivationChunk) -> ActivationChunk:
        return chunk

    def get(self, handle: ActivationChunk) -> ActivationChunk:
        return handle
