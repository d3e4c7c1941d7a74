"""The GPTQ solve (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"), with lazy block updates and the Cholesky form of H⁻¹ (§4, steps 2–3).

Rows of W are independent given H, so projections that share an input (q/k/v, gate/up) are solved
as one stacked weight with one Cholesky factorization.
"""

from __future__ import annotations

import logging
import time

import torch

from quantizer.config import QuantConfig
from quantizer.grid import dequantize_codes, grid_params, quantize_codes
from quantizer.result import QuantResult, output_error

__all__ = ["gptq_quantize", "inverse_hessian_cholesky"]

log = logging.getLogger(__name__)


def inverse_hessian_cholesky(hessian: torch.Tensor, damp_percent: float) -> tuple[torch.Tensor, str]:
    """Upper Cholesky factor of (H + λI)⁻¹, [in, in] float32, and which fallback was needed ("" if none).

    λ = damp_percent · mean(diag H). If float32 Cholesky fails (H ill-conditioned), retries in float64,
    then with 10× more dampening each time; every fallback is logged and returned for the report.
    """
    ladder = [(torch.float32, damp_percent), (torch.float64, damp_percent)]
    ladder += [(torch.float64, damp_percent * 10**k) for k in range(1, 10) if damp_percent * 10**k < 1]
    fallback = ""
    for dtype, damp in ladder:
        h = hessian.to(dtype=dtype, copy=True)
        h.diagonal().add_(damp * torch.mean(torch.diag(h)))
        try:
            hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
            return torch.linalg.cholesky(hinv, upper=True).float(), fallback
        except torch.linalg.LinAlgError:
            fallback = "float64" + (f", damp_percent={damp * 10:.3g}" if dtype == torch.float64 else "")
            log.warning("Cholesky of H failed (%s, damp_percent=%.3g); retrying", dtype, damp)
    raise RuntimeError("the Hessian is not positive definite even with heavy dampening; check the calibration data")


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, cfg: QuantConfig) -> QuantResult:
    """weight W: [out, in]; hessian H: [in, in] = 2/n ΣXᵀX (undamped). Returns codes in original column order."""
    start = time.perf_counter()
    W = weight.float().clone()
    H = hessian.float().clone()
    out_f, in_f = W.shape
    maxq = cfg.maxq
    group = in_f if cfg.group_size == -1 else cfg.group_size

    dead = torch.diag(H) == 0  # inputs that were always zero: any weight works, pick 0
    H[dead, dead] = 1
    W[:, dead] = 0

    static_params: list[tuple[torch.Tensor, torch.Tensor]] = []
    if cfg.static_groups or cfg.group_size == -1:
        for g0 in range(0, in_f, group):
            static_params.append(grid_params(W[:, g0 : g0 + group], cfg.bits, cfg.sym))

    perm = torch.arange(in_f, device=W.device)
    if cfg.desc_act:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    invperm = torch.argsort(perm)

    Hinv, fallback = inverse_hessian_cholesky(H, cfg.damp_percent)
    perm_list = perm.tolist()  # host copy: the column loop below never waits on the device
    Q = torch.zeros(out_f, in_f, dtype=torch.uint8, device=W.device)
    group_of_col = torch.zeros(in_f, dtype=torch.int64, device=W.device)  # in permuted order
    scales: list[torch.Tensor] = []
    zeros: list[torch.Tensor] = []
    scale = zero = None

    for i1 in range(0, in_f, cfg.block_size):
        i2 = min(i1 + cfg.block_size, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static_params:
                gi = perm_list[col] // group
                scale, zero = static_params[gi]
            elif col % group == 0:
                # Dynamic groups take their grid from the already error-updated remaining weights.
                scale, zero = grid_params(torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :group], cfg.bits, cfg.sym)
                scales.append(scale)
                zeros.append(zero)
                gi = len(scales) - 1
            group_of_col[col] = gi
            w = W1[:, i]
            d = Hinv1[i, i]
            q = quantize_codes(w, scale, zero, maxq)
            Q[:, col] = q.to(torch.uint8)
            err = (w - dequantize_codes(q, scale, zero)) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if static_params:
        scales = [s for s, _ in static_params]
        zeros = [z for _, z in static_params]
    result = QuantResult(
        codes=Q[:, invperm].contiguous(),
        scales=torch.stack(scales).half(),  # [groups, out]
        zeros=torch.stack(zeros).to(torch.int32),
        g_idx=group_of_col[invperm].to(torch.int32),
        loss=0.0,
        cholesky_fallback=fallback,
    )
    result.loss = output_error(weight, result.dequantize(), hessian)
    result.seconds = time.perf_counter() - start
    return result
