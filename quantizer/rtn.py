"""Round-to-nearest quantization: the baseline GPTQ must beat, with the same outputs as the solve."""

from __future__ import annotations

import time

import torch

from quantizer.config import QuantConfig
from quantizer.grid import grid_params, quantize_codes
from quantizer.result import QuantResult, row_output_errors


def rtn_quantize(weight: torch.Tensor, cfg: QuantConfig, hessian: torch.Tensor | None = None) -> QuantResult:
    """weight: [out, in]. Per-group min-max grid, each weight rounded independently.

    With a Hessian, the reported loss is the same output error GPTQ reports; without one it is 0.
    """
    start = time.perf_counter()
    out_f, in_f = weight.shape
    group = in_f if cfg.group_size == -1 else cfg.group_size
    w = weight.float()
    wg = w.reshape(out_f, in_f // group, group)  # [out, groups, group]
    scale, zero = grid_params(wg.permute(1, 0, 2).reshape(-1, group), cfg.bits, cfg.sym)
    scale = scale.reshape(in_f // group, out_f)
    zero = zero.reshape(in_f // group, out_f)
    codes = quantize_codes(wg, scale.t().unsqueeze(-1), zero.t().unsqueeze(-1), cfg.maxq).reshape(out_f, in_f)
    result = QuantResult(
        codes=codes.to(torch.uint8),
        scales=scale.half(),
        zeros=zero.to(torch.int32),
        g_idx=(torch.arange(in_f, device=weight.device) // group).to(torch.int32),
        loss=0.0,
    )
    if hessian is not None:
        result.row_losses = row_output_errors(w, result.dequantize(), hessian)
        result.loss = float(result.row_losses.sum())
    result.seconds = time.perf_counter() - start
    return result
