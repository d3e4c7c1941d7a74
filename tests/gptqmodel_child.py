"""GPTQModel's loader, run in a child process: loading a mixture-of-experts checkpoint makes it patch
transformers' MoE classes for the rest of the process (its `defuser`), which must not leak into other tests."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import torch

_SCRIPT = """
import os, sys, torch
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
from gptqmodel import GPTQModel
model_dir, work = sys.argv[1], sys.argv[2]
ids = torch.load(os.path.join(work, "ids.pt"))
with torch.inference_mode():
    logits = GPTQModel.load(model_dir, device="cpu").model(ids).logits.float()
torch.save(logits, os.path.join(work, "logits.pt"))
"""


def gptqmodel_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] of GPTQModel 7.6.0's CPU model of `model_dir` on token ids [B, T]."""
    with tempfile.TemporaryDirectory(prefix="gptqmodel-") as work:
        torch.save(ids, Path(work) / "ids.pt")
        done = subprocess.run([sys.executable, "-c", _SCRIPT, str(model_dir), work], capture_output=True, text=True,
                              timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"GPTQModel failed to load {model_dir}:\n{done.stderr[-3000:]}")
        return torch.load(Path(work) / "logits.pt")
