"""What quantizing one weight matrix produces, whatever the method."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from quantizer.transfer import tensor_from_state, tensor_state


@dataclass
class QuantResult:
    codes: torch.Tensor  # [out, in] uint8 integer codes, in the original column order
    scales: torch.Tensor  # [groups, out] float16
    zeros: torch.Tensor  # [groups, out] int32 true zero points (not the v1 zero−1)
    g_idx: torch.Tensor  # [in] int32 group of each input column
    loss: float  # mean squared output error per token, tr(ΔW·H·ΔWᵀ)/2 summed over rows
    seconds: float = 0.0
    cholesky_fallback: str = ""  # set when H needed float64 or extra dampening (GPTQ only)
    row_losses: torch.Tensor | None = None  # [out] each row's share of loss, when a Hessian was given

    def __reduce__(self):
        """Pickled with its tensors as arrays (`quantizer.transfer`): data-parallel workers send results to every
        worker each pass."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        tensors = {name: tensor_state(v) for name, v in values.items() if isinstance(v, torch.Tensor)}
        return _result_from_state, ({name: v for name, v in values.items() if name not in tensors}, tensors)

    def dequantize(self, rows: slice = slice(None)) -> torch.Tensor:
        """Reconstructed weight W_q = (q − zero)·scale: [out, in] float32 (or just `rows` of it). Groups in
        column order (g_idx = column // group size) broadcast per group; any other g_idx gathers each column's."""
        w = self.codes[rows].float()  # [rows, in], a new tensor: the rest is in place
        scale, zero = self.scales[:, rows].float().t(), self.zeros[:, rows].float().t()  # [rows, groups]
        g = self.g_idx.long()
        size = w.shape[1] // scale.shape[1]
        if size * scale.shape[1] == w.shape[1] and torch.equal(g, torch.arange(w.shape[1], device=g.device) // size):
            grouped = w.view(w.shape[0], scale.shape[1], size)
            grouped.sub_(zero.unsqueeze(2)).mul_(scale.unsqueeze(2))
            return w
        return w.sub_(zero.index_select(1, g)).mul_(scale.index_select(1, g))


def _result_from_state(values: dict, tensors: dict) -> QuantResult:
    return QuantResult(**values, **{name: tensor_from_state(state) for name, state in tensors.items()})


def output_error(w: torch.Tensor, w_q: torch.Tensor, hessian: torch.Tensor) -> float:
    """Σ_rows ΔW H ΔWᵀ / 2 with H = 2/n ΣXᵀX: the mean squared error of the layer's outputs per token."""
    return float(row_output_errors(w, w_q, hessian).sum())


def row_output_errors(w: torch.Tensor, w_q: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """[out]: each output's mean squared error per token, (ΔW H ΔWᵀ)_rr / 2, for w, w_q: [out, in]."""
    delta = (w.float() - w_q.float())
    return ((delta @ hessian.float()) * delta).sum(1) / 2
