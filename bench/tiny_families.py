"""Tiny random instances of transformers' decoder-only families, built from each family's own config class.

`tiny_config(model_type)` starts from the config class's defaults and shrinks every size it knows (hidden,
heads, experts, low ranks, …) while keeping each kind of layer the family has (one layer per distinct
layer type, dense and sparse). Used by the coverage bench and the per-family tests.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.pytorch_utils import Conv1D

log = logging.getLogger(__name__)

HIDDEN = 64
# Config keys → tiny values, set where the family's config has the key. Every projection then has inputs
# that are multiples of 32 (group size 32, GPTQ packing) and outputs that are multiples of 8.
SIZES: dict[str, object] = {
    "hidden_size": HIDDEN, "intermediate_size": 128, "intermediate_size_mlp": 128, "ffn_hidden_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "attention_head_dim": 16,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64, "expert_intermediate_size": 32,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_k": 2, "n_shared_experts": 1, "moe_num_shared_experts": 1, "num_shared_experts": 1,
    "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "moe_layer_start_index": 1,
    "kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 16,
    "rotary_dim": 16, "partial_rotary_factor": 1.0,
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 8,
    "max_position_embeddings": 512, "sliding_window": 16, "attention_chunk_size": 16,
    "state_size": 16, "mamba_d_state": 16, "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_n_groups": 1,
    "moe_shared_expert_intermediate_size": 64, "gated_norm_rank": 32,
    "ssm_state_size": 16, "n_groups": 1, "mamba_expand": 2, "expand": 2, "time_step_rank": 16, "mamba_dt_rank": 16,
}
# Families whose config defaults leave a size unset (None) that the tiny instance needs
OVERRIDES: dict[str, dict[str, object]] = {
    "deepseek_v2": {"num_experts_per_tok": 2},
    "dots1": {"n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2},
    "hunyuan_v1_dense": {"head_dim": 16}, "hunyuan_v1_moe": {"head_dim": 16}, "ministral": {"head_dim": 16},
    "nemotron": {"num_key_value_heads": 2, "head_dim": 16},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "falcon_h1": {"mamba_d_ssm": 128}, "mamba2": {"num_heads": 8, "head_dim": 16, "n_groups": 1},
    "zamba": {"attn_layer_period": 2, "attn_layer_offset": 1}, "zaya": {"num_experts_per_tok": 1},
    "xlnet": {"d_head": 16},
    # per-head gates and time steps: a real model has 8+ heads, so their projections pack
    "doge": {"num_attention_heads": 8, "num_key_value_heads": 8}, "laguna": {"num_attention_heads": 8},
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "gemma3n_text": {"num_kv_shared_layers": 0, "vocab_size_per_layer_input": 1024},
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 16,
                       "indexer_compress_ratio": 4},
}


def decoder_only_families() -> dict[str, str]:
    """{model_type: causal-LM class name} of transformers' decoder-only text families: the causal-LM mapping
    less encoder-decoders, multimodal wrappers (configs with sub-configs of other modalities) and encoders that
    only act as decoders when their config's `is_decoder` is set (BERT and its kin)."""
    out = {}
    for model_type, cls_name in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = CONFIG_MAPPING[model_type]()
        except Exception:  # noqa: BLE001 - a config that cannot be built with defaults is not a text LM we can test
            continue
        if getattr(config, "is_encoder_decoder", False):
            continue
        subs = set(getattr(config, "sub_configs", {}) or {})
        if subs & {"text_config", "vision_config", "audio_config", "encoder_config", "decoder_config",
                   "audio_encoder_config", "vq_config", "patcher_config"}:
            continue
        if "is_decoder" in vars(config) and not config.is_decoder:  # an encoder unless told to decode
            continue
        out[model_type] = cls_name
    return out


def _layer_lists(base: PretrainedConfig, n: int) -> tuple[dict[str, list], dict[str, list]]:
    """(per-layer lists, layer-index lists) among the config's attributes, for a model of n layers."""
    per_layer, index_lists = {}, {}
    for key, value in vars(base).items():
        if not isinstance(value, list) or not key.endswith(("layers", "types", "block_type", "pattern")):
            continue
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        if ints and value and all(0 <= v < n for v in value) and all(a < b for a, b in zip(value, value[1:])):
            index_lists[key] = value
        elif len(value) == n:
            per_layer[key] = value
        elif ints and not value:
            index_lists[key] = value
    return per_layer, index_lists


def tiny_config(model_type: str, layers: int = 2, vocab_size: int | None = None, **extra) -> PretrainedConfig:
    """The family's config at tiny sizes, with at least one layer of every kind it has (at least `layers`)."""
    cls = CONFIG_MAPPING[model_type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = cls()
    n = int(getattr(base, "num_hidden_layers", 0) or 0)
    settable = [k for k in SIZES if not isinstance(getattr(cls, k, None), property)]
    kw = {k: SIZES[k] for k in settable if getattr(base, k, None) is not None}
    per_layer, index_lists = _layer_lists(base, n) if n else ({}, {})
    index_sets = {k: set(v) for k, v in index_lists.items()}
    signature = [tuple([per_layer[k][i] for k in per_layer] + [i in index_sets[k] for k in index_sets])
                 for i in range(n)]
    first_k = int(getattr(base, "first_k_dense_replace", 0) or 0)
    if first_k:  # DeepSeek-style dense prefix: one dense layer (kw sets first_k_dense_replace 1), then sparse ones
        signature = [(s, i < first_k) for i, s in enumerate(signature)]
    chosen: list[int] = []
    for i in range(n):
        if signature[i] not in {signature[j] for j in chosen}:
            chosen.append(i)
    for i in range(n):
        if len(chosen) >= layers:
            break
        if i not in chosen:
            chosen.append(i)
    chosen.sort()
    if first_k and chosen:  # keep the dense prefix first: layer 0 dense, the rest sparse
        chosen = [0] + [i for i in chosen if i >= first_k][: max(len(chosen) - 1, 1)]
    count = len(chosen) or layers
    kw["num_hidden_layers"] = count
    for key, values in per_layer.items():
        kw[key] = [values[i] for i in chosen]
    for key, values in index_lists.items():
        kw[key] = [pos for pos, i in enumerate(chosen) if i in index_sets[key]]
    if getattr(base, "moe_layer_end_index", None) is not None:
        kw["moe_layer_end_index"] = count - 1
    if "kv_lora_rank" in kw:  # multi-head latent attention: every head has its own keys
        kw["num_key_value_heads"] = kw["num_attention_heads"]
    if vocab_size is not None:
        kw["vocab_size"] = vocab_size
    kw.update(OVERRIDES.get(model_type, {}))
    kw.update(extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(**kw)


def write_tiny_family(path: Path, model_type: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                      layers: int = 2, **extra) -> Path:
    """A tiny random `model_type` checkpoint saved as transformers saves it (Hub layout), with the SmolLM2
    tokenizer. Weights get a larger-than-init spread so layers change the residual stream visibly."""
    from quantizer.assets import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = tiny_config(model_type, layers=layers, vocab_size=len(tokenizer), tie_word_embeddings=False,
                         **ids, **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.normal_(0, 0.08)
    model.to(dtype).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def dequantized_reference(float_dir: Path, quant_dir: Path) -> torch.nn.Module:
    """transformers' own float model (fused experts, Conv1D as stored) carrying the checkpoint's dequantized
    weights."""
    from quantizer.decoder import load_config
    from quantizer.experts import ExpertList
    from quantizer.loading import load_model
    from quantizer.qlinear import QuantLinear

    quantized = load_model(quant_dir)
    model = AutoModelForCausalLM.from_pretrained(float_dir, config=load_config(float_dir), dtype=torch.float32)
    state = model.state_dict()
    experts = {name: module for name, module in quantized.named_modules() if isinstance(module, ExpertList)}
    for name, module in quantized.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        weight = module.dequantized_weight(torch.float32)
        owner = next((e for e in experts if name.startswith(e + ".")), None)
        if owner is None:  # GPT-2's Conv1D stores [in, out]
            state[f"{name}.weight"] = weight.t() if isinstance(model.get_submodule(name), Conv1D) else weight
            continue
        block = experts[owner]
        e, _, proj = name[len(owner) + 1:].partition(".")
        fused = f"{owner}.gate_up_proj" if proj in ("gate_proj", "up_proj") and block.gated else f"{owner}.{proj}"
        target = state[fused][int(e)]
        rows = slice(0, block.width) if proj == "gate_proj" else slice(block.width, None) if block.gated and \
            proj == "up_proj" else slice(None)
        if block.transposed:
            target[:, rows] = weight.t()
        else:
            target[rows] = weight
    model.load_state_dict(state)
    return model.eval()
