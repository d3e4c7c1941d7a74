"""Small seeded decoder checkpoints written as real safetensors dirs with the SmolLM2 tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from quantizer.assets import default_model_dir


def write_tiny_model(path: Path, model_type: str = "llama", layers: int = 4, hidden: int = 128,
                     intermediate: int = 256, seed: int = 0, dtype: torch.dtype = torch.float16,
                     max_shard_size: str | None = None, **extra) -> Path:
    """A `model_type` causal LM (4 heads, 2 KV heads) with random weights, saved like a hub checkpoint
    (in shards of at most `max_shard_size`, e.g. "400KB", when given). `extra`: more config keys (MoE:
    num_experts / num_local_experts, num_experts_per_tok, moe_intermediate_size, …)."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **extra,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger-than-init weights so that layers change the residual stream visibly
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:  # MoE experts are 3-D in memory
                p.normal_(0, 0.08)
    model.to(dtype).save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tokenizer.save_pretrained(path)
    return Path(path)


MOE_FAMILIES = {  # tiny settings per MoE family: 8 experts, top-2
    "qwen3_moe": {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "norm_topk_prob": True},
    "qwen2_moe": {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                  "shared_expert_intermediate_size": 96},
    "mixtral": {"num_local_experts": 8, "num_experts_per_tok": 2},  # experts as wide as intermediate_size
}


def write_tiny_moe(path: Path, model_type: str = "qwen3_moe", layers: int = 2, **extra) -> Path:
    """8 experts, top-2, experts 64 wide (Mixtral's too: its intermediate_size is the expert width)."""
    width = {"intermediate": 64} if model_type == "mixtral" else {}
    return write_tiny_model(path, model_type, layers=layers, **width, **{**MOE_FAMILIES[model_type], **extra})
