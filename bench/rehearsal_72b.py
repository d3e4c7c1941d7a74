"""A 72B-shaped dress rehearsal on CPU: Qwen2-72B's exact layer shapes (hidden 8192, 64 query / 8 KV
heads, MLP 29568 zero-padded to 29696, vocabulary 152064), a few decoder layers of random bf16 weights,
quantized end to end by `rayquant quantize` with 2 stages on the Qwen2-72B job settings, 16 × 512
calibration tokens.

Records wall time per layer, each stage's peak RSS against the planner's estimate for that stage, and
checks that the output loads in our QuantLinear (layer outputs against the float weights) and in
transformers (a forward pass against the float model's logits).
Usage: python -m bench.rehearsal_72b [--layers 2]   (~40 min and ~20 GB RAM on 2 cores; writes ~9 GB to --work)
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer

from bench.common import run_cli, write_results
from quantizer.assets import default_model_dir
from quantizer.calibration import default_calibration_file, load_texts
from quantizer.config import QuantConfig
from quantizer.loading import load_model
from quantizer.packing import PackedLinear
from quantizer.qlinear import QuantLinear
from tests.synthetic_checkpoint import QWEN2_72B, llama_like_tensors

log = logging.getLogger("bench")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "generation_config.json")


def write_random_checkpoint(path: Path, layers: int, seed: int = 0) -> Path:
    """Qwen2-72B's config with `layers` decoder layers; random bf16 weights (linears N(0, 0.02²), norms 1,
    biases N(0, 0.02²)); one shard per layer plus one for the embeddings and one for norm + head.
    Tokenizer files come from the packaged SmolLM2 (its 49152 ids all lie inside Qwen2's vocabulary)."""
    config = {**QWEN2_72B, "num_hidden_layers": layers}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    for name in TOKENIZER_FILES:
        if (default_model_dir() / name).is_file():
            shutil.copy(default_model_dir() / name, path / name)
    gen = torch.Generator().manual_seed(seed)
    shapes = llama_like_tensors(config)
    groups: dict[str, list[str]] = {}
    for name in shapes:
        key = name.split(".")[2] if name.startswith("model.layers.") else ("embed" if "embed" in name else "head")
        groups.setdefault(key, []).append(name)
    order = ["embed", *[str(i) for i in range(layers)], "head"]
    weight_map = {}
    for k, key in enumerate(order):
        shard = f"model-{k + 1:05d}-of-{len(order):05d}.safetensors"
        tensors = {}
        for name in groups[key]:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shapes[name], generator=gen) * 0.02).to(torch.bfloat16)
            weight_map[name] = shard
        save_file(tensors, str(path / shard), metadata={"format": "pt"})
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def plain_calibration_text(path: Path) -> Path:
    """The shipped calibration documents joined into one plain text, so that the job cuts it into full
    512-token windows (16 × 512 tokens exactly) instead of truncating documents of uneven length."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    path.write_text("\n\n".join(load_texts(default_calibration_file(), tokenizer)))
    return path


def quantlinear_errors(float_dir: Path, quant_dir: Path, layer: int) -> dict[str, float]:
    """Relative output error ‖x·Ŵᵀ − x·Wᵀ‖/‖x·Wᵀ‖ of our QuantLinear for each projection of `layer`, on
    256 random inputs (zeros in the padded input columns of down_proj; padded output rows left out)."""
    qcfg = QuantConfig.from_hf(json.loads((quant_dir / "config.json").read_text())["quantization_config"])
    prefix = f"model.layers.{layer}"
    index = json.loads((quant_dir / "model.safetensors.index.json").read_text())["weight_map"]
    float_index = json.loads((float_dir / "model.safetensors.index.json").read_text())["weight_map"]
    errors = {}
    gen = torch.Generator().manual_seed(1)
    for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        name = f"{prefix}.{proj}"
        with safe_open(str(quant_dir / index[f"{name}.qweight"]), framework="pt") as f:
            packed = PackedLinear(*(f.get_tensor(f"{name}.{t}") for t in ("qweight", "qzeros", "scales", "g_idx")),
                                  bits=qcfg.bits)
            bias = f.get_tensor(f"{name}.bias") if f"{name}.bias" in f.keys() else None
        with safe_open(str(float_dir / float_index[f"{name}.weight"]), framework="pt") as f:
            weight = f.get_tensor(f"{name}.weight").float()
        qlinear = QuantLinear.from_packed(packed, qcfg.group_size, bias)
        x = torch.randn(256, qlinear.in_features, generator=gen)
        x[:, weight.shape[1]:] = 0  # MLP padding columns
        ref = x[:, : weight.shape[1]] @ weight.T + (bias.float() if bias is not None else 0)
        got = qlinear(x)[:, : weight.shape[0]]  # padded gate/up rows are zero
        errors[proj] = float((got - ref).norm() / ref.norm())
    return errors


def transformers_logits_error(float_dir: Path, quant_dir: Path) -> dict[str, float]:
    """Both checkpoints through transformers (the quantized one on our QuantLinear), bf16, 64 tokens:
    relative logits error and top-1 agreement. Loaded one after the other to bound memory."""
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(2))
    logits = []
    for directory in (float_dir, quant_dir):
        model = load_model(directory, dtype=torch.bfloat16)
        with torch.inference_mode():
            logits.append(model(ids).logits.float())
        del model
    ref, got = logits
    return {"logits_rel_error": float((got - ref).norm() / ref.norm()),
            "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (2-3)")
    parser.add_argument("--work", type=Path, help="scratch dir (default: a temp dir, removed afterwards)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="rehearsal-72b-"))
    try:
        float_dir, out = work / "qwen2-72b-shaped", work / "qwen2-72b-shaped-gptq"
        if not (float_dir / "model.safetensors.index.json").is_file():
            # In a child process: the quantize CLI is forked from this one, and Linux carries a process's
            # peak RSS across fork + exec, so this process must stay small for the driver's figure.
            writer = multiprocessing.get_context("spawn").Process(target=write_random_checkpoint,
                                                                  args=(float_dir, args.layers))
            writer.start()
            writer.join()
            if writer.exitcode:
                raise RuntimeError(f"writing the random checkpoint failed (exit code {writer.exitcode})")
        calibration = plain_calibration_text(work / "calibration.txt")
        _, wall = run_cli("quantize", "--config", "configs/qwen2-72b.yaml", "--model", str(float_dir),
                          "--calib", str(calibration), "--out", str(out), "--overwrite", "--stages", "2",
                          "--gpus-per-stage", "0", "--cpus-per-stage", "2", "--memory-per-stage-gb", "0",
                          "--num-samples", "16", "--max-len", "512", "--batch-size", "4", timeout=4 * 3600)
        report = json.loads((out / "quantize_report.json").read_text())
        errors = quantlinear_errors(float_dir, out, 0)
        logits = transformers_logits_error(float_dir, out)
        rows = []
        for stage in report["stages"]:
            planned_mb = stage["planned_gb"] * 1024
            for layer in stage["layer_reports"]:
                rows.append({"stage": stage["stage"], "layer": layer["layer"], "layer_wall_s": layer["seconds"],
                             "stage_peak_rss_gb": stage["peak_rss_mb"] / 1024, "planned_gb": stage["planned_gb"],
                             "rss_vs_plan": stage["peak_rss_mb"] / planned_mb})
        write_results("rehearsal_72b", rows, ["stage", "layer", "layer_wall_s", "stage_peak_rss_gb", "planned_gb",
                                              "rss_vs_plan"],
                      {"model": f"Qwen2-72B shapes, {args.layers} decoder layers, random bf16 weights",
                       "job": "configs/qwen2-72b.yaml (int4 g128 sym, group-aware order, MLP padded to 29696), "
                              "2 stages on CPU, 2 threads each, sequential schedule",
                       "calibration": f"{report['calibration_tokens']} tokens (16 × 512, shipped Wikipedia text)",
                       "quantize_wall_s": round(wall, 1), "driver_peak_rss_mb": round(report["driver_peak_rss_mb"]),
                       "quantlinear_rel_error_layer0": {k: round(v, 4) for k, v in errors.items()},
                       "transformers_load": {k: round(v, 4) for k, v in logits.items()},
                       "machine": "2 CPU cores, 24 GiB RAM, local Ray"})
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
