"""A 72B-shaped dress rehearsal on CPU: Qwen2-72B's exact layer shapes (hidden 8192, 64 query / 8 KV
heads, MLP 29568 zero-padded to 29696, vocabulary 152064), a few decoder layers of random bf16 weights,
quantized end to end by `rayquant quantize` with 2 stages on the Qwen2-72B job settings, 16 × 512
calibration tokens.

Records wall time per layer, each stage's peak RSS against the planner's estimate for that stage, and
checks the output: layer 0's projections through our QuantLinear on their real float-model inputs, against
the float weights and against round-to-nearest (bench/results/rehearsal_72b_layer0.md); whole-model logits
through our loader against the checkpoint's dequantized weights and the float model, and through
transformers' own GPTQ loader when GPTQModel is installed.
Usage: python -m bench.rehearsal_72b [--layers 2] [--work DIR [--checks-only]]   (~45 min and ~20 GB RAM on 2 cores;
writes ~14 GB to --work)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import multiprocessing
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.common import run_cli, write_results
from quantizer.assets import default_model_dir
from quantizer.calibration import (CalibrationConfig, default_calibration_file, default_eval_file, load_texts,
                                  tokenize_samples)
from quantizer.config import QuantConfig
from quantizer.loading import load_model
from quantizer.model_io import CheckpointReader
from quantizer.packing import PackedLinear, dequantize_packed
from quantizer.qlinear import QuantLinear
from quantizer.rtn import rtn_quantize
from tests.synthetic_checkpoint import QWEN2_72B, llama_like_tensors

log = logging.getLogger("bench")
CALIBRATION = CalibrationConfig(num_samples=16, max_len=512, batch_size=4)  # 16 × 512 tokens, as the issue asks
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "generation_config.json")


def write_random_checkpoint(path: Path, layers: int, seed: int = 0, shapes_of: dict = QWEN2_72B) -> Path:
    """`shapes_of`'s config (Qwen2-72B by default) with `layers` decoder layers; random bf16 weights (linears
    N(0, 0.02²), norms 1, biases N(0, 0.02²)); one shard per layer plus one for the embeddings and one for
    norm + head. Tokenizer files come from the packaged SmolLM2 (its 49152 ids all lie inside Qwen's
    vocabularies)."""
    config = {**shapes_of, "num_hidden_layers": layers}
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


def run_meta(report: dict, model: str, job: str, loads: dict) -> dict:
    """The meta of a dress rehearsal's result: what ran, on which calibration, the job's wall and driver memory."""
    return {"model": model, "job": job,
            "calibration": f"{report['calibration_tokens']} tokens ({CALIBRATION.num_samples} × "
                           f"{CALIBRATION.max_len}, shipped Wikipedia text)",
            "quantize_wall_s": round(report["wall_seconds"], 1),
            "driver_peak_rss_mb": round(report["driver_peak_rss_mb"]), "loads": loads,
            "machine": "2 CPU cores, 24 GiB RAM, local Ray"}


def finite_logits(out: Path) -> dict[str, str]:
    """Whether our loader reads the checkpoint `out` and gives finite logits on 64 tokens (bf16)."""
    model = load_model(out, dtype=torch.bfloat16)
    with torch.no_grad():
        logits = model(torch.arange(1, 65)[None]).logits
    return {"our loader": "finite logits" if torch.isfinite(logits).all() else "NON-FINITE logits"}


def plain_calibration_text(path: Path) -> Path:
    """The shipped calibration documents joined into one plain text, so that the job cuts it into full
    512-token windows (16 × 512 tokens exactly) instead of truncating documents of uneven length."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    path.write_text("\n\n".join(load_texts(default_calibration_file(), tokenizer)))
    return path


PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


def _packed_linear(quant_dir: Path, name: str, bits: int) -> tuple[PackedLinear, torch.Tensor | None]:
    index = json.loads((quant_dir / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(quant_dir / index[f"{name}.qweight"]), framework="pt") as f:
        packed = PackedLinear(*(f.get_tensor(f"{name}.{t}") for t in ("qweight", "qzeros", "scales", "g_idx")),
                              bits=bits)
        bias = f.get_tensor(f"{name}.bias") if f"{name}.bias" in f.keys() else None
    return packed, bias


def calibration_windows(calibration: Path, tokenizer) -> list[torch.Tensor]:
    """The sequences the quantize job drew from `calibration` (same settings, same seed)."""
    return tokenize_samples(calibration, tokenizer, CALIBRATION)


def heldout_windows(tokenizer, windows: int = 2, tokens: int = 512) -> list[torch.Tensor]:
    """`windows` × `tokens` tokens of the shipped held-out Wikipedia text."""
    ids = tokenizer(default_eval_file().read_text(), return_tensors="pt").input_ids[0]
    return [ids[i * tokens : (i + 1) * tokens] for i in range(windows)]


def capture_first_layer_inputs(quant_dir: Path, windows: dict[str, list[torch.Tensor]]) -> dict[str, dict]:
    """The inputs each projection of decoder layer 0 sees in the quantized model, computed in float32 as
    the quantize job computes them on CPU (embeddings → layer 0, true-sequential: o_proj after the
    quantized q/k/v, and so on): {window set: {projection: X [tokens, in] float32}}."""
    model = load_model(quant_dir, dtype=torch.bfloat16)
    block = model.model.layers[0].float()
    captured: dict[str, dict[str, list[torch.Tensor]]] = {key: {p: [] for p in PROJECTIONS} for key in windows}
    with torch.no_grad():
        for key, sequences in windows.items():
            hooks = [block.get_submodule(p).register_forward_pre_hook(
                lambda _m, args, into=captured[key][p]: into.append(args[0][0].float().clone()))
                for p in PROJECTIONS]
            for ids in sequences:
                hidden = model.model.embed_tokens(ids[None]).float()
                positions = torch.arange(ids.shape[0])[None]
                block(hidden, attention_mask=None, position_ids=positions,
                      position_embeddings=model.model.rotary_emb(hidden, positions))
            for hook in hooks:
                hook.remove()
    del model
    return {key: {p: torch.cat(xs) for p, xs in per_proj.items()} for key, per_proj in captured.items()}


def quantlinear_errors(float_dir: Path, quant_dir: Path, windows: dict[str, list[torch.Tensor]]) -> list[dict]:
    """Relative output error ‖X·Ŵᵀ − X·Wᵀ‖/‖X·Wᵀ‖ of each projection of layer 0: Ŵ from our QuantLinear on the
    GPTQ checkpoint, and from round-to-nearest on the same grid; X from `capture_first_layer_inputs`.
    The MLP padding is zero on both sides (padded gate/up rows left out, down_proj's padded inputs zero)."""
    qcfg = QuantConfig.from_hf(json.loads((quant_dir / "config.json").read_text())["quantization_config"])
    inputs = capture_first_layer_inputs(quant_dir, windows)
    float_reader = CheckpointReader(float_dir)
    rows = []
    for proj in PROJECTIONS:
        name = f"model.layers.0.{proj}"
        packed, bias = _packed_linear(quant_dir, name, qcfg.bits)
        qlinear = QuantLinear.from_packed(packed, qcfg.group_size, bias)
        weight = float_reader.load([f"{name}.weight"])[f"{name}.weight"].float()
        rtn = rtn_quantize(weight, qcfg).dequantize()
        row = {"projection": proj, "shape": f"{weight.shape[0]}×{weight.shape[1]}"}
        for key, per_proj in inputs.items():
            x = per_proj[proj]
            if torch.count_nonzero(x[:, weight.shape[1]:]):
                raise RuntimeError(f"{name}: the padded MLP channels carry nonzero inputs")
            padded, x = x, x[:, : weight.shape[1]]
            if padded.shape[1] < qlinear.in_features:
                padded = torch.nn.functional.pad(padded, (0, qlinear.in_features - padded.shape[1]))
            ref = x @ weight.T
            got = qlinear(padded)[:, : weight.shape[0]] - (bias.float() if bias is not None else 0)
            row[f"gptq_err_{key}"] = float((got - ref).norm() / ref.norm())
            row[f"rtn_err_{key}"] = float((x @ rtn.T - ref).norm() / ref.norm())
        rows.append(row)
        del qlinear, weight, rtn
    return rows


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _compare(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    return {"rel_error": round(float((got - ref).norm() / ref.norm()), 5),
            "top1_agreement": round(float((got.argmax(-1) == ref.argmax(-1)).float().mean()), 4)}


def load_checks(float_dir: Path, quant_dir: Path, ids: torch.Tensor) -> dict[str, dict[str, float]]:
    """Logits of the quantized checkpoint through our loader (QuantLinear), compared with the float model whose
    projections carry the checkpoint's dequantized weights (what the file describes: loading exactly), and
    with the float model itself (quantization error of a random-weight model). With GPTQModel installed,
    also through transformers' own GPTQ loader. All bf16, models loaded one at a time to bound memory."""
    qcfg = QuantConfig.from_hf(json.loads((quant_dir / "config.json").read_text())["quantization_config"])
    model = load_model(float_dir, dtype=torch.bfloat16)
    float_logits = _logits(model, ids)
    for i, block in enumerate(model.model.layers):
        for proj in PROJECTIONS:
            linear = block.get_submodule(proj)
            weight = dequantize_packed(_packed_linear(quant_dir, f"model.layers.{i}.{proj}", qcfg.bits)[0])
            linear.weight.data = weight[: linear.out_features, : linear.in_features].to(torch.bfloat16)
    described = _logits(model, ids)
    del model
    model = load_model(quant_dir, dtype=torch.bfloat16)
    ours = _logits(model, ids)
    del model
    checks = {"quantlinear_vs_dequantized": _compare(ours, described),
              "quantlinear_vs_float": _compare(ours, float_logits)}
    if importlib.util.find_spec("gptqmodel") and importlib.util.find_spec("optimum"):
        model = AutoModelForCausalLM.from_pretrained(quant_dir, device_map="cpu", dtype=torch.bfloat16)
        checks["transformers_gptq_vs_quantlinear"] = _compare(_logits(model, ids), ours)
        del model
    return checks


def quantize(float_dir: Path, out: Path, calibration: Path, layers: int) -> None:
    """Write the random checkpoint (unless present) and quantize it with `rayquant quantize`."""
    if not (float_dir / "model.safetensors.index.json").is_file():
        # In a child process: the quantize CLI is forked from this one, and Linux carries a process's
        # peak RSS across fork + exec, so this process must stay small for the driver's figure.
        writer = multiprocessing.get_context("spawn").Process(target=write_random_checkpoint, args=(float_dir, layers))
        writer.start()
        writer.join()
        if writer.exitcode:
            raise RuntimeError(f"writing the random checkpoint failed (exit code {writer.exitcode})")
    run_cli("quantize", "--config", "configs/qwen2-72b.yaml", "--model", str(float_dir),
            "--calib", str(calibration), "--out", str(out), "--overwrite", "--stages", "2",
            "--schedule", "sequential", "--workers", "1", "--gpus-per-stage", "0", "--cpus-per-stage", "2",
            "--memory-per-stage-gb", "0",
            "--num-samples", str(CALIBRATION.num_samples), "--max-len", str(CALIBRATION.max_len),
            "--batch-size", str(CALIBRATION.batch_size), timeout=4 * 3600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (2-3)")
    parser.add_argument("--work", type=Path, help="scratch dir (default: a temp dir, removed afterwards)")
    parser.add_argument("--checks-only", action="store_true",
                        help="reuse the quantized checkpoint already in --work; rerun only the load checks")
    args = parser.parse_args()
    if args.checks_only and args.work is None:
        parser.error("--checks-only needs the --work of an earlier run")
    work = args.work or Path(tempfile.mkdtemp(prefix="rehearsal-72b-"))
    try:
        float_dir, out = work / "qwen2-72b-shaped", work / "qwen2-72b-shaped-gptq"
        calibration = work / "calibration.txt"
        if not args.checks_only:
            quantize(float_dir, out, plain_calibration_text(calibration), args.layers)
        report = json.loads((out / "quantize_report.json").read_text())
        tokenizer = AutoTokenizer.from_pretrained(float_dir)
        heldout = heldout_windows(tokenizer)
        errors = quantlinear_errors(float_dir, out, {"fit": calibration_windows(calibration, tokenizer),
                                                     "heldout": heldout})
        loads = load_checks(float_dir, out, heldout[0][None, :128])
        rows = []
        for stage in report["stages"]:
            planned_mb = stage["planned_gb"] * 1024
            for layer in stage["layer_reports"]:
                rows.append({"stage": stage["stage"], "layer": layer["layer"], "layer_wall_s": layer["seconds"],
                             "stage_peak_rss_gb": stage["peak_rss_mb"] / 1024, "planned_gb": stage["planned_gb"],
                             "rss_vs_plan": stage["peak_rss_mb"] / planned_mb})
        meta = run_meta(report, f"Qwen2-72B shapes, {len(rows)} decoder layers, random bf16 weights",
                        "configs/qwen2-72b.yaml (int4 g128 sym, group-aware order, MLP padded to 29696), "
                        "2 stages on CPU, 2 threads each, sequential schedule", loads)
        write_results("rehearsal_72b", rows, ["stage", "layer", "layer_wall_s", "stage_peak_rss_gb", "planned_gb",
                                              "rss_vs_plan"], meta)
        write_results("rehearsal_72b_layer0", errors,
                      ["projection", "shape", "gptq_err_fit", "rtn_err_fit", "gptq_err_heldout", "rtn_err_heldout"],
                      {"what": "relative output error ‖XŴᵀ − XWᵀ‖/‖XWᵀ‖ of layer 0's projections; Ŵ from our "
                               "QuantLinear on the checkpoint (gptq) or round-to-nearest on the same int4 g128 grid "
                               "(rtn); X = the projection's inputs in the quantized model, in float32, on the 16 × "
                               "512 calibration tokens GPTQ fitted (fit) and on 2 × 512 held-out Wikipedia tokens "
                               "(heldout)"})
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
