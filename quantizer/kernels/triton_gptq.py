"""Triton dequantize-and-multiply for GPTQ v1 weights (4 and 8 bits, any group size, act-order g_idx).

out[M, N] = x[M, K] @ W[K, N] with W[k, n] = scales[g, n] · (q[k, n] − zero[g, n]), g = g_idx[k],
unpacked tile by tile inside the kernel so the float weight never exists in memory. Accumulates in
fp32; half-precision inputs use the tensor cores. Runs on CPU tensors under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SUPPORTED_BITS = (4, 8)


@triton.jit
def _gptq_matmul_kernel(x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, bias_ptr, out_ptr,
                        M, N, K,
                        stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
                        stride_om, stride_on,
                        BITS: tl.constexpr, HAS_BIAS: tl.constexpr, HALF: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    PACK: tl.constexpr = 32 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)
        packed = tl.load(qweight_ptr + (offs_k[:, None] // PACK) * stride_qk + offs_n[None, :] * stride_qn,
                         mask=k_ok[:, None] & n_ok[None, :], other=0)
        q = (packed >> ((offs_k[:, None] % PACK) * BITS)) & MAXQ  # [BLOCK_K, BLOCK_N]
        g = tl.load(g_idx_ptr + offs_k, mask=k_ok, other=0)
        scale = tl.load(scales_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn,
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        zpacked = tl.load(qzeros_ptr + g[:, None] * stride_zg + (offs_n[None, :] // PACK) * stride_zn,
                          mask=k_ok[:, None] & n_ok[None, :], other=0)
        zero = (((zpacked >> ((offs_n[None, :] % PACK) * BITS)) & MAXQ) + 1) & MAXQ  # v1 stores zero − 1
        w = (q - zero).to(tl.float32) * scale
        if HALF:
            acc += tl.dot(x, w.to(x.dtype))
        else:
            acc += tl.dot(x.to(tl.float32), w)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & n_ok[None, :])


def gptq_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                g_idx: torch.Tensor, bits: int, bias: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., K] → [..., N] in x's dtype; qweight int32 [K·bits/32, N], scales [G, N], qzeros [G, N·bits/32].
    `out`: an optional [M, N] buffer to write into."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"the Triton kernel handles {SUPPORTED_BITS}-bit weights, not {bits}")
    k, n = g_idx.shape[0], scales.shape[1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    block_m = 16 if m <= 16 else 64
    block_n, block_k = 64, 32
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _gptq_matmul_kernel[grid](
        x2, qweight, scales, qzeros, g_idx, bias if bias is not None else scales, out, m, n, k,
        x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
        qzeros.stride(0), qzeros.stride(1), out.stride(0), out.stride(1),
        BITS=bits, HAS_BIAS=bias is not None, HALF=x.dtype in (torch.float16, torch.bfloat16),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out.reshape(*x.shape[:-1], n)
