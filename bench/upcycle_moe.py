"""A mixture of experts with a real language model inside: SmolLM2-135M upcycled into a Qwen2-MoE with 8
experts (top-2, weights renormalised) per layer. Each expert is the layer's dense MLP plus independent
noise (`--noise` × each weight matrix's std), the router is random (logits of std ~1), and the shared expert
and its gate are zero, so attention, norms and embeddings are SmolLM2's and the float model stays close to
it. Every expert then sees a different quarter of the tokens: what calibrating on routed tokens only costs
against calibrating every expert on every token shows on a model whose quality GPTQ actually moves (a model
trained from scratch for minutes on CPU is too weak for that; see bench/train_moe.py).

Usage: python -m bench.upcycle_moe [--noise 0.05] [--out DIR]   (default DIR: $RAYQUANT_CACHE/smollm2-moe-8x2)
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import torch

from quantizer.assets import cache_dir, default_model_dir
from quantizer.sources import TOKENIZER_FILES

log = logging.getLogger("bench.upcycle_moe")
EXPERTS, TOP_K, SHARED_WIDTH = 8, 2, 64


def default_out() -> Path:
    return cache_dir() / "smollm2-moe-8x2"


def upcycle(out: Path, noise: float = 0.05, seed: int = 0) -> Path:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    source = default_model_dir()
    dense = AutoConfig.from_pretrained(source)
    config = AutoConfig.for_model(
        "qwen2_moe", vocab_size=dense.vocab_size, hidden_size=dense.hidden_size,
        intermediate_size=dense.intermediate_size, moe_intermediate_size=dense.intermediate_size,
        num_hidden_layers=dense.num_hidden_layers, num_attention_heads=dense.num_attention_heads,
        num_key_value_heads=dense.num_key_value_heads, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
        norm_topk_prob=True, shared_expert_intermediate_size=SHARED_WIDTH, decoder_sparse_step=1,
        rms_norm_eps=dense.rms_norm_eps, rope_parameters=dense.rope_parameters, use_sliding_window=False,
        max_position_embeddings=dense.max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=dense.bos_token_id, eos_token_id=dense.eos_token_id, pad_token_id=dense.pad_token_id)
    weights = load_file(str(source / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        tensor = tensor.float()
        if ".mlp." not in name:
            state[name] = tensor
            continue
        prefix, _, proj = name.partition(".mlp.")
        for e in range(EXPERTS):
            jitter = noise * tensor.std() * torch.randn(tensor.shape, generator=g)
            state[f"{prefix}.mlp.experts.{e}.{proj}"] = tensor + jitter
    hidden = dense.hidden_size
    for i in range(dense.num_hidden_layers):
        p = f"model.layers.{i}"
        state[f"{p}.mlp.gate.weight"] = torch.randn(EXPERTS, hidden, generator=g) / hidden**0.5
        state[f"{p}.mlp.shared_expert_gate.weight"] = torch.zeros(1, hidden)
        for proj, shape in (("gate_proj", (SHARED_WIDTH, hidden)), ("up_proj", (SHARED_WIDTH, hidden)),
                            ("down_proj", (hidden, SHARED_WIDTH))):
            state[f"{p}.mlp.shared_expert.{proj}.weight"] = torch.zeros(shape)
        for proj in ("q_proj", "k_proj", "v_proj"):  # Qwen2 attention has q/k/v biases; SmolLM2 has none
            state[f"{p}.self_attn.{proj}.bias"] = torch.zeros(state[f"{p}.self_attn.{proj}.weight"].shape[0])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, state_dict={k: v.half() for k, v in state.items()})
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, tmp / name)
    tmp.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    out = args.out or default_out()
    if out.exists():
        raise SystemExit(f"{out} exists; remove it to build it again")
    log.info("wrote %s", upcycle(out, args.noise))


if __name__ == "__main__":
    main()
