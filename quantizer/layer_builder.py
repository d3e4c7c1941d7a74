"""Build one decoder layer, float or GPTQ-quantized, from its tensors (named as in its modules)."""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn
from transformers import PretrainedConfig

from quantizer.config import QuantConfig
from quantizer.decoder import Architecture
from quantizer.errors import ConfigError
from quantizer.packing import PackedLinear
from quantizer.passes import expert_of
from quantizer.qlinear import QuantLinear

DENSE_MLP_IN = ("mlp.gate_proj", "mlp.up_proj")  # rows padded by pad_intermediate_to
DENSE_MLP_OUT = "mlp.down_proj"  # columns padded by pad_intermediate_to


def compute_config(config: PretrainedConfig, intermediate_size: int | None = None) -> PretrainedConfig:
    """A copy of the model config with the MLP width padded to `intermediate_size` (None: unchanged)."""
    cfg = copy.deepcopy(config)
    if intermediate_size is not None:
        cfg.intermediate_size = intermediate_size
    return cfg


def mlp_width(config: PretrainedConfig) -> int:
    """The dense MLP's width (intermediate_size); the widest where the family sets one per layer (Gemma 3n)."""
    size = getattr(config, "intermediate_size", 0) or 0
    return int(max(size)) if isinstance(size, (list, tuple)) else int(size)


def padded_intermediate(config: PretrainedConfig, multiple: int) -> int:
    """The dense MLP's width padded up to a multiple of `multiple` (≤ 0: unpadded)."""
    if multiple > 0 and isinstance(getattr(config, "intermediate_size", 0), (list, tuple)):
        raise ConfigError(f"pad_intermediate_to needs one intermediate_size; {config.model_type} sets one per layer: "
                          "leave pad_intermediate_to at 0")
    size = mlp_width(config)
    return size if multiple <= 0 else -(-size // multiple) * multiple


def compute_architecture(reader, qcfg: QuantConfig) -> Architecture:
    """The model as the stages build it from `reader` (a CheckpointReader): the reader's, or with the dense MLP
    padded (pad_intermediate_to)."""
    width = padded_intermediate(reader.config, qcfg.pad_intermediate_to)
    if width == mlp_width(reader.config):
        return reader.arch
    return Architecture(compute_config(reader.config, width), reader.tensors)


def pad_mlp(state: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """Zero-pad the dense MLP width of one layer's float tensors (keys relative to the layer) to `size`.

    Padded gate/up rows output 0, silu(0)·0 = 0, so the padded down columns see zeros: outputs unchanged.
    """
    out = dict(state)
    for name in DENSE_MLP_IN:
        for suffix in ("weight", "bias"):
            key = f"{name}.{suffix}"
            if key in out and out[key].shape[0] < size:
                t = out[key]
                out[key] = torch.cat([t, t.new_zeros((size - t.shape[0],) + t.shape[1:])])
    key = f"{DENSE_MLP_OUT}.weight"
    t = out[key]
    if t.shape[1] < size:
        out[key] = torch.cat([t, t.new_zeros(t.shape[0], size - t.shape[1])], dim=1)
    return out


def _buffer_dtypes(layer: nn.Module) -> dict[str, torch.dtype]:
    """Persistent buffers keep the dtype the model declares (DeepSeek's fp32 score-correction bias)."""
    return {name: buf.dtype for name, buf in layer.named_buffers()}


def build_float_layer(arch: Architecture, index: int, state: dict[str, torch.Tensor], dtype: torch.dtype,
                      device: torch.device, absent: Callable[[str], bool] | None = None) -> nn.Module:
    """Decoder layer `index` from its float tensors (taken out of `state`), without random init. Tensors that
    `absent` accepts may be missing: they stay on the meta device until `load_float` fills them (streamed experts)."""
    layer = arch.empty_layer(index)
    load_float(layer, state, dtype, device)
    missing = [name for name, t in layer.state_dict(keep_vars=True).items()
               if t.is_meta and not (absent and absent(name))]
    if missing:
        raise ValueError(f"layer {index} is missing tensors {missing[:5]}")
    return layer.eval()


def load_float(module: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device) -> None:
    """Assign float tensors (names relative to `module`, taken out of `state`) in the compute dtype; persistent
    buffers keep their declared dtype. Tensor by tensor, dropping each source as it is converted: a bf16 layer
    computed in fp32 (CPU) then peaks at its fp32 size, not fp32 + bf16."""
    buffers = _buffer_dtypes(module)
    converted = {k: state.pop(k).to(device=device, dtype=buffers.get(k, dtype)) for k in list(state)}
    unexpected = module.load_state_dict(converted, strict=False, assign=True).unexpected_keys
    if unexpected:
        raise ValueError(f"unexpected tensors {unexpected[:5]}")


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def quantized_linear(tensors: dict[str, torch.Tensor], name: str, qcfg: QuantConfig, dtype: torch.dtype,
                     device: torch.device, cache_weight: bool = True) -> QuantLinear:
    """The QuantLinear of projection `name` from its GPTQ tensors (`name.qweight`, …, optional `name.bias`);
    `cache_weight=False` dequantizes on every call instead of keeping the float weight (experts: a DeepSeek-V3
    layer's dequantized experts are 45 GB in fp32)."""
    packed = PackedLinear(*(tensors[f"{name}.{k}"].to(device) for k in ("qweight", "qzeros", "scales", "g_idx")),
                          bits=qcfg.bits)
    bias = tensors.get(f"{name}.bias")
    quantized = QuantLinear.from_packed(packed, qcfg.group_size, None if bias is None else bias.to(device))
    quantized.compute_dtype = dtype
    quantized.cache_weight = cache_weight
    return quantized


def build_quantized_layer(arch: Architecture, index: int, tensors: dict[str, torch.Tensor], qcfg: QuantConfig,
                          dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Decoder layer `index` with QuantLinear projections from GPTQ tensors (module names relative to the layer)."""
    layer = arch.empty_layer(index)
    buffers = _buffer_dtypes(layer)
    linears = arch.linear_names(index)
    spec = arch.spec(index)
    for name in linears:  # experts dequantize per call: cached, a sparse layer's experts would all be float again
        set_submodule(layer, name, quantized_linear(tensors, name, qcfg, dtype, device,
                                                    cache_weight=expert_of(name, spec) is None))
    rest = {k: v.to(device=device, dtype=buffers.get(k, dtype)) for k, v in tensors.items()
            if k.rpartition(".")[0] not in linears}
    layer.load_state_dict(rest, strict=False, assign=True)
    missing = [n for n, p in layer.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"layer {index} is missing tensors {missing}")
    return layer.eval()
