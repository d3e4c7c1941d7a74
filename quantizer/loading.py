"""Load a float or GPTQ (v1) checkpoint into a transformers causal LM on our own QuantLinear."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from quantizer.architectures import get_architecture
from quantizer.config import QuantConfig
from quantizer.errors import ConfigError
from quantizer.layer_builder import set_submodule
from quantizer.moe import SparseMoe
from quantizer.qlinear import QuantLinear


def quantization_config(model_dir: Path) -> dict:
    """The checkpoint's `quantization_config` ({} for a float checkpoint)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return config.get("quantization_config") or {}


def is_quantized(model_dir: Path) -> bool:
    return bool(quantization_config(model_dir))


def module_name(arch, name: str) -> str:
    """A full tensor name on disk → its name in our modules (Mixtral's block_sparse_moe → mlp)."""
    prefix = arch.layers_prefix + "."
    if not name.startswith(prefix):
        return name
    index, _, local = name[len(prefix):].partition(".")
    return f"{prefix}{index}.{arch.from_disk(local)}"


def load_model(model_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """A causal LM ready for inference; GPTQ checkpoints get QuantLinear projections."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"{model_dir} has no config.json; pass a model directory")
    if not is_quantized(model_dir):
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    config = AutoConfig.from_pretrained(model_dir)
    qdict = dict(config.quantization_config)
    if qdict.get("checkpoint_format", qdict.get("format", "gptq")) != "gptq" or qdict.get("quant_method") != "gptq":
        raise ConfigError(f"{model_dir} is not a GPTQ v1 checkpoint (quantization_config: {qdict})")
    qcfg = QuantConfig.from_hf(qdict)
    del config.quantization_config
    config._attn_implementation = "sdpa"
    arch = get_architecture(config.model_type)
    with init_empty_weights(include_buffers=False):  # parameters on meta; rotary buffers computed for real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        for i in range(config.num_hidden_layers):  # sparse blocks: one module per expert, as on disk
            if arch.is_sparse(config, i):
                model.get_submodule(arch.layer_prefix(i)).mlp = SparseMoe(arch.moe, config).to(dtype)
    for i in range(config.num_hidden_layers):
        for name in arch.linear_names(config, i):
            full = f"{arch.layer_prefix(i)}.{name}"
            old = model.get_submodule(full)
            set_submodule(model, full, QuantLinear(qcfg.bits, qcfg.group_size, old.in_features, old.out_features,
                                                   old.bias is not None))
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob("model*.safetensors")):
        state.update({module_name(arch, k): v for k, v in load_file(str(shard)).items()})
    floats = {k: (v.to(dtype) if v.is_floating_point() and not k.endswith((".scales", ".bias")) else v)
              for k, v in state.items()}
    model.load_state_dict(floats, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if still_meta:
        raise ConfigError(f"{model_dir} is missing tensors {still_meta[:5]}; the checkpoint is incomplete")
    return model.to(device).eval()
