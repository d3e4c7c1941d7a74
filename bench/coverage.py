"""Which of transformers' decoder-only families rayquant quantizes.

Every model_type of transformers' causal-LM mapping that is a decoder-only text model
(`bench/tiny_families.py: decoder_only_families`) is tried on a tiny random instance built from its own config
class (`tiny_config`: every size shrunk, one layer of each kind the family has): quantized through the
pipeline (int4 g32, 16 calibration samples of 64 tokens, one stage on a local Ray), loaded with rayquant's
loader and compared with transformers' own model carrying the dequantized weights (logits within 1e-4).
A family ends as
- quantized: all of the above holds;
- refused: rayquant stopped it before any work, with the reason it gives users;
- no tiny instance: transformers could not build the family from its config class at tiny sizes (the bench's
  limit, not rayquant's: these count against coverage all the same);
- failed: anything else (a bug).

Usage: python -m bench.coverage [--families a,b,…]   (about 30 min on 2 cores; writes bench/results/coverage.*;
with --families, those rows are re-measured and the others kept from the last results)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import tempfile
import time
import warnings
from pathlib import Path

import torch

from bench.common import RESULTS, write_results
from bench.tiny_families import decoder_only_families, dequantized_reference, write_tiny_family

log = logging.getLogger("bench.coverage")
SETTINGS = {"calibration.num_samples": 16, "calibration.max_len": 64, "calibration.batch_size": 4,
            "quant.group_size": 32, "quant.desc_act": False, "resources.cpus_per_stage": 1, "stages": 1}
TIMEOUT_S = 600


class _Timeout(Exception):
    pass


def _alarm(*_):
    raise _Timeout(f"no result within {TIMEOUT_S} s")


def try_family(model_type: str, root: Path) -> dict:
    """One family through build → quantize → load → compare; the row for the table."""
    from cluster.driver import Driver
    from cluster.job import load_job
    from quantizer.errors import ConfigError
    from quantizer.loading import load_model
    from quantizer.model_io import CheckpointReader

    row = {"model_type": model_type, "status": "", "layers": "", "projections": "", "seconds": 0.0, "reason": ""}
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIMEOUT_S)
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = write_tiny_family(root / model_type, model_type)
        except Exception as exc:  # noqa: BLE001 - transformers' own config/model code at tiny sizes
            return {**row, "status": "no tiny instance", "reason": _line(exc)}
        out = root / f"{model_type}-gptq"
        try:
            Driver(load_job(None, {**SETTINGS, "model": str(model), "output_dir": str(out)})).run()
        except ConfigError as exc:
            return {**row, "status": "refused", "reason": _line(exc)}
        arch = CheckpointReader(model).arch
        sparse = sum(arch.is_sparse(i) for i in range(arch.num_layers))
        row["layers"] = f"{arch.num_layers} ({sparse} with experts)" if sparse else str(arch.num_layers)
        row["projections"] = sum(len(arch.linear_names(i)) for i in range(arch.num_layers))
        ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            ours = load_model(out)(ids, use_cache=False).logits
            reference = dequantized_reference(model, out)(ids, use_cache=False).logits
        error = float((ours - reference).norm() / reference.norm())
        if not torch.isfinite(ours).all() or error >= 1e-4:
            return {**row, "status": "failed", "reason": f"logits differ from the dequantized reference ({error:.2e})"}
        return {**row, "status": "quantized", "reason": f"logits within {error:.0e} of the dequantized reference"}
    except Exception as exc:  # noqa: BLE001 - the table records it
        log.exception("%s failed", model_type)
        return {**row, "status": "failed", "reason": _line(exc)}
    finally:
        signal.alarm(0)
        row["seconds"] = time.perf_counter() - start


def _line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if not type(exc).__name__.endswith("ConfigError") else str(exc)
    return " ".join(text.split())[:300].replace("|", "/")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="", help="comma-separated model_types (default: every one)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    torch.set_num_threads(2)
    import ray

    families = [f for f in args.families.split(",") if f] or list(decoder_only_families())
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    rows = []
    with tempfile.TemporaryDirectory(prefix="coverage-") as tmp:
        for family in families:
            row = try_family(family, Path(tmp))
            rows.append(row)
            log.info("%-24s %-16s %s", family, row["status"], row["reason"][:120])
    ray.shutdown()
    if args.families:  # re-measured rows replace theirs; every other family keeps its last result
        last = RESULTS / "coverage.json"
        previous = json.loads(last.read_text())["rows"] if last.is_file() else []
        fresh = {r["model_type"]: r for r in rows}
        rows = [fresh.pop(r["model_type"], r) for r in previous] + list(fresh.values())
    done = sum(r["status"] == "quantized" for r in rows)
    meta = {"families": len(rows), "quantized": done, "coverage": f"{100 * done / len(rows):.0f} %",
            "transformers": __import__("transformers").__version__,
            "what": "every decoder-only text model_type of transformers' causal-LM mapping, on a tiny random "
                    "instance of its own config class: quantized (int4 g32) through the pipeline and loaded, logits "
                    "against transformers' model carrying the dequantized weights",
            "command": "python -m bench.coverage"}
    write_results("coverage", rows, ["model_type", "status", "layers", "projections", "reason"], meta)


if __name__ == "__main__":
    main()
