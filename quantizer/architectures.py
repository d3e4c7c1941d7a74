"""Decoder-only families described as data: where the layers live and which projections form each
sequential group. A family whose layout differs gets its own `Architecture` entry in `ARCHITECTURES`."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from quantizer.errors import ConfigError

# q/k/v share the attention input, gate/up share the MLP input: each group shares one Hessian.
LLAMA_SEQUENTIAL: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


@dataclass(frozen=True)
class Architecture:
    model_type: str  # config.json `model_type`
    modeling_module: str  # transformers module that defines the classes below
    decoder_layer: str  # decoder layer class, built as cls(config, layer_idx)
    rotary_embedding: str  # rotary class, built as cls(config)
    norm: str  # RMSNorm class, built as cls(hidden_size, eps)
    sequential: tuple[tuple[str, ...], ...] = LLAMA_SEQUENTIAL
    mlp_in: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")  # rows padded by pad_intermediate_to
    mlp_out: str = "mlp.down_proj"  # columns padded by pad_intermediate_to
    layers_prefix: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"

    def cls(self, name: str) -> type:
        return getattr(importlib.import_module(self.modeling_module), name)

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_prefix}.{index}"

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(name for group in self.sequential for name in group)


def _transformers_family(model_type: str, prefix: str) -> Architecture:
    """A family laid out like Llama in transformers: `<Prefix>DecoderLayer` etc. in `modeling_<type>`."""
    return Architecture(
        model_type=model_type,
        modeling_module=f"transformers.models.{model_type}.modeling_{model_type}",
        decoder_layer=f"{prefix}DecoderLayer",
        rotary_embedding=f"{prefix}RotaryEmbedding",
        norm=f"{prefix}RMSNorm",
    )


ARCHITECTURES: dict[str, Architecture] = {
    arch.model_type: arch
    for arch in (
        _transformers_family("llama", "Llama"),
        _transformers_family("mistral", "Mistral"),
        _transformers_family("qwen2", "Qwen2"),
        _transformers_family("qwen3", "Qwen3"),
    )
}


def get_architecture(model_type: str) -> Architecture:
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            f"model_type {model_type!r} is not supported; supported decoder families: {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type]
