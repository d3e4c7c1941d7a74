"""Load a float or GPTQ (v1) checkpoint into a transformers causal LM on our own QuantLinear."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from quantizer.config import QuantConfig
from quantizer.decoder import Architecture, load_config
from quantizer.errors import ConfigError
from quantizer.layer_builder import set_submodule
from quantizer.passes import expert_of
from quantizer.qlinear import QuantLinear


def quantization_config(model_dir: Path) -> dict:
    """The checkpoint's `quantization_config` ({} for a float checkpoint)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return config.get("quantization_config") or {}


def is_quantized(model_dir: Path) -> bool:
    return bool(quantization_config(model_dir))


def load_model(model_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """A causal LM ready for inference; GPTQ checkpoints get QuantLinear projections (experts one module each)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"{model_dir} has no config.json; pass a model directory")
    config = load_config(model_dir)
    if not is_quantized(model_dir):
        return AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=dtype).to(device).eval()
    qdict = dict(config.quantization_config)
    if qdict.get("checkpoint_format", qdict.get("format", "gptq")) != "gptq" or qdict.get("quant_method") != "gptq":
        raise ConfigError(f"{model_dir} is not a GPTQ v1 checkpoint (quantization_config: {qdict})")
    qcfg = QuantConfig.from_hf(qdict)
    del config.quantization_config
    shards = sorted(model_dir.glob("model*.safetensors"))
    names = []
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            names += list(f.keys())
    arch = Architecture(config, names)
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update({arch.names.to_module[k]: v for k, v in load_file(str(shard)).items()})
    for i in range(arch.num_layers):  # fused float tensors (none in our checkpoints) and Conv1D orientation
        prefix = arch.layer_prefix(i) + "."
        own = {k[len(prefix):]: state.pop(k) for k in list(state) if k.startswith(prefix)}
        state.update({prefix + k: v for k, v in arch.split_fused(i, own).items()})
    model = arch.model  # meta weights; rotary buffers computed for real. Its layers are replaced by ours:
    for i in range(arch.num_layers):
        layer, spec = arch.empty_layer(i), arch.spec(i)
        for name in arch.linear_names(i):  # experts dequantize per call: cached, they would all be float again
            old = layer.get_submodule(name)
            set_submodule(layer, name, QuantLinear(qcfg.bits, qcfg.group_size, old.in_features, old.out_features,
                                                   old.bias is not None, cache_weight=expert_of(name, spec) is None,
                                                   compute_dtype=dtype))
        set_submodule(model, arch.layer_prefix(i), layer)
    buffers = {name for name, _ in model.named_buffers()}
    quantized = {name for name, m in model.named_modules() if isinstance(m, QuantLinear)}  # scales/bias: fp16
    floats = {k: (v.to(dtype) if v.is_floating_point() and k.rpartition(".")[0] not in quantized and k not in buffers
                  else v) for k, v in state.items()}
    model.load_state_dict(floats, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if still_meta:
        raise ConfigError(f"{model_dir} is missing tensors {still_meta[:5]}; the checkpoint is incomplete")
    return model.to(device).eval()
