"""A 671B / 1T-shaped dress rehearsal on CPU: DeepSeek-V3's (or Kimi-K2's) exact layer shapes in their FP8
release format — every projection float8_e4m3fn with a float32 `weight_scale_inv` per 128 × 128 block — with
random weights (DeepSeek-V3: one dense layer and one MoE layer of 256 experts; Kimi-K2: one MoE layer of 384),
quantized end to end by `rayquant quantize` read straight from FP8 (int4 g128 sym, group-aware order, auto
calibration) on 16 × 512 calibration tokens, the experts streamed a chunk at a time as the planner sizes it.

Records the wall per layer and per expert chunk, the stage's peak RSS against the planner's estimate, the
experts that fell back, and that our loader reads the checkpoint with finite logits.
Usage: python -m bench.rehearsal_671b [--family deepseek_v3|kimi_k2] [--work DIR] [--memory-gb 18]
(DeepSeek-V3: ~12 GB written to --work, about 45 minutes on 2 cores; Kimi-K2: ~17 GB, longer)
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import write_results
from bench.rehearsal_72b import CALIBRATION, finite_logits, plain_calibration_text, run_meta
from quantizer.assets import default_model_dir
from quantizer.sources import TOKENIZER_FILES
from tests.synthetic_checkpoint import DEEPSEEK_V3, KIMI_K2, write_family_checkpoint

log = logging.getLogger("bench")
QUANT = ["--bits", "4", "--group-size", "128", "--sym", "--no-desc-act", "--moe-calibration", "auto"]
SHAPES = {  # the rehearsal's layers: DeepSeek-V3 one dense + one MoE, Kimi-K2 one MoE; no MTP layer
    "deepseek_v3": {**DEEPSEEK_V3, "num_hidden_layers": 2, "first_k_dense_replace": 1, "num_nextn_predict_layers": 0},
    "kimi_k2": {**KIMI_K2, "num_hidden_layers": 1, "first_k_dense_replace": 0, "num_nextn_predict_layers": 0},
}


def write_checkpoint(path: Path, family: str) -> None:
    write_family_checkpoint(path, SHAPES[family], data=True)
    for name in TOKENIZER_FILES:  # SmolLM2's 49152 ids lie inside both vocabularies
        if (default_model_dir() / name).is_file():
            shutil.copy(default_model_dir() / name, path / name)


def quantize(float_dir: Path, out: Path, calibration: Path, family: str, memory_gb: float) -> None:
    if not (float_dir / "model.safetensors.index.json").is_file():
        # a child process keeps this one small: Linux carries peak RSS across fork + exec into the CLI
        writer = multiprocessing.get_context("spawn").Process(target=write_checkpoint, args=(float_dir, family))
        writer.start()
        writer.join()
        if writer.exitcode:
            raise RuntimeError(f"writing the random checkpoint failed (exit code {writer.exitcode})")
    args = ["quantize", "--model", str(float_dir), "--calib", str(calibration), "--out", str(out), "--overwrite",
            "--stages", "1", "--cpus-per-stage", "2", "--memory-per-stage-gb", str(memory_gb),
            "--num-samples", str(CALIBRATION.num_samples), "--max-len", str(CALIBRATION.max_len),
            "--batch-size", str(CALIBRATION.batch_size), *QUANT]
    log_file = out.parent / f"{out.name}.log"
    log.info("rayquant %s (its log: %s)", " ".join(args), log_file)
    with open(log_file, "w") as stream:  # the job's progress lines, readable while it runs
        done = subprocess.run([sys.executable, "-m", "rayquant.cli", *args], stderr=stream, stdout=stream,
                              env={**os.environ, "RAY_AUTH_MODE": "disabled"}, timeout=8 * 3600)
    if done.returncode:
        raise RuntimeError(f"rayquant quantize failed; see {log_file}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(SHAPES), default="deepseek_v3")
    parser.add_argument("--work", type=Path, help="scratch dir (default: a temp dir, removed afterwards)")
    parser.add_argument("--checks-only", action="store_true",
                        help="only the checks and the results, on the checkpoint an earlier run left in --work")
    parser.add_argument("--memory-gb", type=float, default=18.0,
                        help="the stage's planning budget (default 18: the rest of 24 GiB for Ray and the driver)")
    args = parser.parse_args()
    if args.checks_only and args.work is None:
        parser.error("--checks-only needs the --work of an earlier run")
    work = args.work or Path(tempfile.mkdtemp(prefix=f"rehearsal-{args.family}-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        float_dir, out = work / f"{args.family}-fp8-shaped", work / f"{args.family}-shaped-gptq"
        if not args.checks_only:
            quantize(float_dir, out, plain_calibration_text(work / "calibration.txt"), args.family, args.memory_gb)
        report = json.loads((out / "quantize_report.json").read_text())
        loads = finite_logits(out)
        rows = []
        stage = report["stages"][0]
        for layer in stage["layer_reports"]:
            tokens = layer["expert_tokens"]
            chunks = layer["chunk_seconds"]
            rss = layer.get("chunk_rss_mb") or []
            rows.append({"layer": layer["layer"], "kind": "MoE" if tokens else "dense",
                         "layer_wall_s": round(layer["seconds"], 1),
                         "experts_per_chunk": layer["experts_per_chunk"] or "-", "chunks": len(chunks) or "-",
                         "chunk_wall_s": f"{min(chunks):.0f}–{max(chunks):.0f}" if chunks else "-",
                         "chunk_rss_gb": f"{rss[0] / 1024:.1f} → {max(rss) / 1024:.1f}" if rss else "-",
                         "stage_peak_rss_gb": round(stage["peak_rss_mb"] / 1024, 2),
                         "planned_gb": stage["planned_gb"],
                         "rss_vs_plan": round(stage["peak_rss_mb"] / (stage["planned_gb"] * 1024), 3),
                         "experts_fell_back": len(layer["expert_fallbacks"]),
                         "min_expert_tokens": min(tokens) if tokens else "-",
                         "max_expert_tokens": max(tokens) if tokens else "-"})
        name = {"deepseek_v3": "DeepSeek-V3", "kimi_k2": "Kimi-K2"}[args.family]
        meta = run_meta(report, f"{name} shapes in its FP8 release format (e4m3, 128 × 128 block scales), "
                        f"{len(rows)} decoder layer(s), random weights, read directly (no bf16 copy)",
                        "int4 g128 sym, group-aware order, moe_calibration auto; experts streamed as the planner "
                        f"sized the chunk for a {args.memory_gb:g} GB stage; 1 stage, 2 threads, CPU (fp32 compute)",
                        loads)
        write_results(f"rehearsal_{args.family}", rows,
                      ["layer", "kind", "layer_wall_s", "experts_per_chunk", "chunks", "chunk_wall_s", "chunk_rss_gb",
                       "stage_peak_rss_gb", "planned_gb", "rss_vs_plan", "experts_fell_back", "min_expert_tokens",
                       "max_expert_tokens"], meta)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
