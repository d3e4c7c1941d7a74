"""Build one decoder layer (float or GPTQ-quantized) and the per-batch attention inputs it needs."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PretrainedConfig

from quantizer.architectures import Architecture
from quantizer.config import QuantConfig
from quantizer.moe import SparseMoe
from quantizer.packing import PackedLinear
from quantizer.qlinear import QuantLinear


def compute_config(config: PretrainedConfig, intermediate_size: int | None = None) -> PretrainedConfig:
    """A copy of the model config set up for layer-by-layer execution (SDPA attention, optional padded MLP)."""
    cfg = copy.deepcopy(config)
    cfg._attn_implementation = "sdpa"
    if intermediate_size is not None:
        cfg.intermediate_size = intermediate_size
    return cfg


def padded_intermediate(config: PretrainedConfig, multiple: int) -> int:
    size = int(config.intermediate_size)
    return size if multiple <= 0 else -(-size // multiple) * multiple


def pad_mlp(state: dict[str, torch.Tensor], arch: Architecture, size: int) -> dict[str, torch.Tensor]:
    """Zero-pad the MLP width of one layer's float tensors (keys relative to the layer) to `size`.

    Padded gate/up rows output 0, silu(0)·0 = 0, so the padded down columns see zeros: outputs unchanged.
    """
    out = dict(state)
    for name in arch.mlp_in:
        for suffix in ("weight", "bias"):
            key = f"{name}.{suffix}"
            if key in out and out[key].shape[0] < size:
                t = out[key]
                out[key] = torch.cat([t, t.new_zeros((size - t.shape[0],) + t.shape[1:])])
    key = f"{arch.mlp_out}.weight"
    t = out[key]
    if t.shape[1] < size:
        out[key] = torch.cat([t, t.new_zeros(t.shape[0], size - t.shape[1])], dim=1)
    return out


def empty_layer(arch: Architecture, config: PretrainedConfig, index: int) -> nn.Module:
    """Decoder layer `index` on the meta device; a sparse layer gets one module per expert (SparseMoe)."""
    with torch.device("meta"):
        layer = arch.cls(arch.decoder_layer)(config, index)
        if arch.is_sparse(config, index):
            layer.mlp = SparseMoe(arch.moe, config)
    return layer


def build_float_layer(arch: Architecture, config: PretrainedConfig, index: int,
                      state: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Decoder layer `index` from its float tensors (module names relative to the layer, taken out of `state`),
    without random init."""
    layer = empty_layer(arch, config, index)
    # tensor by tensor, dropping each source as it is converted: a bf16 layer computed in fp32 (CPU) then
    # peaks at its fp32 size, not fp32 + bf16 (15 GB instead of 10 GB for a Qwen3-235B-A22B layer)
    converted = {k: state.pop(k).to(device=device, dtype=dtype) for k in list(state)}
    layer.load_state_dict(converted, strict=True, assign=True)
    return layer.eval()


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def build_quantized_layer(arch: Architecture, config: PretrainedConfig, index: int,
                          tensors: dict[str, torch.Tensor], qcfg: QuantConfig, dtype: torch.dtype,
                          device: torch.device) -> nn.Module:
    """Decoder layer `index` with QuantLinear projections from GPTQ tensors (module names relative to the layer)."""
    layer = empty_layer(arch, config, index)
    linears = arch.linear_names(config, index)
    for name in linears:
        packed = PackedLinear(*(tensors[f"{name}.{k}"].to(device) for k in ("qweight", "qzeros", "scales", "g_idx")),
                              bits=qcfg.bits)
        bias = tensors.get(f"{name}.bias")
        bias = None if bias is None else bias.to(device)
        set_submodule(layer, name, QuantLinear.from_packed(packed, qcfg.group_size, bias))
    rest = {k: v.to(device=device, dtype=dtype) for k, v in tensors.items() if k.rpartition(".")[0] not in linears}
    layer.load_state_dict(rest, strict=False, assign=True)
    missing = [n for n, p in layer.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"layer {index} is missing tensors {missing}")
    return layer.eval()


class AttentionInputs:
    """Rotary embeddings, causal+padding masks and position ids for right-padded batches."""

    def __init__(self, arch: Architecture, config: PretrainedConfig, device: torch.device) -> None:
        self.rotary = arch.cls(arch.rotary_embedding)(config).to(device)

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor) -> dict:
        """hidden: [B, T, H], mask: [B, T] → kwargs for a decoder layer's forward."""
        b, t = mask.shape
        position_ids = torch.arange(t, device=hidden.device).unsqueeze(0).expand(b, t)
        causal = torch.ones(t, t, dtype=torch.bool, device=hidden.device).tril()
        attn_mask = causal[None, None] & mask.to(hidden.device)[:, None, None, :]  # [B, 1, T, T], True = attend
        return {
            "attention_mask": attn_mask,
            "position_ids": position_ids,
            "position_embeddings": self.rotary(hidden, position_ids),
        }
