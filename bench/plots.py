"""PNG plots of the benchmark results (bench/results/NAME.png), drawn from the rows each benchmark writes.

Every benchmark calls `save_plot` after writing its JSON; `python -m bench.plots` redraws all of them
from the JSON files already in bench/results. Needs matplotlib (`pip install -e ".[bench]"`); without
it the JSON and Markdown are still written and a warning says how to get the plots.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("bench")
RESULTS = Path(__file__).resolve().parent / "results"
Rows = list[dict[str, Any]]


def _hbars(ax, labels: list[str], values: list[float], color, xlabel: str, title: str) -> None:
    """Horizontal bars, first row on top."""
    ax.barh(labels, values, color=color)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)


def _quality(ax, rows: Rows) -> None:
    _hbars(ax, [r["setting"] for r in rows], [r["perplexity"] for r in rows],
           ["tab:gray"] + ["tab:blue"] * (len(rows) - 1), "perplexity (lower is better)",
           "SmolLM2-135M: perplexity by quantization setting")


def _ppl_sweep(ax, rows: Rows) -> None:
    float_ppl = next((r["perplexity"] for r in rows if r["method"] == "float"), None)
    for method, style in (("GPTQ", "-o"), ("RTN", "--x")):
        for group in sorted({r["group_size"] for r in rows if r["method"] == method}):
            pts = sorted((r["bits"], r["perplexity"]) for r in rows
                         if r["method"] == method and r["group_size"] == group)
            label = f"{method} {'per row' if group == -1 else f'g{group}'}"
            ax.plot([b for b, _ in pts], [p for _, p in pts], style, label=label)
    if float_ppl is not None:
        ax.axhline(float_ppl, color="black", linewidth=0.8, label=f"float ({float_ppl:.2f})")
    ax.set_yscale("log")
    ax.set_xticks(sorted({r["bits"] for r in rows if r["method"] != "float"}))
    ax.set_xlabel("bits")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title("SmolLM2-135M: perplexity vs bits and group size")
    ax.legend(fontsize=8)


def _solve(ax, rows: Rows) -> None:
    labels = [f"{r['layer']} · {r['setting']}" for r in rows]
    bars = ax.barh(labels, [r["speedup"] for r in rows], color="tab:green")
    for bar, row in zip(bars, rows):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" loss ×{row['loss_ratio']:.2f}",
                va="center", fontsize=7)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("speedup over GPTQModel's GPTQ class (same inputs; loss ratio ours/theirs)")
    ax.set_title("GPTQ solve: rayquant vs GPTQModel")


def _pipeline(ax, rows: Rows) -> None:
    _hbars(ax, [f"{r['schedule']} {r['stages']} stage(s)" for r in rows], [r["wall_s"] for r in rows],
           "tab:purple", "quantize wall time, s", "Ray pipeline: schedules and stage counts")


def _serving_decode(ax, rows: Rows) -> None:
    _hbars(ax, [f"{r['weights']} · KV {r['kv_cache']}" for r in rows], [r["tokens_per_s"] for r in rows],
           "tab:orange", "decode tokens/s, batch 1", "Serving: decode speed")


def _serving_batching(ax, rows: Rows) -> None:
    ax.bar(range(len(rows)), [r["requests_per_s"] for r in rows], color="tab:orange")
    ax.set_xticks(range(len(rows)), [str(r["max_batch_size"]) for r in rows])
    ax.set_xlabel("max_batch_size")
    ax.set_ylabel("requests/s")
    ax.set_title("Serving: throughput with batching")


def _matmul(ax, rows: Rows) -> None:
    _hbars(ax, [f"{r['projection']} · {r['tokens']} tok" for r in rows], [r["int4_speedup"] for r in rows],
           "tab:red", "int4 kernel speedup over fp16 matmul", "Dequant-matmul kernel vs fp16")
    ax.axvline(1.0, color="black", linewidth=0.8)


def _decode(ax, rows: Rows) -> None:
    ax.bar(range(len(rows)), [r["tokens_per_s"] for r in rows], color="tab:red")
    ax.set_xticks(range(len(rows)), [r["weights"] for r in rows])
    ax.set_ylabel("decode tokens/s, batch 1")
    ax.set_title("Qwen2-7B-shaped decode: fp16 vs int4")


def _serving_engines(ax, rows: Rows) -> None:
    for engine, style in (("transformers", "-o"), ("vllm", "-s")):
        pts = [(r["clients"], r["tokens_per_s"], r["p95_latency_s"]) for r in rows if r["engine"] == engine]
        ax.plot([c for c, _, _ in pts], [t for _, t, _ in pts], style, label=engine)
        for clients, tps, p95 in pts:
            ax.annotate(f"p95 {p95:.1f}s", (clients, tps), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent gRPC clients")
    ax.set_ylabel("generated tokens/s")
    ax.set_title("Serving engines on one replica: throughput (p95 latency marked)")
    ax.legend()


def _serving_kv_cache(ax, rows: Rows) -> None:
    def fraction(text: str) -> float:
        same, total = text.split("/")
        return int(same) / int(total)

    rows = [r for r in rows if "bytes_per_token" in r]
    _hbars(ax, [f"{r['engine']} · KV {r['kv_cache']} ({r['vs_fp16_bytes']:.2f}× bytes)" for r in rows],
           [fraction(r["tokens_before_divergence"]) for r in rows], "tab:green",
           "greedy tokens before divergence from the same engine's fp16 cache (fraction)", "KV cache quality")


def _rehearsal_72b(ax, rows: Rows) -> None:
    stages = sorted({r["stage"] for r in rows})
    measured = [next(r["stage_peak_rss_gb"] for r in rows if r["stage"] == k) for k in stages]
    planned = [next(r["planned_gb"] for r in rows if r["stage"] == k) for k in stages]
    x = list(range(len(stages)))
    ax.bar([i - 0.2 for i in x], planned, 0.4, label="planner estimate", color="tab:gray")
    ax.bar([i + 0.2 for i in x], measured, 0.4, label="measured peak RSS", color="tab:blue")
    for i, (m, p) in enumerate(zip(measured, planned)):
        ax.annotate(f"{m / p:.2f}×", (i + 0.2, m), textcoords="offset points", xytext=(-8, 3), fontsize=9)
    ax.set_xticks(x, [f"stage {k}" for k in stages])
    ax.set_ylabel("GiB")
    ax.set_title("Qwen2-72B-shaped layers on CPU: stage memory, planned vs measured")
    ax.legend()


def _rehearsal_72b_layer0(ax, rows: Rows) -> None:
    labels = [r["projection"].split(".")[-1] for r in rows]
    series = (("gptq_err_fit", "GPTQ, calibration tokens", "tab:blue"), ("rtn_err_fit", "RTN, calibration", "tab:gray"),
              ("gptq_err_heldout", "GPTQ, held-out text", "tab:cyan"), ("rtn_err_heldout", "RTN, held-out", "silver"))
    width = 0.8 / len(series)
    for k, (key, label, color) in enumerate(series):
        ax.bar([i + (k - 1.5) * width for i in range(len(rows))], [r[key] for r in rows], width, label=label,
               color=color)
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylabel("relative output error")
    ax.set_title("Qwen2-72B-shaped layer 0 (random weights, 8192 calibration tokens): GPTQ vs RTN, int4 g128")
    ax.legend(fontsize=8)


def _moe_quality(ax, rows: Rows) -> None:
    rows = [r for r in rows if r.get("perplexity") is not None]  # a reference that failed has no bar
    _hbars(ax, [r["setting"] for r in rows], [r["perplexity"] for r in rows],
           ["tab:gray"] + ["tab:orange" if "GPTQModel" in r["setting"] else "tab:blue" for r in rows[1:]],
           "perplexity (lower is better)", "mixture of experts: perplexity by quantization")
    low = min(r["perplexity"] for r in rows)
    ax.set_xlim(low * 0.98, max(r["perplexity"] for r in rows) * 1.01)


def _moe_solve_workers(ax, rows: Rows) -> None:
    _hbars(ax, [f"{r['model']} · {r.get('calibration', 'all')} · {r['solve_workers']} worker(s)" for r in rows],
           [r["per_layer_s"] for r in rows],
           "tab:green", "seconds per layer", "MoE expert solves on 1 and 2 workers (1 thread each)")


def _rehearsal(model: str) -> Callable[[Any, Rows], None]:
    """A dress rehearsal's layers: the stage's peak RSS against the planner's estimate."""
    def plot(ax, rows: Rows) -> None:
        x = list(range(len(rows)))
        ax.bar([i - 0.2 for i in x], [r["planned_gb"] for r in rows], 0.4, label="planner estimate",
               color="tab:gray")
        ax.bar([i + 0.2 for i in x], [r["stage_peak_rss_gb"] for r in rows], 0.4, label="measured peak RSS",
               color="tab:blue")
        ax.set_xticks(x, [f"layer {r['layer']} ({r['layer_wall_s']:.0f} s)" for r in rows])
        ax.set_ylabel("GiB")
        ax.set_title(f"{model}-shaped layers on CPU: memory, planned vs measured")
        ax.legend()
    return plot


def _data_parallel(ax, rows: Rows) -> None:
    phases = ("forward_s", "hessian_s", "reduce_s", "solve_s", "broadcast_s")
    left = [0.0] * len(rows)
    for phase, color in zip(phases, ("tab:blue", "tab:cyan", "tab:orange", "tab:green", "tab:gray")):
        values = [r.get(phase, 0.0) for r in rows]
        ax.barh([r["run"] for r in rows], values, left=left, color=color, label=phase.removesuffix("_s"))
        left = [a + b for a, b in zip(left, values)]
    ax.invert_yaxis()
    ax.set_xlabel("seconds (all layers)")
    ax.set_title("data-parallel schedule: time by phase")
    ax.legend(fontsize=8)


def _data_parallel_cpu(ax, rows: Rows) -> None:
    """Seconds per phase over all layers: one sequential stage against two data-parallel workers summed."""
    rows = [r for r in rows if r["phase"] != "all"]
    y = range(len(rows))
    ax.barh([i - 0.2 for i in y], [r["sequential_s"] for r in rows], 0.4, label="sequential, 1 stage", color="tab:blue")
    ax.barh([i + 0.2 for i in y], [r["data_parallel_s"] for r in rows], 0.4, label="data-parallel, 2 workers summed",
            color="tab:orange")
    ax.set_yticks(list(y), [r["phase"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("seconds over all layers (1 thread each: CPU-seconds)")
    ax.set_title("where the CPU time goes: sequential vs data-parallel")
    ax.legend(fontsize=8)


PHASE_COLORS = {"load": "tab:purple", "capture": "tab:blue", "reduce": "tab:orange", "solve": "tab:green",
                "broadcast": "tab:gray", "save": "tab:brown", "forward": "tab:cyan"}


def _timeline(ax, rows: Rows) -> None:
    """One layer's busy spans per data-parallel worker; gaps are the time a worker waited."""
    workers = sorted({r["worker"] for r in rows})
    for phase, color in PHASE_COLORS.items():
        for w in workers:
            spans = [(r["start_s"], r["end_s"] - r["start_s"]) for r in rows
                     if r["worker"] == w and r["phase"] == phase]
            ax.broken_barh(spans, (w - 0.35, 0.7), color=color, label=phase if w == workers[0] else None)
    ax.set_yticks(workers)
    ax.set_yticklabels([f"worker {w}" for w in workers])
    ax.invert_yaxis()
    ax.set_xlabel("seconds from the layer's start")
    ax.set_title("data-parallel: one layer's timeline (gaps: waiting)")
    ax.legend(fontsize=8, ncol=len(PHASE_COLORS), loc="upper center", bbox_to_anchor=(0.5, -0.18))


def _serving_openai(ax, rows: Rows) -> None:
    servers = list(dict.fromkeys(r["server"] for r in rows))
    levels = sorted({r["concurrency"] for r in rows})
    width = 0.8 / len(servers)
    for k, server in enumerate(servers):
        values = [next((r["output_tok_s"] for r in rows if r["server"] == server and r["concurrency"] == c), 0)
                  for c in levels]
        ax.bar([i + k * width for i in range(len(levels))], values, width, label=server)
    ax.set_xticks([i + width * (len(servers) - 1) / 2 for i in range(len(levels))])
    ax.set_xticklabels([f"{c} clients" for c in levels])
    ax.set_ylabel("output tokens/s")
    ax.set_title("vllm bench serve (OpenAI API): output tokens/s")
    ax.legend(fontsize=8)


def _coverage(ax, rows: Rows) -> None:
    statuses = ["quantized", "refused", "no tiny instance", "failed"]
    counts = [sum(r["status"] == s for r in rows) for s in statuses]
    _hbars(ax, statuses, counts, ["tab:green", "tab:orange", "tab:gray", "tab:red"], "families",
           f"transformers' decoder-only families: {counts[0]} of {len(rows)} quantize")
    for y, count in enumerate(counts):
        ax.text(count, y, f" {count}", va="center")


PLOTS: dict[str, Callable[[Any, Rows], None]] = {
    "coverage": _coverage, "serving_openai": _serving_openai,
    "quality": _quality, "ppl_sweep": _ppl_sweep, "solve": _solve, "solve_cuda": _solve, "pipeline": _pipeline,
    "serving_decode": _serving_decode, "serving_batching": _serving_batching,
    "serving_engines": _serving_engines, "serving_kv_cache": _serving_kv_cache,
    "gpu_layer_matmul": _matmul, "gpu_layer_small_matmul": _matmul,
    "gpu_layer_decode": _decode, "gpu_layer_small_decode": _decode, "rehearsal_72b": _rehearsal_72b,
    "rehearsal_72b_layer0": _rehearsal_72b_layer0, "moe_quality": _moe_quality,
    "moe_quality_trained": _moe_quality, "moe_quality_deepseek_v3": _moe_quality,
    "moe_quality_glm4_moe": _moe_quality, "moe_solve_workers": _moe_solve_workers,
    "rehearsal_235b": _rehearsal("Qwen3-235B-A22B"), "rehearsal_deepseek_v3": _rehearsal("DeepSeek-V3 (FP8 source)"),
    "rehearsal_kimi_k2": _rehearsal("Kimi-K2 (FP8 source)"),
    "data_parallel": _data_parallel, "data_parallel_7b_layer": _data_parallel, "data_parallel_timeline": _timeline,
    "data_parallel_cpu": _data_parallel_cpu,
}


def save_plot(name: str, rows: Rows) -> Path | None:
    """Draw bench/results/NAME.png when a plot is defined for NAME; returns its path (None if not drawn)."""
    if name not in PLOTS or not rows:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed, so %s.png was not drawn: pip install -e \".[bench]\"", name)
        return None
    height = 3.5 if name.endswith("_timeline") else max(3.5, 0.35 * len(rows) + 1.5)  # a timeline's rows are spans
    fig, ax = plt.subplots(figsize=(9, height))
    PLOTS[name](ax, rows)
    fig.tight_layout()
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    for path in sorted(RESULTS.glob("*.json")):
        drawn = save_plot(path.stem, json.loads(path.read_text())["rows"])
        if drawn:
            log.info("wrote %s", drawn)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
