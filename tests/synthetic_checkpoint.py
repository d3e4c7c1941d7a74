"""Header-only safetensors checkpoints: real config.json, index and shard headers (names, shapes,
dtypes, offsets) but no tensor data, so planning can be tested at 72B scale without weights."""

from __future__ import annotations

import json
import math
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


# ---- any family, from transformers' own modules --------------------------------------------------------
DEEPSEEK_V3 = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 7168,
               "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
               "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
               "num_experts_per_tok": 8, "first_k_dense_replace": 3, "n_group": 8, "topk_group": 4,
               "routed_scaling_factor": 2.5, "norm_topk_prob": True, "q_lora_rank": 1536, "kv_lora_rank": 512,
               "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "vocab_size": 129280,
               "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
               "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
               "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
               "bos_token_id": 0, "eos_token_id": 1,
               "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                       "weight_block_size": [128, 128]}}
KIMI_K2 = {**DEEPSEEK_V3, "model_type": "kimi_k2", "n_routed_experts": 384, "num_attention_heads": 64,
           "num_key_value_heads": 64, "vocab_size": 163840, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
           "routed_scaling_factor": 2.827, "rope_theta": 50000.0, "max_position_embeddings": 131072,
           "rope_scaling": {**DEEPSEEK_V3["rope_scaling"], "factor": 32.0}, "bos_token_id": 163584,
           "eos_token_id": 163585}
MTP_EXTRA = {"enorm.weight": ("h",), "hnorm.weight": ("h",), "eh_proj.weight": ("h", "2h"),
             "shared_head.norm.weight": ("h",), "shared_head.head.weight": ("v", "h"),
             "embed_tokens.weight": ("v", "h")}


def family_tensors(path: Path, config: dict) -> dict[str, tuple[list[int], str]]:
    """Name → (shape, safetensors dtype) of every tensor of `config`'s checkpoint, read from the model transformers
    builds (our per-expert module names, which are the Hub names for DeepSeek-V3): bf16, persistent buffers in
    their own dtype, and under an FP8 `quantization_config` each quantized projection's weight in e4m3 beside its
    float32 `weight_scale_inv`. DeepSeek-style multi-token-prediction layers (num_nextn_predict_layers) follow the
    last layer. Writes config.json into `path`."""
    from quantizer.decoder import Architecture, load_config

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    cfg = load_config(path)
    block = (config.get("quantization_config") or {}).get("weight_block_size")
    cfg.__dict__.pop("quantization_config", None)
    arch = Architecture(cfg)
    out: dict[str, tuple[list[int], str]] = {}
    layers = arch.layers_prefix + "."
    for name, t in arch.model.state_dict(keep_vars=True).items():
        if not name.startswith(layers):
            out[name] = (list(t.shape), "BF16")
    for i in range(arch.num_layers + int(config.get("num_nextn_predict_layers", 0))):
        index = min(i, arch.num_layers - 1)  # an MTP layer has the last layer's shapes (and a few more)
        buffers, linears = arch.buffer_names(index), {f"{n}.weight" for n in arch.linear_names(index)}
        for rel, shape in arch.tensor_shapes(index).items():
            name = f"{arch.layer_prefix(i)}.{rel}"
            if block and rel in linears:
                out[name] = (list(shape), "F8_E4M3")
                out[name + "_scale_inv"] = ([-(-shape[0] // block[0]), -(-shape[1] // block[1])], "F32")
            else:
                out[name] = (list(shape), "F32" if rel in buffers else "BF16")
        if i >= arch.num_layers:
            size = {"h": arch.hidden_size, "2h": 2 * arch.hidden_size, "v": int(cfg.vocab_size)}
            out.update({f"{arch.layer_prefix(i)}.{rel}": ([size[d] for d in dims], "BF16")
                        for rel, dims in MTP_EXTRA.items()})
    return out


_BYTES = {"BF16": 2, "F32": 4, "F8_E4M3": 1}


def write_family_checkpoint(path: Path, config: dict, data: bool = False, seed: int = 0,
                            shard_bytes: int = 2 * 1024**3) -> Path:
    """`config`'s checkpoint as `family_tensors` names it: headers only (`data=False`: sizes for the planner, no
    weights) or random weights (projections N(0, 0.02²) — in FP8 as e4m3 values with per-block scales —, norms 1,
    float32 buffers 0), written shard by shard (`shard_bytes` each: a few GB of memory at 671B shapes)."""
    from safetensors.torch import save_file
    import torch

    tensors = family_tensors(path, config)
    shards: list[list[str]] = [[]]
    size = 0
    for name, (shape, dtype) in tensors.items():
        nbytes = _BYTES[dtype] * math.prod(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for k, part in enumerate(shards):
        shard = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        weight_map.update(dict.fromkeys(part, shard))
        if not data:
            header, offset = {}, 0
            for name in part:
                shape, dtype = tensors[name]
                size = _BYTES[dtype] * math.prod(shape)
                header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
                offset += size
            blob = json.dumps(header).encode()
            (path / shard).write_bytes(struct.pack("<Q", len(blob)) + blob)
            continue
        values = {}
        for name in part:
            shape, dtype = tensors[name]
            if dtype == "F8_E4M3":  # |w| ≤ 0.02·4.5 in e4m3 steps of 0.02/64 per block's scale
                values[name] = (torch.randn(shape, generator=gen) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
            elif name.endswith("_scale_inv"):
                values[name] = torch.full(shape, 0.02 / 64, dtype=torch.float32)
            elif dtype == "F32":
                values[name] = torch.zeros(shape, dtype=torch.float32)
            elif len(shape) == 1:
                values[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                values[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        save_file(values, str(path / shard), metadata={"format": "pt"})
        del values
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path
