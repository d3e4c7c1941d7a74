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
        """Reconstructed weight W_q: [out, in] float32 (or just `rows` of it)."""
        g = self.g_idx.long()
        scale = self.scales[:, rows].float().t().contiguous().index_select(1, g)  # [rows, in]
        zero = self.zeros[:, rows].float().t().contiguous().index_select(1, g)
        return (self.codes[rows].float() - zero).mul_(scale)


def _result_from_state(values: dict, tensors: dict) -> QuantResult:
    return QuantResult(**values, **{name: tensor_from_state(state) for name, state in tensors.items()})


def output_error(w: torch.Tensor, w_q: torch.Tensor, hessian: torch.Tensor) -> float:
    """Σ_rows ΔW H ΔWᵀ / 2 with H = 2/n ΣXᵀX: the mean squared error of the layer's outputs per token."""
    return float(row_output_errors(w, w_q, hessian).sum())


def row_output_errors(w: torch.Tensor, w_q: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """[out]: each output's mean squared error per token, (ΔW H ΔWᵀ)_rr / 2, for w, w_q: [out, in]."""
    delta = (w.float() - w_q.float())
    return ((delta @ hessian.float()) * delta).sum(1) / 2
