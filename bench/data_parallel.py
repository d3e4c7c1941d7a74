"""The data-parallel schedule against the sequential one, side by side in one run.

1. The default job (SmolLM2-135M, configs/default.yaml): 2 workers × 1 thread against one sequential stage
   × 1 thread — wall time and perplexity (32 × 512 tokens) — with each transport (Ray's object store, and
   torch.distributed over gloo: checked to give the same tensors), and two sequential jobs at once: the
   most two processes get from this machine, the ceiling for any two-worker schedule (`of_ceiling`: the
   share of it each schedule reaches; `busy_fraction`: each worker's busy share of the layers' wall time).
   The sequential, data-parallel and ceiling runs repeat in `--rounds` rounds, one after the other (the
   machine's speed drifts by a few percent within minutes): wall times are their medians, and each round's
   share of its own ceiling is listed too.
   The timeline of the median layer (each worker's busy spans by phase) goes to data_parallel_timeline; the
   seconds of each phase over all layers, the sequential stage's against the two workers' summed (what the
   schedule adds to the work, and the workers' idle time), to data_parallel_cpu.
2. One Qwen2-7B-shaped layer (hidden 3584, MLP 18944, 28/4 heads; random bf16 weights, 16 × 512 calibration
   tokens) with 1 and 2 workers: the time of each phase (forward, Hessian, reduce, solve, broadcast) and
   the bytes moved per layer. (Qwen2-72B's layer does not fit twice in this machine's 24 GiB: its down_proj
   Hessian alone is 3.5 GB per worker.)

Usage: python -m bench.data_parallel [--windows 32] [--rounds 3] [--default-job-only]
(on 2 cores: ~20 min with --default-job-only, ~50 min without)
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import tempfile
import threading
from collections import Counter
from pathlib import Path

from bench.common import run_cli, write_results
from bench.rehearsal_72b import CALIBRATION, plain_calibration_text, write_random_checkpoint
from cluster.timeline import PHASES
from tests.synthetic_checkpoint import QWEN2_72B

log = logging.getLogger("bench")
QWEN2_7B = {**QWEN2_72B, "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
            "num_key_value_heads": 4}
SEQUENTIAL = ["--schedule", "sequential", "--stages", "1", "--cpus-per-stage", "1"]
TWO_WORKERS = ["--schedule", "data_parallel", "--workers", "2", "--cpus-per-stage", "1"]
DEFAULT_JOB_RUNS = (("default job, sequential, 1 stage × 1 thread", SEQUENTIAL),
                    ("default job, data_parallel, 2 workers × 1 thread", [*TWO_WORKERS, "--transport", "object_store"]),
                    ("default job, data_parallel, 2 workers × 1 thread, collective (gloo)",
                     [*TWO_WORKERS, "--transport", "collective"]))


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
        row["busy_fraction"] = " / ".join(f"{w['busy_fraction']:.2f}" for w in dp["worker_time"])
    return row


def cpu_rows(sequential: dict, parallel: dict) -> list[dict]:
    """Seconds in each phase over all layers (1 thread per process: busy seconds are CPU-seconds): the sequential
    stage's (its layer reports' phase_seconds; applying results is part of its solve) and the data-parallel
    workers' busy seconds summed, then their idle seconds and the totals."""
    alone = Counter()
    for layer in sequential["stages"][0]["layer_reports"]:
        alone.update(layer["phase_seconds"])
    workers = parallel["data_parallel"]["worker_time"]
    both = Counter()
    for worker in workers:
        both.update(worker["busy_s"])
    rows = [{"phase": phase, "sequential_s": alone.get(phase, 0.0), "data_parallel_s": both.get(phase, 0.0)}
            for phase in PHASES]
    rows.append({"phase": "idle (waiting)", "sequential_s": 0.0,
                 "data_parallel_s": sum(worker["idle_s"] for worker in workers)})
    rows.append({"phase": "all", "sequential_s": sum(r["sequential_s"] for r in rows),
                 "data_parallel_s": sum(r["data_parallel_s"] for r in rows)})
    for row in rows:
        if row["sequential_s"]:
            row["ratio"] = row["data_parallel_s"] / row["sequential_s"]
    return rows


def timeline_rows(layer: dict) -> list[dict]:
    """One layer's busy spans, one row per span: worker, phase, start and end (seconds from the layer's start)."""
    return [{"worker": rank, "phase": phase, "start_s": t0, "end_s": t1}
            for rank, worker in enumerate(layer["timeline"]["workers"]) for phase, t0, t1 in worker["spans"]]


def two_jobs_at_once(tmp: Path) -> dict:
    """Two sequential 1-thread default jobs started together: what two processes get from this machine's two
    cores (shared caches and memory bandwidth), the ceiling for any 2-worker schedule: the time both took."""
    walls: list[float] = [0.0, 0.0]
    tmp.mkdir(parents=True, exist_ok=True)

    def job(k: int) -> None:
        walls[k] = run_cli("quantize", "--config", "configs/default.yaml", "--out", str(tmp / f"concurrent-{k}"),
                           *SEQUENTIAL)[1]

    threads = [threading.Thread(target=job, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"quantize_s": max(walls)}


def same_tensors(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    def tensors(d: Path) -> dict:
        return {k: v for shard in sorted(d.glob("model-*.safetensors")) for k, v in load_file(str(shard)).items()}

    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of sequential, data-parallel and the "
                        "ceiling, one after the other; wall times are the medians (default 2)")
    parser.add_argument("--default-job-only", action="store_true", help="skip the 7B-shaped layer")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"default-{k}" for k in range(len(DEFAULT_JOB_RUNS))]
        walls: list[list[float]] = [[] for _ in range(len(DEFAULT_JOB_RUNS) + 1)]  # the runs, then the ceiling
        for round_ in range(args.rounds):  # the collective run once, in the first round
            for k, (run, flags) in enumerate(DEFAULT_JOB_RUNS[:2] if round_ else DEFAULT_JOB_RUNS):
                out = outs[k] if round_ == 0 else Path(tmp) / f"default-{k}-{round_}"
                walls[k].append(run_cli("quantize", "--config", "configs/default.yaml", "--out", str(out), *flags)[1])
            walls[-1].append(two_jobs_at_once(Path(tmp) / f"ceiling-{round_}")["quantize_s"])
        for k, (run, _) in enumerate(DEFAULT_JOB_RUNS):
            report = json.loads((outs[k] / "quantize_report.json").read_text())
            rounds = " / ".join(f"{w:.1f}" for w in walls[k])
            rows.append({**phase_row(run, report, median(walls[k])), "rounds_s": rounds,
                         "perplexity": perplexity(str(outs[k]), args.windows)})
        for row in rows[1:]:
            row["speedup"] = rows[0]["quantize_s"] / row["quantize_s"]
            row["ppl_change_pct"] = 100 * (row["perplexity"] / rows[0]["perplexity"] - 1)
        rows[2]["same_tensors_as_object_store"] = same_tensors(outs[1], outs[2])
        rows.append({"run": "two sequential jobs at once, 1 thread each (the machine's 2-process ceiling)",
                     "quantize_s": median(walls[-1]), "rounds_s": " / ".join(f"{w:.1f}" for w in walls[-1]),
                     "speedup": 2 * rows[0]["quantize_s"] / median(walls[-1])})
        for row in rows[1:3]:  # the share of the two-process ceiling each two-worker schedule reaches
            row["of_ceiling"] = row["speedup"] / rows[3]["speedup"]
        rows[1]["of_ceiling_rounds"] = " / ".join(  # each round on its own: its data-parallel run against its ceiling
            f"{both / (2 * dp):.3f}" for dp, both in zip(walls[1], walls[-1]))
        reports = [json.loads((out / "quantize_report.json").read_text()) for out in outs[:2]]
        write_results("data_parallel_cpu", cpu_rows(*reports), ["phase", "sequential_s", "data_parallel_s", "ratio"],
                      {"runs": f"{DEFAULT_JOB_RUNS[0][0]}; {DEFAULT_JOB_RUNS[1][0]}",
                       "seconds": "over all layers; data-parallel: both workers summed"})
        timeline = reports[1]["data_parallel"]["per_layer"]
        middle = sorted(timeline, key=lambda layer: layer["timeline"]["wall_s"])[len(timeline) // 2]
        write_results("data_parallel_timeline", timeline_rows(middle),
                      ["worker", "phase", "start_s", "end_s"],
                      {"run": DEFAULT_JOB_RUNS[1][0], "layer": middle["layer"],
                       "wall_s": middle["timeline"]["wall_s"], "chosen": "the layer of median wall time"})
        write_results("data_parallel", rows, ["run", "quantize_s", "rounds_s", "layers_s", "speedup", "of_ceiling",
                                              "of_ceiling_rounds",
                                              "busy_fraction", "perplexity", "ppl_change_pct", "forward_s",
                                              "hessian_s", "reduce_s", "solve_s", "broadcast_s",
                                              "hessian_mb_per_layer", "result_mb_per_layer",
                                              "same_tensors_as_object_store"],
                      {"model": "SmolLM2-135M-Instruct, configs/default.yaml", "machine": "2 CPU cores",
                       "eval": f"{args.windows}×512 tokens",
                       "rounds": f"{args.rounds} (wall times: medians; the collective run and the phase "
                                 "columns: the first round)"})
        if args.default_job_only:
            return
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
