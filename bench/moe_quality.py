"""Perplexity of a mixture of experts float vs int4 and int3 — SmolLM2-135M upcycled into a Qwen2-MoE with 8
noisy copies of each MLP as experts and a random router (bench/upcycle_moe.py; `--model upcycled`, the
default), or a small MoE trained from scratch (bench/train_moe.py, 16 experts: Qwen3-MoE, DeepSeek-V3 with
MLA, or GLM-4.5; `--model trained --family F`) — (g64 sym, group-aware order): GPTQ with each calibration
mode (auto, the default: routed tokens, every token for experts short of a full-rank Hessian; every token;
routed only), round-to-nearest, and GPTQModel 7.6.0 on the same settings (its MoE
default: routed tokens, RTN below 0.5 % of the tokens), all with the same 128 calibration samples of the
shipped Wikipedia text (≤ 512 tokens) and evaluated on the shipped gensim Wikipedia text (32 × 512
tokens). Also the per-layer wall with 1 and 2 solve workers, on that model and on a wider random MoE
(hidden 2048, 16 experts of width 2048) where the expert solves weigh as much as the calibration passes.

Usage: python -m bench.moe_quality [--model upcycled|trained] [--family qwen3_moe|deepseek_v3|glm4_moe]
                                   [--windows 32] [--no-workers | --workers-only]
(needs the interop extra; ~90 min for the upcycled model)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, run_cli, write_results
from bench import train_moe, upcycle_moe
from tests.tiny_models import write_tiny_moe

log = logging.getLogger("bench.moe_quality")
CALIBRATION = ["--num-samples", "128", "--max-len", "512"]
BITS = (4, 3)


def settings(bits: int) -> list[str]:
    return ["--bits", str(bits), "--group-size", "64", "--sym", "--no-desc-act", *CALIBRATION]


RUNS = {  # key: (label, extra flags); "gptqmodel" is the reference
    "auto": ("GPTQ auto (routed tokens; every token for experts short of a full-rank Hessian)",
             ["--moe-calibration", "auto"]),
    "all": ("GPTQ every expert on every token", ["--moe-calibration", "all"]),
    "routed": ("GPTQ routed tokens only", ["--moe-calibration", "routed"]),
    "rtn": ("RTN", ["--method", "rtn"]),
}
GPTQMODEL = "GPTQModel 7.6.0 (routed tokens, RTN below 0.5 %)"


def _previous(table: str) -> list[dict]:
    path = RESULTS / f"{table}.json"
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def perplexity(model: str, windows: int) -> float:
    out, _ = run_cli("eval", "--model", model, "--max-windows", str(windows))
    return json.loads(out.strip().splitlines()[-1])["perplexity"]


def gptqmodel_quantize(float_dir: Path, out: Path, bits: int) -> float:
    """GPTQModel 7.6.0 on the same settings and the same calibration token sequences; returns its wall."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer

    from quantizer.calibration import CalibrationConfig, default_calibration_file, tokenize_samples

    tokenizer = AutoTokenizer.from_pretrained(float_dir)
    samples = tokenize_samples(default_calibration_file(), tokenizer, CalibrationConfig(num_samples=128, max_len=512))
    calibration = [{"input_ids": s.tolist(), "attention_mask": [1] * len(s)} for s in samples]
    start = time.perf_counter()
    model = GPTQModel.load(str(float_dir), QuantizeConfig(bits=bits, group_size=64, sym=True, desc_act=False,
                                                          act_group_aware=True), device="cpu")
    model.quantize(calibration, batch_size=8, tokenizer=tokenizer)
    model.save(str(out))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--model", choices=["upcycled", "trained"], default="upcycled")
    parser.add_argument("--family", choices=sorted(train_moe.MODELS), default="qwen3_moe",
                        help="the trained model's architecture (--model trained)")
    parser.add_argument("--train-minutes", type=float, default=8.0)
    parser.add_argument("--no-workers", action="store_true", help="skip the solve-workers timing")
    parser.add_argument("--workers-only", action="store_true",
                        help="only the solve-workers timing, on the wide random MoE")
    parser.add_argument("--runs", default=",".join([*RUNS, "gptqmodel"]),
                        help="which rows to (re)measure, comma-separated; the others are kept from the last results")
    args = parser.parse_args()
    if args.workers_only:
        solve_worker_rows([])
        return
    if args.model == "upcycled":
        float_dir = upcycle_moe.default_out()
        if not float_dir.exists():
            upcycle_moe.upcycle(float_dir)
        about = "SmolLM2-135M upcycled: Qwen2-MoE, 8 experts (the MLP + 5 % noise each), top-2, random router"
        table = "moe_quality"
    else:
        float_dir = train_moe.default_out(args.family)
        training = train_moe.train(float_dir, args.train_minutes, family=args.family) if not float_dir.exists() \
            else json.loads((float_dir / "training.json").read_text())
        name = {"qwen3_moe": "Qwen3-MoE", "deepseek_v3": "DeepSeek-V3 (MLA, dense first layer, shared expert)",
                "glm4_moe": "GLM-4.5 (GLM4-MoE: dense first layer, shared expert)"}[args.family]
        about = (f"{name} 16 experts top-2, 4 layers, hidden 256, trained {training['tokens']} tokens "
                 f"({training['seconds']:.0f} s; bench/train_moe.py --family {args.family})")
        table = "moe_quality_trained" if args.family == "qwen3_moe" else f"moe_quality_{args.family}"
    quality_rows(float_dir, about, table, args.runs.split(","), args.windows)
    if not args.no_workers:
        solve_worker_rows([(float_dir, "upcycled SmolLM2 (hidden 576, 8 × 1536 experts)" if args.model == "upcycled"
                            else "trained (hidden 256, 16 × 256 experts)")])


def quality_rows(float_dir: Path, about: str, table: str, wanted: list[str], windows: int) -> None:
    """Perplexity of float, every rayquant setting in `wanted` and GPTQModel at int4 and int3; other rows are kept
    from the last results. Writes `table`.*"""
    kept = {r["setting"]: r for r in _previous(table)}
    rows = [{"setting": "float (fp16 weights)", "perplexity": perplexity(str(float_dir), windows)}]
    meta = {"model": about,
            "quantization": "g64 sym, group-aware order (no act-order)",
            "calibration": "128 shipped Wikipedia samples ≤ 512 tokens", "eval": f"{windows}×512 tokens",
            "machine": "2 CPU cores"}
    columns = ["setting", "perplexity", "quantize_s", "layers_s", "fallback_experts", "min_expert_tokens"]
    with tempfile.TemporaryDirectory() as tmp:
        for bits in BITS:
            for key, (label, flags) in RUNS.items():
                if key not in wanted:
                    rows += [kept[f"int{bits} rayquant {label}"]] if f"int{bits} rayquant {label}" in kept else []
                    continue
                out = str(Path(tmp) / f"int{bits}-{key}")
                _, wall = run_cli("quantize", "--model", str(float_dir), "--out", out, "--stages", "1",
                                  *settings(bits), *flags)
                report = json.loads((Path(out) / "quantize_report.json").read_text())
                layers = [r for s in report["stages"] for r in s["layer_reports"]]
                rows.append({"setting": f"int{bits} rayquant {label}", "perplexity": perplexity(out, windows),
                             "quantize_s": wall, "layers_s": sum(r["seconds"] for r in layers),
                             "fallback_experts": sum(len(r["expert_fallbacks"]) for r in layers),
                             "min_expert_tokens": min((min(r["expert_tokens"]) for r in layers if r["expert_tokens"]),
                                                      default=None)})
                write_results(table, rows, columns, meta)
            if "gptqmodel" not in wanted:
                rows += [kept[f"int{bits} {GPTQMODEL}"]] if f"int{bits} {GPTQMODEL}" in kept else []
                continue
            out = Path(tmp) / f"int{bits}-gptqmodel"
            try:
                wall = gptqmodel_quantize(float_dir, out, bits)
                rows.append({"setting": f"int{bits} {GPTQMODEL}", "perplexity": perplexity(str(out), windows),
                             "quantize_s": wall})
            except Exception as exc:  # noqa: BLE001 - the reference's own failure is a result too
                log.exception("GPTQModel failed")
                rows.append({"setting": f"int{bits} {GPTQMODEL}: failed ({type(exc).__name__}: "
                                        f"{str(exc).splitlines()[0][:120]})", "perplexity": None})
            write_results(table, rows, columns, meta)
    write_results(table, rows, columns, meta)  # with the rows kept after the last one measured


def solve_worker_rows(models: list[tuple[Path, str]]) -> None:
    """Per-layer wall with the expert solves on 1 and 2 processes (1 thread each): on `models` ((dir, label),
    with the quality runs' calibration) and on a wider random MoE where the solves weigh as much as the
    calibration passes. Writes moe_solve_workers.*"""
    workers = []
    with tempfile.TemporaryDirectory() as tmp:
        wide = write_tiny_moe(Path(tmp) / "wide", "qwen3_moe", layers=2, hidden=2048, intermediate=2048,
                              num_experts=16, moe_intermediate_size=2048)
        runs = [(model, label, CALIBRATION, mode) for model, label in models for mode in ("all", "routed")]
        runs += [(wide, "random (hidden 2048, 16 × 2048 experts)", ["--num-samples", "8", "--max-len", "256"], mode)
                 for mode in ("all", "routed")]
        for model, label, calibration, mode in runs:
            for n in (1, 2):  # the expert solves on 1 and 2 processes, 1 thread each
                out = str(Path(tmp) / f"workers{n}-{model.name}-{mode}")
                _, wall = run_cli("quantize", "--model", str(model), "--out", out, "--stages", "1",
                                  "--cpus-per-stage", "1", "--solve-workers", str(n), "--bits", "4", "--group-size",
                                  "64", "--sym", "--no-desc-act", "--moe-calibration", mode, *calibration)
                report = json.loads((Path(out) / "quantize_report.json").read_text())
                layers = [r for s in report["stages"] for r in s["layer_reports"]]
                workers.append({"model": label, "calibration": mode, "solve_workers": n, "quantize_s": wall,
                                "per_layer_s": sum(r["seconds"] for r in layers) / len(layers)})
            workers[-1]["speedup"] = workers[-2]["per_layer_s"] / workers[-1]["per_layer_s"]
            workers[-2]["speedup"] = 1.0
    write_results("moe_solve_workers", workers, ["model", "calibration", "solve_workers", "per_layer_s", "speedup",
                                                 "quantize_s"],
                  {"machine": "2 CPU cores", "threads": "1 per worker (the stage + Ray tasks)",
                   "settings": "int4 g64 sym; calibration all: every expert on every token (one shared gate/up "
                               "factorization, every expert run on every token), routed: each expert on its own "
                               "tokens (a factorization per expert)"})


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
