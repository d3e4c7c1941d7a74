"""The integer grid: per-group scale/zero from min-max, quantize and dequantize (GPTQ conventions)."""

from __future__ import annotations

import torch


def grid_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max grid for each row of w: [out, cols] → scale [out] (fp16-representable), zero [out] (int-valued).

    The range always includes 0 (as the GPTQ reference does); the scale is rounded to fp16 because that
    is how the checkpoint stores it, so the solve's error feedback sees the stored grid exactly.
    """
    maxq = 2**bits - 1
    w = w.float()
    xmin = torch.minimum(w.min(dim=1).values, torch.zeros(1, device=w.device))
    xmax = torch.maximum(w.max(dim=1).values, torch.zeros(1, device=w.device))
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(empty, torch.full_like(xmax, 1.0), xmax)
    scale = ((xmax - xmin) / maxq).half().float()
    scale = torch.where(scale == 0, torch.full_like(scale, 2**-14), scale)  # fp16 underflow guard
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes of w (any shape broadcasting with scale/zero), clamped to [0, maxq]."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)
