"""Wall time of 1 vs 2 vs 3 stages, sequential and pipelined, on the default model in one run, with the
perplexity cost of `pipelined` against `sequential` and the driver's / stages' peak memory.

Each stage actor gets (cores / stages) threads. On a 2-core machine a sequential schedule runs one stage
at a time, so more stages means fewer threads busy; pipelined runs all stages at once.
Usage: python -m bench.pipeline [--num-samples 64]   (~15 min on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

from bench.common import run_cli, write_results
from bench.quality import perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--windows", type=int, default=16)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for schedule in ("sequential", "pipelined"):
            for stages in (1, 2, 3):
                if schedule == "pipelined" and stages == 1:
                    continue  # identical to sequential with one stage
                out = str(Path(tmp) / f"{schedule}-{stages}")
                _, wall = run_cli("quantize", "--config", "configs/default.yaml", "--out", out, "--stages",
                                  str(stages), "--schedule", schedule, "--num-samples", str(args.num_samples))
                report = json.loads((Path(out) / "quantize_report.json").read_text())
                spans = [(s["started"], s["finished"]) for s in report["stages"]]
                overlap = max(0.0, min(e for _, e in spans) - max(s for s, _ in spans)) if len(spans) > 1 else 0.0
                rows.append({
                    "schedule": schedule, "stages": stages, "wall_s": wall,
                    "layers": " / ".join(f"{s['layers'][0]}-{s['layers'][1] - 1}" for s in report["stages"]),
                    "all_stages_busy_s": overlap,
                    "transfer_mb": report["transfer_bytes"] / 2**20,
                    "driver_peak_rss_mb": report["driver_peak_rss_mb"],
                    "max_stage_peak_rss_mb": max(s["peak_rss_mb"] for s in report["stages"]),
                    "perplexity": perplexity(out, args.windows),
                })
                for row in rows:
                    row["speedup_vs_1_stage"] = rows[0]["wall_s"] / row["wall_s"]
                write_results("pipeline", rows, ["schedule", "stages", "layers", "wall_s", "speedup_vs_1_stage",
                                         "all_stages_busy_s", "transfer_mb", "driver_peak_rss_mb",
                                         "max_stage_peak_rss_mb", "perplexity"],
                              {"model": "SmolLM2-135M-Instruct, configs/default.yaml settings",
                               "calibration": f"{args.num_samples} samples ≤ 512 tokens",
                               "eval": f"{args.windows}×512 tokens", "machine": "2 CPU cores, local Ray"})


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
