"""Decoder-only families described as data: where the layers live, which projections form each sequential
group, and, for mixture-of-experts families, where the experts sit and how the router picks them.

Names of projections are *module* names relative to a decoder layer (how our built layers are addressed);
a family that stores some modules under another prefix on disk (Mixtral: `block_sparse_moe`) maps them
with `to_disk` / `from_disk`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from quantizer.errors import ConfigError

# q/k/v share the attention input, gate/up share the MLP input: each unit shares one Hessian.
Unit = tuple[str, ...]  # projections solved as one stacked weight (they see the same input)
ATTENTION_UNITS: tuple[Unit, ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
)
DENSE_MLP_UNITS: tuple[Unit, ...] = (("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
LLAMA_SEQUENTIAL: tuple[Unit, ...] = ATTENTION_UNITS + DENSE_MLP_UNITS


@dataclass(frozen=True)
class MoeLayout:
    """A family's sparse block: experts kept one module each (gate/up/down), a float router, and an
    optional shared expert with its own float gate (Qwen2-MoE)."""

    disk_block: str = "mlp"  # the block's prefix on disk (Mixtral: block_sparse_moe); in modules it is `mlp`
    gate_proj: str = "gate_proj"  # per-expert projection names (Mixtral: w1 / w3 / w2)
    up_proj: str = "up_proj"
    down_proj: str = "down_proj"
    router: str = "gate"  # [num_experts, hidden] weight, stays float
    shared_expert: str | None = None  # a dense MLP every token goes through (gate_proj / up_proj / down_proj)
    shared_expert_gate: str | None = None  # [1, hidden] sigmoid gate of the shared expert, stays float
    intermediate_key: str = "moe_intermediate_size"  # config key of an expert's width
    norm_topk_key: str | None = "norm_topk_prob"  # config key; None = top-k weights always renormalised
    topk_weights_in_logits_dtype: bool = True  # Qwen casts the top-k weights back; Mixtral keeps float32
    every_layer_sparse: bool = False  # Mixtral; Qwen: decoder_sparse_step and mlp_only_layers decide

    def num_experts(self, config) -> int:
        value = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
        if not value:
            raise ConfigError("the model config names no expert count (num_experts or num_local_experts)")
        return int(value)

    def expert_width(self, config) -> int:
        return int(getattr(config, self.intermediate_key))

    def norm_topk(self, config) -> bool:
        return True if self.norm_topk_key is None else bool(getattr(config, self.norm_topk_key, False))

    def is_sparse(self, config, index: int) -> bool:
        if self.every_layer_sparse:
            return True
        step = int(getattr(config, "decoder_sparse_step", 1) or 1)
        return index not in (getattr(config, "mlp_only_layers", None) or []) and (index + 1) % step == 0

    def expert(self, e: int) -> str:
        return f"mlp.experts.{e}"

    def units(self, config) -> tuple[tuple[Unit, ...], tuple[Unit, ...]]:
        """(units that read the block's input, units that read an expert's own intermediate)."""
        experts = range(self.num_experts(config))
        first = [(f"{self.expert(e)}.{self.gate_proj}", f"{self.expert(e)}.{self.up_proj}") for e in experts]
        second = [(f"{self.expert(e)}.{self.down_proj}",) for e in experts]
        if self.shared_expert:
            first.append((f"mlp.{self.shared_expert}.gate_proj", f"mlp.{self.shared_expert}.up_proj"))
            second.append((f"mlp.{self.shared_expert}.down_proj",))
        return tuple(first), tuple(second)


@dataclass(frozen=True)
class Architecture:
    model_type: str  # config.json `model_type`
    modeling_module: str  # transformers module that defines the classes below
    decoder_layer: str  # decoder layer class, built as cls(config, layer_idx)
    rotary_embedding: str  # rotary class, built as cls(config)
    norm: str  # RMSNorm class, built as cls(hidden_size, eps)
    sequential: tuple[Unit, ...] = LLAMA_SEQUENTIAL  # the units of a dense layer, in execution order
    mlp_in: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")  # rows padded by pad_intermediate_to
    mlp_out: str = "mlp.down_proj"  # columns padded by pad_intermediate_to
    layers_prefix: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    moe: MoeLayout | None = None

    def cls(self, name: str) -> type:
        return getattr(importlib.import_module(self.modeling_module), name)

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_prefix}.{index}"

    def is_sparse(self, config, index: int) -> bool:
        return self.moe is not None and self.moe.is_sparse(config, index)

    def layer_units(self, config, index: int) -> tuple[tuple[Unit, ...], ...]:
        """The sequential groups of layer `index` (each a tuple of units), in execution order. A dense layer's
        groups hold one unit each; a sparse layer's expert groups hold one unit per expert."""
        if not self.is_sparse(config, index):
            return tuple((unit,) for unit in self.sequential)
        first, second = self.moe.units(config)
        return tuple((unit,) for unit in ATTENTION_UNITS) + (first, second)

    def linear_names(self, config, index: int) -> tuple[str, ...]:
        """Module names of the projections quantized in layer `index`."""
        return tuple(name for group in self.layer_units(config, index) for unit in group for name in unit)

    def float_names(self, config, index: int) -> tuple[str, ...]:
        """Module names of the float modules of a sparse layer that stay float (router, shared-expert gate)."""
        if not self.is_sparse(config, index):
            return ()
        names = [f"mlp.{self.moe.router}"]
        if self.moe.shared_expert_gate:
            names.append(f"mlp.{self.moe.shared_expert_gate}")
        return tuple(names)

    def to_disk(self, name: str) -> str:
        """A module-space name relative to a layer → its name on disk."""
        if self.moe and self.moe.disk_block != "mlp" and name.startswith("mlp."):
            return f"{self.moe.disk_block}.{name[4:]}"
        return name

    def from_disk(self, name: str) -> str:
        if self.moe and self.moe.disk_block != "mlp" and name.startswith(self.moe.disk_block + "."):
            return f"mlp.{name[len(self.moe.disk_block) + 1:]}"
        return name


def _transformers_family(model_type: str, prefix: str, moe: MoeLayout | None = None) -> Architecture:
    """A family laid out like Llama in transformers: `<Prefix>DecoderLayer` etc. in `modeling_<type>`."""
    return Architecture(
        model_type=model_type,
        modeling_module=f"transformers.models.{model_type}.modeling_{model_type}",
        decoder_layer=f"{prefix}DecoderLayer",
        rotary_embedding=f"{prefix}RotaryEmbedding",
        norm=f"{prefix}RMSNorm",
        moe=moe,
    )


ARCHITECTURES: dict[str, Architecture] = {
    arch.model_type: arch
    for arch in (
        _transformers_family("llama", "Llama"),
        _transformers_family("mistral", "Mistral"),
        _transformers_family("qwen2", "Qwen2"),
        _transformers_family("qwen3", "Qwen3"),
        _transformers_family("qwen3_moe", "Qwen3Moe", MoeLayout()),
        _transformers_family("qwen2_moe", "Qwen2Moe", MoeLayout(shared_expert="shared_expert",
                                                                 shared_expert_gate="shared_expert_gate")),
        _transformers_family("mixtral", "Mixtral", MoeLayout(
            disk_block="block_sparse_moe", gate_proj="w1", up_proj="w3", down_proj="w2",
            intermediate_key="intermediate_size", norm_topk_key=None, topk_weights_in_logits_dtype=False,
            every_layer_sparse=True)),
    )
}

# Families people ask for that need more than a layout entry: what is missing, for the error message.
NOT_YET = {
    "deepseek_v2": "multi-head latent attention (q_a_proj / kv_a_proj_with_mqa low-rank projections) and "
                   "group-limited routing with shared experts",
    "deepseek_v3": "multi-head latent attention (q_a_proj / kv_a_proj_with_mqa low-rank projections) and "
                   "sigmoid routing with a score-correction bias and shared experts",
    "deepseek_v32": "multi-head latent attention with sparse indexing and sigmoid routing",
    "glm4_moe": "sigmoid routing with a score-correction bias and shared experts",
    "olmoe": "a q/k norm over the whole projection (not per head) in a MoE block",
    "gpt_oss": "biased expert projections with a clamped SwiGLU and attention sinks",
}


def get_architecture(model_type: str) -> Architecture:
    if model_type in NOT_YET:
        raise ConfigError(
            f"model_type {model_type!r} is not supported yet: rayquant has no layout for its {NOT_YET[model_type]}; "
            f"supported families: {', '.join(ARCHITECTURES)}"
        )
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            f"model_type {model_type!r} is not supported; supported decoder families: {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type]
