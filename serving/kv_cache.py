"""KV caches for decoding: float (transformers' DynamicCache) or int8 per token and head.

The int8 layer keeps keys and values as uint8 codes with an fp16 scale and zero per (batch, head,
token) vector — Qwen's `use_cache_quantization` scheme — and hands attention the dequantized states,
so the model's attention code is unchanged. For head_dim 64 that is (64 + 4) bytes per vector instead
of 128 in fp16: 0.53×.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

KV_CACHE_DTYPES = ("fp16", "fp32", "int8")


def quantize_per_vector(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [B, H, T, D] → (codes uint8 [B, H, T, D], scale fp16 [B, H, T, 1], zero fp16 [B, H, T, 1])."""
    lo = x.amin(dim=-1, keepdim=True).float()
    hi = x.amax(dim=-1, keepdim=True).float()
    scale = ((hi - lo) / 255).clamp(min=1e-8).half()
    zero = lo.half()
    codes = torch.round((x.float() - zero.float()) / scale.float()).clamp(0, 255).to(torch.uint8)
    return codes, scale, zero


def dequantize_per_vector(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                          dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * scale.float() + zero.float()).to(dtype)


class Int8KVLayer(DynamicLayer):
    """One decoder layer's cache, stored as int8 codes + per-vector scale/zero."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.stored: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = {"k": None, "v": None}
        self.is_initialized = True

    def _append(self, name: str, states: torch.Tensor) -> torch.Tensor:
        new = quantize_per_vector(states)
        old = self.stored[name]
        self.stored[name] = new if old is None else tuple(torch.cat([a, b], dim=-2) for a, b in zip(old, new))
        return dequantize_per_vector(*self.stored[name], self.dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self._append("k", key_states), self._append("v", value_states)

    def get_seq_length(self) -> int:
        if not self.is_initialized or self.stored["k"] is None:
            return 0
        return self.stored["k"][0].shape[-2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for part in self.stored.values() if part for t in part)


class Fp16KVLayer(DynamicLayer):
    """Stores states in fp16 whatever the compute dtype (the baseline int8 is measured against)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = key_states.dtype
        keys, values = super().update(key_states.half(), value_states.half())
        return keys.to(dtype), values.to(dtype)


def make_cache(kv_cache_dtype: str) -> Cache:
    if kv_cache_dtype == "int8":
        return Cache(layer_class_to_replicate=Int8KVLayer)
    if kv_cache_dtype == "fp16":
        return Cache(layer_class_to_replicate=Fp16KVLayer)
    return DynamicCache()


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by the cache's stored tensors (codes, scales and zeros for int8)."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, Int8KVLayer):
            total += layer.nbytes()
        elif getattr(layer, "keys", None) is not None:
            total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return total
