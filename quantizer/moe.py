"""A sparse mixture-of-experts block with one module per expert, in place of transformers' fused experts.

transformers 5 keeps a layer's experts as two 3-D tensors; GPTQ needs each expert's projections as their
own modules (their own inputs, Hessians and packed tensors), and checkpoints on the Hub store them so.
`SparseMoe` routes exactly as the family's block does (softmax over the router's logits, top-k, optional
renormalisation) and, when calibrating:

- runs on the batch's real tokens only (`token_mask`; padding never reaches an expert's Hessian),
- counts the tokens routed to each expert (`routed_tokens`),
- runs the experts in `all_token_experts` (every one, with `all_experts`) on every token — so their
  Hessians see the whole layer input — while the block's output still sums only the routed experts,
  weighted by the router, so later layers see the model's real activations.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from quantizer.architectures import MoeLayout


class ExpertMLP(nn.Module):
    """down(act(gate(x)) · up(x)) with the family's projection names."""

    def __init__(self, hidden: int, width: int, act: str, names: tuple[str, str, str]) -> None:
        super().__init__()
        self.names = names  # (gate, up, down)
        for name, shape in zip(names, ((width, hidden), (width, hidden), (hidden, width))):
            setattr(self, name, nn.Linear(shape[1], shape[0], bias=False))
        self.act = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act(gate(x)) * up(x))


class SparseMoe(nn.Module):
    def __init__(self, layout: MoeLayout, config) -> None:
        super().__init__()
        hidden, act = int(config.hidden_size), config.hidden_act
        self.num_experts = layout.num_experts(config)
        self.top_k = int(config.num_experts_per_tok)
        self.norm_topk = layout.norm_topk(config)
        self.weights_in_logits_dtype = layout.topk_weights_in_logits_dtype
        setattr(self, layout.router, nn.Linear(hidden, self.num_experts, bias=False))
        self.router_name = layout.router
        names = (layout.gate_proj, layout.up_proj, layout.down_proj)
        self.experts = nn.ModuleList(ExpertMLP(hidden, layout.expert_width(config), act, names)
                                     for _ in range(self.num_experts))
        self.shared_name, self.shared_gate_name = layout.shared_expert, layout.shared_expert_gate
        if layout.shared_expert:
            width = int(config.shared_expert_intermediate_size)
            setattr(self, layout.shared_expert, ExpertMLP(hidden, width, act, ("gate_proj", "up_proj", "down_proj")))
            setattr(self, layout.shared_expert_gate, nn.Linear(hidden, 1, bias=False))
        self.all_experts = False  # calibration: every expert runs on every token (outputs still routed)
        self.all_token_experts: frozenset[int] = frozenset()  # calibration: these experts run on every token
        self.token_mask: torch.Tensor | None = None  # [B, T] real tokens while calibrating; None = all
        self.routed_tokens: torch.Tensor | None = None  # [E] tokens routed to each expert while calibrating

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N, H] → (weights [N, k], experts [N, k]) as the family's router computes them."""
        logits = getattr(self, self.router_name)(x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, selected = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights.to(logits.dtype) if self.weights_in_logits_dtype else weights), selected

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, T, H] → [B, T, H]. With a token mask, padding positions get zeros from the block."""
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        rows = None
        if self.token_mask is not None:
            rows = self.token_mask.reshape(-1).nonzero().squeeze(-1).to(x.device)
            x = x[rows]
        out = self._experts(x) + self._shared(x)
        if rows is not None:
            out = torch.zeros(shape[0] * shape[1], shape[-1], dtype=out.dtype, device=out.device).index_copy_(
                0, rows, out)
        return out.reshape(shape)

    def _experts(self, x: torch.Tensor) -> torch.Tensor:
        weights, selected = self.route(x)
        out = torch.zeros_like(x)
        hit = torch.bincount(selected.reshape(-1), minlength=self.num_experts)
        if self.token_mask is not None:
            self.routed_tokens = hit if self.routed_tokens is None else self.routed_tokens + hit
        for e, expert in enumerate(self.experts):
            everything = self.all_experts or e in self.all_token_experts
            if hit[e] == 0 and not everything:
                continue
            top_k_pos, token_idx = torch.where((selected == e).T)
            if everything:
                y = expert(x)[token_idx]
            else:
                y = expert(x[token_idx])
            out.index_add_(0, token_idx, (y * weights[token_idx, top_k_pos, None]).to(out.dtype))
        return out

    def _shared(self, x: torch.Tensor) -> torch.Tensor | float:
        if self.shared_name is None:
            return 0.0
        gate = torch.sigmoid(getattr(self, self.shared_gate_name)(x))
        return gate * getattr(self, self.shared_name)(x)
