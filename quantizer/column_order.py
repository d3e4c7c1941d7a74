"""The order in which GPTQ quantizes input columns.

- natural: columns in index order;
- act-order (`desc_act`): by decreasing Hessian diagonal, so the most active inputs are fixed first
  while the most columns are left to absorb their error; groups then scatter over the columns, so
  the checkpoint needs `g_idx` and the kernel a gather;
- group-aware (`act_group_aware`, Gafni et al., 2025, "Dual Precision Quantization for Efficient and
  Accurate Deep Neural Networks Inference"): groups keep their original contiguous columns, but are
  solved in order of their largest diagonal entry, each group's columns by decreasing diagonal. Most
  of act-order's gain at no inference cost: the checkpoint stays a plain `desc_act=False` one.
"""

from __future__ import annotations

import torch

from quantizer.config import QuantConfig


def column_order(diag: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """diag: [in] Hessian diagonal. Returns (perm, group_order).

    perm[k] is the input column solved k-th (None: natural order); group_order[k] is the original group
    solved k-th when the order is group-aware (None otherwise).
    """
    if cfg.desc_act:
        return torch.argsort(diag, descending=True, stable=True), None
    group = cfg.group_size
    if not cfg.act_group_aware or group == -1 or diag.numel() % group != 0:
        return None, None
    by_group = diag.view(-1, group)  # [groups, group]
    within = torch.argsort(by_group, dim=1, descending=True, stable=True)
    group_order = torch.argsort(by_group.max(dim=1).values, descending=True, stable=True)
    offsets = torch.arange(by_group.shape[0], device=diag.device).unsqueeze(1) * group
    return (within + offsets)[group_order].reshape(-1), group_order
