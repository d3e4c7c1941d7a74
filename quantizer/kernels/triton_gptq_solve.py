"""Triton kernel for the inner loop of the GPTQ solve: one launch per sub-block instead of ~10 per column.

Works on Wᵀ: [in, out] (each input column is a contiguous row). A program owns BLOCK_R outputs and
the sub-block's SUB rows in registers; for each column in turn it rounds to the grid, stores the code
and the scaled error e = (w − q)/U_cc, and applies the rank-1 update w_j −= U_cj · e to the later
columns of the sub-block. The same arithmetic as the torch loop in quantizer.gptq, in the same order.
Runs on CPU tensors under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _round_half_even(x):
    r = tl.floor(x + 0.5)
    tie = (r - x) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _subblock_kernel(w_ptr, hinv_ptr, scale_ptr, zero_ptr, codes_ptr, err_ptr,
                     n_out, n_cols, stride_w, stride_h, stride_s, maxq,
                     SUB: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    outs = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    out_ok = outs < n_out
    cols = tl.arange(0, SUB)
    col_ok = cols < n_cols
    tile_ok = col_ok[:, None] & out_ok[None, :]
    w = tl.load(w_ptr + cols[:, None] * stride_w + outs[None, :], mask=tile_ok, other=0.0)  # [SUB, BLOCK_R]
    for i in tl.static_range(SUB):
        valid = i < n_cols
        wi = tl.sum(tl.where(cols[:, None] == i, w, 0.0), axis=0)  # row i: [BLOCK_R]
        scale = tl.load(scale_ptr + i * stride_s + outs, mask=out_ok & valid, other=1.0)
        zero = tl.load(zero_ptr + i * stride_s + outs, mask=out_ok & valid, other=0.0)
        q = tl.minimum(tl.maximum(_round_half_even(wi / scale) + zero, 0.0), maxq)
        d = tl.load(hinv_ptr + i * stride_h + i, mask=valid, other=1.0)
        e = (wi - scale * (q - zero)) / d
        tl.store(codes_ptr + i * stride_w + outs, q.to(tl.uint8), mask=out_ok & valid)
        tl.store(err_ptr + i * stride_w + outs, e, mask=out_ok & valid)
        h_row = tl.load(hinv_ptr + i * stride_h + cols, mask=col_ok & (cols > i), other=0.0)  # U[i, later cols]
        w = w - h_row[:, None] * e[None, :]


def quantize_subblock(w: torch.Tensor, hinv: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      codes: torch.Tensor, err: torch.Tensor, maxq: int, sub: int = 16) -> None:
    """Quantize the rows of w: [n, out] (n ≤ sub) in order; hinv: [n, n] block of U; scale, zero: float32
    [n, out] (each column's grid) or [out] (one grid for all n). Writes codes [n, out] uint8 and err [n, out]."""
    n, n_out = w.shape
    if n > sub or not (w.is_contiguous() and codes.is_contiguous() and err.is_contiguous()):
        raise ValueError("quantize_subblock needs n ≤ sub and contiguous w, codes and err")
    scale, zero = scale.contiguous(), zero.contiguous()
    block_r = 128
    _subblock_kernel[(triton.cdiv(n_out, block_r),)](
        w, hinv.contiguous(), scale, zero, codes, err, n_out, n, n_out, n, n_out if scale.dim() == 2 else 0,
        float(maxq), SUB=sub, BLOCK_R=block_r)
