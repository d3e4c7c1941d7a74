"""A 235B-shaped mixture-of-experts dress rehearsal on CPU: Qwen3-235B-A22B's exact layer shapes (hidden
4096, 64 query / 4 KV heads of 128, 128 experts of width 1536 with top-8 routing, vocabulary 151936),
decoder layers of random bf16 weights, quantized end to end by `rayquant quantize` (int4 g128 sym,
group-aware order, auto calibration: every token for experts routed fewer than their inputs) on 16 × 512
calibration tokens.

Records the wall per layer with its phases, the stage's peak RSS against the planner's estimate, the
tokens routed to each expert and how many experts fell back, and that our loader reads the checkpoint.
Usage: python -m bench.rehearsal_235b [--layers 1] [--work DIR]   (~20 min and ~20 GB RAM per layer on
2 cores; writes ~8 GB per layer to --work)
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import shutil
import tempfile
from pathlib import Path


from bench.common import run_cli, write_results
from bench.rehearsal_72b import CALIBRATION, finite_logits, plain_calibration_text, run_meta, write_random_checkpoint
from tests.synthetic_checkpoint import QWEN3_235B_A22B

log = logging.getLogger("bench")
QUANT = ["--bits", "4", "--group-size", "128", "--sym", "--no-desc-act", "--moe-calibration", "auto"]


def quantize(float_dir: Path, out: Path, calibration: Path, layers: int) -> None:
    if not (float_dir / "model.safetensors.index.json").is_file():
        # a child process keeps this one small: Linux carries peak RSS across fork + exec into the CLI
        writer = multiprocessing.get_context("spawn").Process(
            target=write_random_checkpoint, args=(float_dir, layers, 0, QWEN3_235B_A22B))
        writer.start()
        writer.join()
        if writer.exitcode:
            raise RuntimeError(f"writing the random checkpoint failed (exit code {writer.exitcode})")
    run_cli("quantize", "--model", str(float_dir), "--calib", str(calibration), "--out", str(out), "--overwrite",
            "--stages", "1", "--cpus-per-stage", "2", "--memory-per-stage-gb", "22",  # default: 80 % of RAM
            "--num-samples", str(CALIBRATION.num_samples),
            "--max-len", str(CALIBRATION.max_len), "--batch-size", str(CALIBRATION.batch_size), *QUANT,
            timeout=6 * 3600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1, help="decoder layers (1-2)")
    parser.add_argument("--work", type=Path, help="scratch dir (default: a temp dir, removed afterwards)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="rehearsal-235b-"))
    try:
        float_dir, out = work / "qwen3-235b-shaped", work / "qwen3-235b-shaped-gptq"
        quantize(float_dir, out, plain_calibration_text(work / "calibration.txt"), args.layers)
        report = json.loads((out / "quantize_report.json").read_text())
        loads = finite_logits(out)
        rows = []
        stage = report["stages"][0]
        for layer in stage["layer_reports"]:
            tokens = layer["expert_tokens"]
            rows.append({"layer": layer["layer"], "layer_wall_s": layer["seconds"],
                         "stage_peak_rss_gb": stage["peak_rss_mb"] / 1024, "planned_gb": stage["planned_gb"],
                         "rss_vs_plan": stage["peak_rss_mb"] / (stage["planned_gb"] * 1024),
                         "experts_fell_back": len(layer["expert_fallbacks"]),
                         "min_expert_tokens": min(tokens), "max_expert_tokens": max(tokens),
                         "experts_without_tokens": sum(t == 0 for t in tokens)})
        meta = run_meta(report, f"Qwen3-235B-A22B shapes, {len(rows)} decoder layer(s), random bf16 weights",
                        "int4 g128 sym, group-aware order, moe_calibration auto (an expert routed fewer tokens "
                        "than its projection's inputs is calibrated on every token); 1 stage, 2 threads, CPU "
                        "(fp32 compute)", loads)
        write_results("rehearsal_235b", rows, ["layer", "layer_wall_s", "stage_peak_rss_gb", "planned_gb",
                                               "rss_vs_plan", "experts_fell_back", "min_expert_tokens",
                                               "max_expert_tokens", "experts_without_tokens"], meta)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
