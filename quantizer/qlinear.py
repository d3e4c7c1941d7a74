"""`QuantLinear`: a linear layer holding GPTQ v1 packed weights (reference torch path, runs on CPU)."""

from __future__ import annotations

import functools

import torch
from torch import nn

from quantizer.packing import PackedLinear, dequantize_packed


class QuantLinear(nn.Module):
    """y = x @ dequant(W)ᵀ + b, with W stored as qweight/qzeros/scales/g_idx (GPTQ v1).

    The dequantized weight is computed on first use and cached (`cache_weight=False` recomputes it on
    every call, trading time for memory).
    """

    def __init__(self, bits: int, group_size: int, in_features: int, out_features: int, bias: bool,
                 cache_weight: bool = True, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.compute_dtype = compute_dtype  # the dtype `weight` is read in (by model code that reads it)
        self.bits = bits
        self.group_size = group_size
        self.in_features = in_features
        self.out_features = out_features
        self.cache_weight = cache_weight
        groups = 1 if group_size == -1 else in_features // group_size
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, out_features * bits // 32, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16) if bias else None)
        self._weight: torch.Tensor | None = None

    @classmethod
    def from_packed(cls, packed: PackedLinear, group_size: int, bias: torch.Tensor | None) -> "QuantLinear":
        in_f, out_f = packed.g_idx.shape[0], packed.scales.shape[1]
        layer = cls(packed.bits, group_size, in_f, out_f, bias is not None)
        layer.qweight, layer.qzeros = packed.qweight, packed.qzeros
        layer.scales, layer.g_idx = packed.scales, packed.g_idx
        if bias is not None:
            layer.bias = bias.detach().half()
        return layer

    def packed(self) -> PackedLinear:
        return PackedLinear(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W: [out, in] in `dtype`."""
        if self._weight is not None and self._weight.dtype == dtype:
            return self._weight
        weight = dequantize_packed(self.packed(), dtype).to(self.qweight.device)
        if self.cache_weight:
            self._weight = weight
        return weight

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight [out, in], for model code that reads a projection's weight directly (RWKV,
        DeepSeek-V3.2's indexer)."""
        return self.dequantized_weight(self.compute_dtype)

    def _apply(self, fn, recurse=True):  # moving the module invalidates the cached weight
        self._weight = None
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if x.is_cuda and _triton_matmul() is not None and self.bits in (4, 8):
            return _triton_matmul()(x, self.qweight, self.scales, self.qzeros, self.g_idx, self.bits, bias)
        return nn.functional.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"


@functools.cache
def _triton_matmul():
    """The fused Triton kernel, or None where Triton is not installed (the torch path is used then)."""
    try:
        from quantizer.kernels.triton_gptq import gptq_matmul
    except ImportError:
        return None
    return gptq_matmul
