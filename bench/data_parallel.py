"""The data-parallel schedule against the sequential one, side by side in one run.

1. The default job (SmolLM2-135M, configs/default.yaml): 2 workers × 1 thread against one sequential stage
   × 1 thread — wall time and perplexity (32 × 512 tokens).
2. One Qwen2-7B-shaped layer (hidden 3584, MLP 18944, 28/4 heads; random bf16 weights, 16 × 512 calibration
   tokens) with 1 and 2 workers: the time of each phase (forward, Hessian, reduce, solve, broadcast) and
   the bytes moved per layer. (Qwen2-72B's layer does not fit twice in this machine's 24 GiB: its down_proj
   Hessian alone is 3.5 GB per worker.)

Usage: python -m bench.data_parallel [--windows 32]   (~25 min on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import tempfile
from pathlib import Path

from bench.common import run_cli, write_results
from bench.rehearsal_72b import CALIBRATION, plain_calibration_text, write_random_checkpoint
from tests.synthetic_checkpoint import QWEN2_72B

log = logging.getLogger("bench")
QWEN2_7B = {**QWEN2_72B, "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
            "num_key_value_heads": 4}
SEQUENTIAL = ["--schedule", "sequential", "--stages", "1", "--cpus-per-stage", "1"]
TWO_WORKERS = ["--schedule", "data_parallel", "--workers", "2", "--cpus-per-stage", "1"]


def perplexity(model: str, windows: int) -> float:
    out, _ = run_cli("eval", "--model", model, "--max-windows", str(windows))
    return json.loads(out.strip().splitlines()[-1])["perplexity"]


def phase_row(run: str, report: dict, wall: float) -> dict:
    row = {"run": run, "quantize_s": wall, "layers_s": sum(r["seconds"] for s in report["stages"]
                                                           for r in s["layer_reports"])}
    dp = report.get("data_parallel")
    if dp:
        row.update(dp["totals_s"])
        row["hessian_mb_per_layer"] = dp["bytes_per_layer"]["hessians"] / 2**20
        row["result_mb_per_layer"] = dp["bytes_per_layer"]["results"] / 2**20
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=32)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for run, flags in (("default job, sequential, 1 stage × 1 thread", SEQUENTIAL),
                           ("default job, data_parallel, 2 workers × 1 thread", TWO_WORKERS)):
            out = str(Path(tmp) / run.split(", ")[1])
            _, wall = run_cli("quantize", "--config", "configs/default.yaml", "--out", out, *flags)
            report = json.loads((Path(out) / "quantize_report.json").read_text())
            rows.append({**phase_row(run, report, wall), "perplexity": perplexity(out, args.windows)})
        rows[1]["speedup"] = rows[0]["quantize_s"] / rows[1]["quantize_s"]
        rows[1]["ppl_change_pct"] = 100 * (rows[1]["perplexity"] / rows[0]["perplexity"] - 1)
        write_results("data_parallel", rows, ["run", "quantize_s", "layers_s", "speedup", "perplexity",
                                              "ppl_change_pct", "forward_s", "hessian_s", "reduce_s", "solve_s",
                                              "broadcast_s", "hessian_mb_per_layer", "result_mb_per_layer"],
                      {"model": "SmolLM2-135M-Instruct, configs/default.yaml", "machine": "2 CPU cores",
                       "eval": f"{args.windows}×512 tokens"})
        float_dir = Path(tmp) / "qwen2-7b-shaped"
        writer = multiprocessing.get_context("spawn").Process(target=write_random_checkpoint,
                                                              args=(float_dir, 1, 0, QWEN2_7B))
        writer.start()
        writer.join()
        calibration = plain_calibration_text(Path(tmp) / "calibration.txt")
        layer_rows = []
        for workers in (1, 2):
            out = str(Path(tmp) / f"7b-w{workers}")
            _, wall = run_cli("quantize", "--model", str(float_dir), "--calib", str(calibration), "--out", out,
                              "--schedule", "data_parallel", "--workers", str(workers), "--cpus-per-stage",
                              str(2 // workers), "--bits", "4", "--group-size", "128", "--sym", "--no-desc-act",
                              "--num-samples", str(CALIBRATION.num_samples), "--max-len", str(CALIBRATION.max_len),
                              "--batch-size", str(CALIBRATION.batch_size), timeout=4 * 3600)
            report = json.loads((Path(out) / "quantize_report.json").read_text())
            layer_rows.append(phase_row(f"Qwen2-7B-shaped layer, {workers} worker(s) × {2 // workers} thread(s)",
                                        report, wall))
        write_results("data_parallel_7b_layer", layer_rows,
                      ["run", "layers_s", "forward_s", "hessian_s", "reduce_s", "solve_s", "broadcast_s",
                       "hessian_mb_per_layer", "result_mb_per_layer"],
                      {"model": "Qwen2-7B shapes, 1 decoder layer, random bf16 weights", "machine": "2 CPU cores",
                       "calibration": f"{CALIBRATION.num_samples} × {CALIBRATION.max_len} tokens",
                       "transport": "Ray object store"})


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
