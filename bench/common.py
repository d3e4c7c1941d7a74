"""Helpers shared by the benchmarks: run the CLI in a subprocess, write JSON + Markdown results."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench.plots import save_plot

log = logging.getLogger("bench")
RESULTS = Path(__file__).resolve().parent / "results"


def run_cli(*args: str, timeout: int = 3600) -> tuple[str, float]:
    """Run `python -m rayquant.cli ARGS`; returns (stdout, wall seconds); raises with stderr on failure."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "rayquant.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if done.returncode:
        raise RuntimeError(f"rayquant {' '.join(args)} failed:\n{done.stderr[-4000:]}")
    return done.stdout, time.perf_counter() - start


def free_port() -> int:
    """A TCP port free on loopback right now (for a benchmark's own server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_results(name: str, rows: list[dict], columns: list[str], meta: dict) -> None:
    """bench/results/NAME.json (rows + meta), NAME.md (a table) and NAME.png (see bench/plots.py)."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    text = f"# {name}\n\n" + "\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n\n" + "\n".join(lines) + "\n"
    (RESULTS / f"{name}.md").write_text(text)
    save_plot(name, rows)
    log.info("\n%s", text)


def _fmt(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)
