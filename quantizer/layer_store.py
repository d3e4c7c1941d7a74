"""Per-layer checkpoints on disk: one safetensors file per finished layer, written atomically, so a
restarted stage skips the layers it already quantized."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quantizer.engine import LayerReport

log = logging.getLogger(__name__)


class DiskLayerStore:
    """Files `layer_00007.safetensors` (tensors keyed relative to the layer, report in the metadata)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, index: int) -> Path:
        return self.directory / f"layer_{index:05d}.safetensors"

    def done(self) -> list[int]:
        return sorted(int(p.stem.split("_")[1]) for p in self.directory.glob("layer_*.safetensors"))

    def save(self, index: int, tensors: dict[str, torch.Tensor], report: LayerReport) -> None:
        tmp = self.path(index).with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"report": json.dumps(dataclasses.asdict(report))})
        os.replace(tmp, self.path(index))

    def load(self, index: int) -> tuple[dict[str, torch.Tensor], LayerReport] | None:
        path = self.path(index)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                report = LayerReport(**json.loads(f.metadata()["report"]))
        except Exception as exc:  # a torn or corrupt file: quantize that layer again
            log.warning("layer checkpoint %s is unreadable (%s); quantizing layer %d again", path, exc, index)
            path.unlink(missing_ok=True)
            return None
        return tensors, report
