"""Experts kept one module per expert, in place of transformers' fused experts.

transformers 5 stores a layer's experts as 3-D tensors behind one shared interface (`use_experts_implementation`:
`gate_up_proj` [E, 2·I, H] and `down_proj` [E, H, I], transposed in gpt_oss and Llama 4, with biases in gpt_oss).
GPTQ needs each expert's projections as their own modules (their own inputs, Hessians and packed tensors), as
Hub checkpoints store them. `ExpertList` holds experts `0 … E-1`, each with `gate_proj` / `up_proj` / `down_proj`
`nn.Linear`s (gate and up: the two halves of `gate_up_proj` in stored order), and computes exactly what the
family's eager experts forward computes — the family's own router and block stay as transformers wrote them.

Two call conventions exist:
- routed (the interface): `forward(hidden [N, H], top_k_index [N, k], top_k_weights [N, k])`, each expert on its
  routed tokens, outputs weighted by the router;
- scaled input (Llama 4): `forward(routed_in [E·N, H])`, expert e's rows already multiplied by its router score
  (zero for tokens not routed to it); outputs unweighted.

Experts whose weights are not loaded (a sparse layer's experts are streamed a chunk at a time) are skipped.
While calibrating, the engine sets `token_mask` (real tokens of the batch; padding reaches no expert), reads
`routed_tokens`, and may run experts on every real token (`every_token`) so their Hessians see the whole block
input while the block's output still follows the router.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from quantizer.errors import ConfigError

FUSED = ("gate_up_proj", "down_proj")


def is_fused_experts(module: nn.Module) -> bool:
    """A module holding a layer's experts as 3-D tensors (transformers' experts interface, or Llama 4's)."""
    params = dict(module.named_parameters(recurse=False))
    up = params.get("gate_up_proj", params.get("up_proj"))
    down = params.get("down_proj")
    return up is not None and down is not None and up.dim() == 3 and down.dim() == 3


class Expert(nn.Module):
    """One expert's projections: gate_proj (if gated), up_proj, down_proj."""

    def __init__(self, hidden: int, width: int, gated: bool, bias: bool) -> None:
        super().__init__()
        if gated:
            self.gate_proj = nn.Linear(hidden, width, bias=bias)
        self.up_proj = nn.Linear(hidden, width, bias=bias)
        self.down_proj = nn.Linear(width, hidden, bias=bias)


class ExpertList(nn.Module):
    """Experts `0 … E-1` as modules, computing the fused module's eager forward (see the module docstring)."""

    def __init__(self, fused: nn.Module) -> None:
        super().__init__()
        params = dict(fused.named_parameters(recurse=False))
        self.gated = "gate_up_proj" in params
        up = params["gate_up_proj" if self.gated else "up_proj"]
        down = params["down_proj"]
        self.num_experts = int(up.shape[0])
        # stored [E, out, in] unless transposed ([E, in, out]); the decorator says so, Llama 4 (undecorated) by shape
        flag = getattr(fused, "is_transposed", None)
        self.transposed = bool(flag) if flag is not None else down.shape[-1] != up.shape[-1 if self.gated else 1]
        self.hidden = int(down.shape[-1] if self.transposed else down.shape[1])
        self.width = int(down.shape[1] if self.transposed else down.shape[-1])
        self.biased = any(name.endswith("_bias") for name in params)
        arguments = [p for p in inspect.signature(fused.forward).parameters.values() if p.kind != p.VAR_KEYWORD]
        self.scaled_input = len(arguments) == 1  # Llama 4: forward(routed_in)
        if not self.scaled_input and len(arguments) != 3:
            raise ConfigError(f"{type(fused).__name__}.forward takes {[p.name for p in arguments]}; rayquant unfuses "
                              "experts called as (hidden_states, top_k_index, top_k_weights) or (routed_input)")
        for e in range(self.num_experts):
            self.add_module(str(e), Expert(self.hidden, self.width, self.gated, self.biased))
        # the fused module keeps what its gating reads (act_fn, gpt_oss's alpha and limit); its weights are gone
        for name in params:
            delattr(fused, name)
        object.__setattr__(self, "_gating", fused)
        self.token_mask: torch.Tensor | None = None  # [N] real tokens while calibrating; None = every row
        self.routed_tokens: torch.Tensor | None = None  # [E] tokens routed to each expert while calibrating
        self.every_token: frozenset[int] = frozenset()  # experts that also run on every real token (calibration)
        self.block_tokens: torch.Tensor | None = None  # [n, H] the block's real tokens (scaled-input experts)
        self.active: frozenset[int] | None = None  # experts that run (None: all); a pass over one chunk of experts

    def expert(self, e: int) -> Expert:
        return self._modules[str(e)]

    def loaded(self, e: int) -> bool:
        """Expert e runs: it is active (a pass over a chunk of experts runs only the chunk's) and has its weights
        (streamed experts not read yet stay on the meta device). The others' outputs are not needed while the
        chunk is calibrated."""
        if self.active is not None and e not in self.active:
            return False
        return not any(t.is_meta for t in self.expert(e).state_dict(keep_vars=True).values())

    def run_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """x: [n, H] → [n, H] through expert e, gated as the family gates (its `_apply_gate`)."""
        expert = self.expert(e)
        if self.gated:
            gate_up = torch.cat([expert.gate_proj(x), expert.up_proj(x)], dim=-1)
            inner = self._gating._apply_gate(gate_up) if hasattr(self._gating, "_apply_gate") else (
                self._gating.act_fn(gate_up[..., :self.width]) * gate_up[..., self.width:])
        else:
            inner = self._gating.act_fn(expert.up_proj(x))
        return expert.down_proj(inner)

    # ---- forward -----------------------------------------------------------------------------------
    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor | None = None,
                top_k_weights: torch.Tensor | None = None) -> torch.Tensor:
        if hidden.is_meta:
            return self._trace(hidden)
        if self.scaled_input:
            return self._scaled_forward(hidden)
        return self._routed_forward(hidden, top_k_index, top_k_weights)

    def _trace(self, hidden: torch.Tensor) -> torch.Tensor:
        """On the meta device (shape tracing): every expert on every row, each on its own view of the input
        (so that experts are told apart by their inputs)."""
        if self.scaled_input:
            rows = hidden.view(self.num_experts, -1, hidden.shape[-1])
            return torch.cat([self.run_expert(e, rows[e]) for e in range(self.num_experts)])
        return sum(self.run_expert(e, hidden.view_as(hidden)) for e in range(self.num_experts))

    def _real_rows(self, n: int, device: torch.device) -> torch.Tensor | None:
        """Indices of the real tokens among n rows, or None when every row is real (or no mask applies)."""
        mask = self.token_mask
        if mask is None or mask.numel() != n:
            return None
        return mask.reshape(-1).to(device).nonzero().squeeze(-1)

    def _count(self, hits: torch.Tensor) -> None:
        if self.token_mask is not None:
            self.routed_tokens = hits if self.routed_tokens is None else self.routed_tokens + hits

    def _routed_forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        real = self._real_rows(hidden.shape[0], hidden.device)
        if real is not None:  # padding is routed nowhere: its rows of the output stay zero
            keep = torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)
            keep[real] = True
            top_k_index = torch.where(keep[:, None], top_k_index, self.num_experts)
        expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
        hits = expert_mask[: self.num_experts].sum(dim=(1, 2))
        self._count(hits)
        everything = real if real is not None else torch.arange(hidden.shape[0], device=hidden.device)
        for e in range(self.num_experts):
            if (hits[e] == 0 and e not in self.every_token) or not self.loaded(e):
                continue
            top_k_pos, token_idx = torch.where(expert_mask[e])
            if e in self.every_token:  # its Hessians see every real token; the output keeps the routed ones
                y = self._gather(self.run_expert(e, hidden[everything]), everything, token_idx, hidden.shape[0])
            else:
                y = self.run_expert(e, hidden[token_idx])
            y = y * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    @staticmethod
    def _gather(y: torch.Tensor, rows: torch.Tensor, wanted: torch.Tensor, n: int) -> torch.Tensor:
        """y: outputs for `rows` (ascending indices among n) → the outputs for `wanted` (a subset of rows)."""
        position = torch.full((n,), -1, dtype=torch.long, device=rows.device)
        position[rows] = torch.arange(rows.numel(), device=rows.device)
        return y[position[wanted]]

    def _scaled_forward(self, routed_in: torch.Tensor) -> torch.Tensor:
        x = routed_in.view(self.num_experts, -1, routed_in.shape[-1])  # [E, N, H]
        out = torch.zeros_like(x)
        real = self._real_rows(x.shape[1], x.device)
        routed = x.ne(0).any(dim=-1)  # [E, N]: a token not routed to expert e reaches it as a row of zeros
        if real is not None:
            keep = torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)
            keep[real] = True
            routed &= keep
        hits = routed.sum(dim=1)
        self._count(hits)
        for e in range(self.num_experts):
            if not self.loaded(e):
                continue
            if e in self.every_token and self.block_tokens is not None:
                self.run_expert(e, self.block_tokens)  # Hessians only: the output follows the router
            rows = routed[e].nonzero().squeeze(-1)
            if rows.numel():
                out[e, rows] = self.run_expert(e, x[e, rows]).to(out.dtype)
        return out.view(-1, routed_in.shape[-1])


def unfuse_tensors(fused: dict[str, torch.Tensor], transposed: bool) -> dict[str, torch.Tensor]:
    """A fused experts module's tensors ({"gate_up_proj": [E, 2I, H], "down_proj": …, optional "*_bias"}) →
    per-expert tensors named as in ExpertList ("3.gate_proj.weight", …); gate and up are the two halves of
    gate_up_proj along its output dimension, in stored order."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in fused.items():
        bias = name.endswith("_bias")
        proj = name.removesuffix("_bias")
        for e in range(tensor.shape[0]):
            t = tensor[e]
            if not bias and transposed:
                t = t.t()
            t = t.contiguous()
            suffix = "bias" if bias else "weight"
            if proj == "gate_up_proj":
                gate, up = t.chunk(2, dim=0)
                out[f"{e}.gate_proj.{suffix}"], out[f"{e}.up_proj.{suffix}"] = gate.contiguous(), up.contiguous()
            else:
                out[f"{e}.{proj}.{suffix}"] = t
    return out
