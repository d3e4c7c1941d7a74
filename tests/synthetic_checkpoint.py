"""Header-only safetensors checkpoints: real config.json, index and shard headers (names, shapes,
dtypes, offsets) but no tensor data, so planning can be tested at 72B scale without weights."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def llama_like_tensors(config: dict) -> dict[str, list[int]]:
    """Name → shape of every tensor of a Llama/Qwen2 checkpoint (q/k/v biases for qwen2)."""
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or h // heads
    shapes = {"model.embed_tokens.weight": [vocab, h], "model.norm.weight": [h]}
    if not config.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = [vocab, h]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.self_attn.q_proj.weight": [heads * head_dim, h], f"{p}.self_attn.k_proj.weight": [kv * head_dim, h],
            f"{p}.self_attn.v_proj.weight": [kv * head_dim, h], f"{p}.self_attn.o_proj.weight": [h, heads * head_dim],
            f"{p}.mlp.gate_proj.weight": [inter, h], f"{p}.mlp.up_proj.weight": [inter, h],
            f"{p}.mlp.down_proj.weight": [h, inter],
            f"{p}.input_layernorm.weight": [h], f"{p}.post_attention_layernorm.weight": [h],
        })
        if config["model_type"] == "qwen2":
            shapes.update({f"{p}.self_attn.q_proj.bias": [heads * head_dim],
                           f"{p}.self_attn.k_proj.bias": [kv * head_dim],
                           f"{p}.self_attn.v_proj.bias": [kv * head_dim]})
        if config["model_type"] in ("qwen3", "qwen3_moe"):
            shapes.update({f"{p}.self_attn.q_norm.weight": [head_dim], f"{p}.self_attn.k_norm.weight": [head_dim]})
        experts = config.get("num_experts") or config.get("num_local_experts")
        if experts:  # a sparse layer: no dense MLP, one gate/up/down per expert and the router
            for name in ("gate_proj", "up_proj", "down_proj"):
                del shapes[f"{p}.mlp.{name}.weight"]
            width = config["moe_intermediate_size"]
            shapes[f"{p}.mlp.gate.weight"] = [experts, h]
            for e in range(experts):
                shapes.update({f"{p}.mlp.experts.{e}.gate_proj.weight": [width, h],
                               f"{p}.mlp.experts.{e}.up_proj.weight": [width, h],
                               f"{p}.mlp.experts.{e}.down_proj.weight": [h, width]})
    return shapes


def write_header_only_checkpoint(path: Path, config: dict, layers_per_shard: int = 4) -> Path:
    """config.json, the index and every shard's header (bf16), with no tensor data behind them."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    shapes = llama_like_tensors(config)
    groups: dict[int, list[str]] = {}
    for name in shapes:
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else -1
        groups.setdefault(max(layer, 0) // layers_per_shard, []).append(name)
    count = len(groups)
    weight_map = {}
    for k, names in sorted(groups.items()):
        shard = f"model-{k + 1:05d}-of-{count:05d}.safetensors"
        header, offset = {}, 0
        for name in names:
            n = 1
            for d in shapes[name]:
                n *= d
            header[name] = {"dtype": "BF16", "shape": shapes[name], "data_offsets": [offset, offset + 2 * n]}
            offset += 2 * n
            weight_map[name] = shard
        blob = json.dumps(header).encode()
        (path / shard).write_bytes(struct.pack("<Q", len(blob)) + blob)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


QWEN2_72B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 8192,
             "intermediate_size": 29568, "num_hidden_layers": 80, "num_attention_heads": 64,
             "num_key_value_heads": 8, "vocab_size": 152064, "max_position_embeddings": 32768,
             "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}

QWEN3_235B_A22B = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 4096,
                   "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_hidden_layers": 94,
                   "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
                   "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
                   "vocab_size": 151936, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
                   "rope_theta": 1000000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
