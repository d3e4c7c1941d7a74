"""GPTQ v1 tensor layout (AutoGPTQ / GPTQModel `format: gptq` / vLLM).

Codes are written as a little-endian bit stream of `bits`-wide fields across 32-bit words: value j of a
column sits at bit bits·j of the stream. For 2/4/8 bits that is 32/bits values per word; for 3 bits
32 values span 3 words, the layout AutoGPTQ's 3-bit packer produces.

- qweight int32 [in·bits/32, out]: codes packed along the input dimension.
- qzeros  int32 [groups, out·bits/32]: (zero − 1) mod 2^bits packed along the output dimension.
- scales  fp16  [groups, out];  g_idx int32 [in].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantizer.result import QuantResult

__all__ = ["PackedLinear", "pack_result", "pack_bits", "unpack_bits", "dequantize_packed"]


@dataclass
class PackedLinear:
    qweight: torch.Tensor  # int32 [in·bits/32, out]
    qzeros: torch.Tensor  # int32 [groups, out·bits/32]
    scales: torch.Tensor  # fp16 [groups, out]
    g_idx: torch.Tensor  # int32 [in]
    bits: int

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.qweight": self.qweight,
            f"{prefix}.qzeros": self.qzeros,
            f"{prefix}.scales": self.scales,
            f"{prefix}.g_idx": self.g_idx,
        }


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """values: [n, m] ints in [0, 2^bits) → int32 [n·bits/32, m], packing along dim 0."""
    n, m = values.shape
    if (n * bits) % 32:
        raise ValueError(f"cannot pack {n} values of {bits} bits into whole 32-bit words")
    if 32 % bits == 0:  # 2/4/8 bits: each word holds 32/bits whole fields — shift each into place, OR them in
        per_word = 32 // bits  # (in int32: torch shifts signed integers as unsigned, the top field sets the sign)
        fields = values.to(torch.int32).view(n // per_word, per_word, m)
        words = fields[:, 0].clone()
        for j in range(1, per_word):
            words.bitwise_or_(fields[:, j] << (bits * j))
        return words
    v = values.to(torch.int64)
    offset = torch.arange(n, dtype=torch.int64, device=v.device) * bits  # bit position of each value
    word = (offset // 32).unsqueeze(1).expand(n, m)
    shift = (offset % 32).unsqueeze(1)
    words = torch.zeros(n * bits // 32 + 1, m, dtype=torch.int64, device=v.device)
    words.scatter_add_(0, word, (v << shift) & 0xFFFFFFFF)
    spill = (shift + bits > 32).expand(n, m)  # fields that cross into the next word (3-bit only)
    words.scatter_add_(0, word + 1, torch.where(spill, v >> (32 - shift), 0))
    words = words[:-1]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits: int32 [n·bits/32, m] → int64 [n, m]."""
    if 32 % bits == 0:  # 2/4/8 bits: values never straddle words — shift and mask in place
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device).view(1, -1, 1)
        values = (packed.unsqueeze(1) >> shifts) & (2**bits - 1)  # [words, 32 / bits, m]
        return values.reshape(-1, packed.shape[1])[:n].to(torch.int64)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = torch.cat([words, torch.zeros_like(words[:1])])
    offset = torch.arange(n, dtype=torch.int64, device=words.device) * bits
    word = offset // 32
    shift = (offset % 32).unsqueeze(1)
    lo = words[word] >> shift
    hi = words[word + 1] << (32 - shift)
    return (lo | hi) & (2**bits - 1)


def pack_result(result: QuantResult, bits: int) -> PackedLinear:
    """QuantResult (codes [out, in], zeros true) → v1 tensors."""
    stored_zero = (result.zeros.to(torch.int64) - 1) % (2**bits)  # v1 convention: zero − 1
    return PackedLinear(
        qweight=pack_bits(result.codes.t().contiguous(), bits),
        qzeros=pack_bits(stored_zero.t().contiguous(), bits).t().contiguous(),
        scales=result.scales.half().contiguous(),
        g_idx=result.g_idx.to(torch.int32).contiguous(),
        bits=bits,
    )


def unpack_result(packed: PackedLinear) -> QuantResult:
    """v1 tensors → QuantResult with true zeros (loss is not stored and comes back as 0)."""
    in_f = packed.g_idx.shape[0]
    out_f = packed.scales.shape[1]
    codes = unpack_bits(packed.qweight, packed.bits, in_f).t()
    stored = unpack_bits(packed.qzeros.t().contiguous(), packed.bits, out_f).t()
    return QuantResult(
        codes=codes.to(torch.uint8).contiguous(),
        scales=packed.scales,
        zeros=((stored + 1) % (2**packed.bits)).to(torch.int32),
        g_idx=packed.g_idx,
        loss=0.0,
    )


def dequantize_packed(packed: PackedLinear, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W[o, i] = scales[g, o] · (q[i, o] − zero[g, o]) with g = g_idx[i]; returns [out, in] in `dtype`."""
    return unpack_result(packed).dequantize().to(dtype)
