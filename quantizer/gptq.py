"""The GPTQ solve (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"), with lazy block updates and the Cholesky form of H⁻¹ (§4, steps 2–3).

Rows of W are independent given H, so projections that share an input (q/k/v, gate/up) are solved
as one stacked weight with one Cholesky factorization. The column loop works on Wᵀ, so each column
is one contiguous row, and updates in two levels: rank-1 updates inside a sub-block of a few columns,
GEMMs from each sub-block to the rest of its 128-column block and from each block to the remaining
columns. That is the same arithmetic as the reference loop with far less memory traffic.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

import torch

from quantizer.column_order import column_order
from quantizer.config import QuantConfig
from quantizer.grid import grid_params
from quantizer.hessian import HessianAccumulator
from quantizer.result import QuantResult

__all__ = ["Factorization", "factorize", "gptq_quantize", "gptq_solve", "inverse_hessian_cholesky"]

log = logging.getLogger(__name__)

SUB_BLOCK = 16  # columns per rank-1 update region inside a lazy block
LOSS_ROWS = 1024  # rows dequantized at a time for the loss
CHOLESKY_LEAF = 512  # (CPU) Cholesky of at most this order by LAPACK, larger ones by halves (`_cholesky`)


def inverse_hessian_cholesky(hessian: torch.Tensor | list[torch.Tensor], damp_percent: float
                             ) -> tuple[torch.Tensor, str, float]:
    """Upper Cholesky factor U of (H + λI)⁻¹ = UᵀU, [in, in] float32; the fallback used ("" if none); λ.

    hessian: H [in, in] float32 (left unchanged), or a one-element list holding the only reference to
    it, which hands H over: then at most ~2.5 [in, in] matrices are alive at once instead of ~3.5.
    λ = damp_percent · mean(diag H). One Cholesky of the reversed matrix gives U directly: if
    JHJ = LLᵀ (J reverses the order), then H⁻¹ = (JL⁻¹J)ᵀ(JL⁻¹J) with JL⁻¹J upper triangular.
    If float32 Cholesky fails (H ill-conditioned), retries in float64, then with 10× more dampening
    each time; every fallback is logged and returned for the report.
    """
    reversed_h = (hessian.pop() if isinstance(hessian, list) else hessian).float().flip(0, 1)
    undamped = reversed_h.diagonal().clone()
    ladder = [(torch.float32, damp_percent), (torch.float64, damp_percent)]
    ladder += [(torch.float64, damp_percent * 10**k) for k in range(1, 10) if damp_percent * 10**k < 1]
    fallback = ""
    for dtype, damp in ladder:
        h = reversed_h if dtype == torch.float32 else reversed_h.to(dtype)
        lam = damp * torch.mean(torch.diag(h))
        h.diagonal().add_(lam)
        factor, info = _cholesky(h)
        if info == 0:  # free each [in, in] matrix once the next one exists
            del h, reversed_h
            inverse = _lower_triangular_inverse(factor)
            del factor
            return inverse.flip(0, 1).float(), fallback, float(lam)
        if h is reversed_h:
            reversed_h.diagonal().copy_(undamped)
        fallback = "float64" + (f", damp_percent={damp * 10:.3g}" if dtype == torch.float64 else "")
        log.warning("Cholesky of H failed (%s, damp_percent=%.3g); retrying", dtype, damp)
    raise RuntimeError("the Hessian is not positive definite even with heavy dampening; check the calibration data")


def _cholesky(h: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Lower Cholesky factor L of h: [n, n] (LLᵀ = h) and LAPACK's info (0: success). On CPUs above
    CHOLESKY_LEAF by halves, so that most of the work is matrix products — about twice as fast as LAPACK's
    own (n = 1536 and 4096, 1 and 2 threads): [[A, ·], [B, C]] = LLᵀ with L = [[L_A, 0], [B L_A⁻ᵀ, L_S]],
    L_S the factor of C − (B L_A⁻ᵀ)(B L_A⁻ᵀ)ᵀ, which is formed in L's own corner."""
    n = h.shape[0]
    if h.device.type != "cpu" or n <= CHOLESKY_LEAF:
        factor, info = torch.linalg.cholesky_ex(h)
        return factor, int(info)
    k = n // 2
    factor = torch.zeros_like(h)
    top, info = _cholesky(h[:k, :k])
    if info:
        return factor, info
    factor[:k, :k] = top
    below = factor[k:, :k]
    below.copy_(torch.linalg.solve_triangular(top, h[k:, :k].t(), upper=False).t())
    corner = factor[k:, k:]
    corner.copy_(h[k:, k:]).addmm_(below, below.t(), alpha=-1)
    rest, info = _cholesky(corner)
    corner.copy_(rest)
    return factor, info


def _lower_triangular_inverse(L: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """L⁻¹ for lower-triangular L: [n, n], by halves so that nearly all the work is matrix products:
    [[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [−C⁻¹BA⁻¹, C⁻¹]]."""
    n = L.shape[0]
    if n <= leaf:
        return torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype, device=L.device), upper=False)
    k = n // 2
    inverse = torch.zeros_like(L)
    a_inv = inverse[:k, :k] = _lower_triangular_inverse(L[:k, :k], leaf)
    c_inv = inverse[k:, k:] = _lower_triangular_inverse(L[k:, k:], leaf)
    inverse[k:, :k] = -(c_inv @ L[k:, :k]) @ a_inv
    return inverse


@dataclass
class Factorization:
    """What GPTQ derives from one Hessian, shared by every weight that sees the same inputs (q/k/v; the
    experts of a layer when each is calibrated on every token): solve order and the factor of H⁻¹."""
    perm: torch.Tensor | None  # [in] solve order (None: natural)
    group_order: torch.Tensor | None  # group-aware order of the groups, when used
    Hinv: torch.Tensor  # [in, in] float32 upper Cholesky factor of (H + λI)⁻¹, in solve order
    dead: torch.Tensor  # [in] bool, inputs that were always zero
    lam: float  # the dampening added to diag H
    fallback: str  # Cholesky fallback used ("" if none)


def factorize(hessian: torch.Tensor | HessianAccumulator, cfg: QuantConfig, copy: bool = True) -> Factorization:
    """hessian H: [in, in] = 2/n ΣXᵀX (undamped), or the accumulator that holds it. With copy=False an
    accumulator hands H over (no second [in, in] matrix: 3.5 GB for a 29696-wide input); with copy=True
    (the default for a tensor) H is left as it was."""
    if isinstance(hessian, HessianAccumulator):
        H = hessian.hessian() if copy else hessian.take_hessian()
    else:
        H = hessian.float().clone()
    dead = torch.diag(H) == 0  # inputs that were always zero: any weight works, pick 0
    H[dead, dead] = 1
    perm, group_order = column_order(torch.diag(H), cfg)
    if perm is not None:  # in two steps, so that at most two [in, in] matrices exist at once
        H = H[perm]
        H = H[:, perm]
    holder = [H]  # handed over: the inversion frees H as soon as it has the reversed copy
    del H
    Hinv, fallback, lam = inverse_hessian_cholesky(holder, cfg.damp_percent)
    return Factorization(perm, group_order, Hinv, dead, lam, fallback)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor | HessianAccumulator, cfg: QuantConfig
                  ) -> QuantResult:
    """weight W: [out, in]; hessian H: [in, in] = 2/n ΣXᵀX (undamped), or the accumulator that holds it,
    which then hands it over. Returns codes in original column order."""
    start = time.perf_counter()
    result = gptq_solve(weight, factorize(hessian, cfg, copy=False), cfg)
    result.seconds = time.perf_counter() - start
    return result


def gptq_solve(weight: torch.Tensor, fact: Factorization, cfg: QuantConfig) -> QuantResult:
    """weight W: [out, in] solved against a factorization of its inputs' Hessian (left unchanged)."""
    start = time.perf_counter()
    W = weight.float().clone()
    in_f = W.shape[1]
    group = in_f if cfg.group_size == -1 else cfg.group_size
    W[:, fact.dead.to(W.device)] = 0
    static = cfg.static_groups or cfg.group_size == -1
    static_params = [grid_params(W[:, g0:g0 + group], cfg.bits, cfg.sym)
                     for g0 in range(0, in_f, group)] if static else []
    perm = fact.perm
    Wt = (W if perm is None else W[:, perm]).t().contiguous()  # [in, out], permuted column order
    codes_t, scaled_err, grids = _column_loop(Wt, fact.Hinv, cfg, group, static_params, perm)
    del Wt

    perm_cols = torch.arange(in_f, device=W.device) if perm is None else perm
    invperm = torch.argsort(perm_cols)
    scales = torch.stack([s for s, _ in grids])  # [groups, out]
    zeros = torch.stack([z for _, z in grids])
    if static:
        g_idx = torch.arange(in_f, device=W.device) // group
    elif fact.group_order is not None:  # group-aware order keeps groups contiguous: renumber them in column order
        inv_order = torch.argsort(fact.group_order)
        scales, zeros = scales[inv_order], zeros[inv_order]
        g_idx = torch.arange(in_f, device=W.device) // group
    else:  # groups numbered in solve order; act-order scatters their columns
        g_idx = (torch.arange(in_f, device=W.device) // group)[invperm]
    result = QuantResult(
        codes=codes_t[invperm].t().contiguous(),
        scales=scales.half(),
        zeros=zeros.to(torch.int32),
        g_idx=g_idx.to(torch.int32),
        loss=0.0,
        cholesky_fallback=fact.fallback,
    )
    # Σ (err/d)² is ΔW(H + λI)ΔWᵀ exactly (each column's error is the exact increase of the objective);
    # subtracting λ‖ΔW‖² leaves the undamped output error, without an [out, in] × [in, in] product.
    # Both terms without weight-sized temporaries (four of them would be 8 GB for Qwen2-72B's gate/up).
    # Each row's sums run along its own contiguous inputs, so a row's loss has the same bits whichever rows
    # are solved with it (data-parallel workers solve shares of a unit's rows).
    err_sq = torch.empty(W.shape[0], device=W.device)
    delta_sq = torch.empty(W.shape[0], device=W.device)
    for r0 in range(0, W.shape[0], LOSS_ROWS):
        rows = slice(r0, r0 + LOSS_ROWS)
        err = scaled_err[:, rows].t().contiguous()
        err_sq[rows] = (err * err).sum(1)
        delta = W[rows] - result.dequantize(rows)
        delta_sq[rows] = (delta * delta).sum(1)
    del scaled_err
    result.row_losses = (err_sq - fact.lam * delta_sq) / 2
    result.loss = float(result.row_losses.sum())
    result.seconds = time.perf_counter() - start
    return result


def _column_loop(Wt: torch.Tensor, Hinv: torch.Tensor, cfg: QuantConfig, group: int,
                 static_params: list[tuple[torch.Tensor, torch.Tensor]], perm: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Quantize the rows of Wt: [in, out] (updated in place) in order, feeding each error forward through Hinv.

    Returns codes [in, out] uint8, scaled errors (w − q)/U_cc [in, out], and the grids: the static ones,
    or one per group in solve order (taken from the error-updated weights when the group starts).
    """
    in_f = Wt.shape[0]
    solve_subblock = subblock_solver(Wt.device)
    codes = torch.empty(Wt.shape, dtype=torch.uint8, device=Wt.device)
    scaled_err = torch.empty_like(Wt)
    grids = list(static_params)
    static_group = (perm.tolist() if perm is not None else list(range(in_f))) if static_params else []
    scale = zero = None
    for i1 in range(0, in_f, cfg.block_size):
        i2 = min(i1 + cfg.block_size, in_f)
        j1 = i1
        while j1 < i2:
            # sub-blocks also break at group starts, so a new group's grid sees every earlier update in the block
            j2 = min(j1 + SUB_BLOCK, i2, (j1 // group + 1) * group)
            if static_params:
                col_grids = [static_params[static_group[c] // group] for c in range(j1, j2)]
                scale = torch.stack([s for s, _ in col_grids])
                zero = torch.stack([z for _, z in col_grids])
            elif j1 % group == 0:
                s, z = grid_params(Wt[j1:j1 + group].t(), cfg.bits, cfg.sym)
                grids.append((s, z))
                scale, zero = s, z
            solve_subblock(Wt[j1:j2], Hinv[j1:j2, j1:j2], scale, zero, codes[j1:j2], scaled_err[j1:j2], cfg.maxq)
            if j2 < i2:
                Wt[j2:i2].addmm_(Hinv[j1:j2, j2:i2].t(), scaled_err[j1:j2], alpha=-1)
            j1 = j2
        if i2 < in_f:
            Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), scaled_err[i1:i2], alpha=-1)
    return codes, scaled_err, grids


def quantize_subblock_torch(w: torch.Tensor, hinv: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                            codes: torch.Tensor, err: torch.Tensor, maxq: int) -> None:
    """The per-column loop over one sub-block: w [n, out] (updated in place), hinv [n, n] block of U,
    scale/zero [n, out] (each column's grid) or [out] (one grid for all); writes codes [n, out] and
    err = (w − q)/U_cc [n, out].

    Each column is rounded to q − z directly, clamped to [−z, maxq − z] (exact small integers: the same
    codes and errors as `grid.quantize_codes` then `grid.dequantize_codes`, in fewer operations — on CPUs the loop's
    cost is the number of torch calls per column). Rows are taken as views once per sub-block."""
    n = w.shape[0]
    per_column = scale.dim() == 2
    shifted = torch.empty_like(w)  # q − z
    low, high = -zero, maxq - zero
    w_rows, err_rows, shifted_rows, hinv_rows = w.unbind(0), err.unbind(0), shifted.unbind(0), hinv.unbind(0)
    diagonal = hinv.diagonal().unbind(0)
    scales, lows, highs = (scale.unbind(0), low.unbind(0), high.unbind(0)) if per_column else \
        ([scale] * n, [low] * n, [high] * n)
    for c in range(n):
        r, e = shifted_rows[c], err_rows[c]
        torch.div(w_rows[c], scales[c], out=r)
        r.round_()
        torch.clamp(r, lows[c], highs[c], out=r)
        torch.sub(w_rows[c], scales[c] * r, out=e)
        e.div_(diagonal[c])
        if c + 1 < n:
            w[c + 1:].addr_(hinv_rows[c][c + 1:], e, alpha=-1)
    codes.copy_(shifted.add_(zero))


def subblock_solver(device: torch.device):
    """The fused Triton kernel on CUDA (one launch per sub-block) when Triton is installed, else the torch loop."""
    if device.type == "cuda":
        try:
            from quantizer.kernels.triton_gptq_solve import quantize_subblock
        except ImportError:
            return quantize_subblock_torch
        return functools.partial(quantize_subblock, sub=SUB_BLOCK)
    return quantize_subblock_torch
