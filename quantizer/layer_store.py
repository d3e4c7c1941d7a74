"""Per-layer checkpoints: one safetensors file per finished layer in a folder (local or object storage),
written atomically, so a restarted stage — on this cluster or another — skips the layers it already
quantized."""

from __future__ import annotations

import dataclasses
import json
import logging
import re

import torch
from safetensors.torch import load

from quantizer.engine import LayerReport
from quantizer.storage import Location

log = logging.getLogger(__name__)
_NAME = re.compile(r"layer_(\d{5})\.safetensors")


class FolderLayerStore:
    """Files `layer_00007.safetensors` (tensors keyed relative to the layer, report in the metadata)."""

    def __init__(self, folder: Location) -> None:
        self.folder = folder
        self.folder.makedirs()

    @staticmethod
    def name(index: int) -> str:
        return f"layer_{index:05d}.safetensors"

    def has(self, index: int) -> bool:
        return self.folder.is_file(self.name(index))

    def done(self) -> list[int]:
        return sorted(int(m.group(1)) for n in self.folder.list("layer_") if (m := _NAME.fullmatch(n)))

    def save(self, index: int, tensors: dict[str, torch.Tensor], report: LayerReport) -> None:
        self.folder.write_tensors(self.name(index), {k: v.contiguous() for k, v in tensors.items()},
                                  {"report": json.dumps(dataclasses.asdict(report))})

    def report(self, index: int) -> LayerReport:
        """The report saved with a finished layer, read from the file's header alone."""
        name = self.name(index)
        length = int.from_bytes(self.folder.read_range(name, 0, 8), "little")
        header = json.loads(self.folder.read_range(name, 8, length))
        return LayerReport(**json.loads(header["__metadata__"]["report"]))

    def load(self, index: int) -> tuple[dict[str, torch.Tensor], LayerReport] | None:
        name = self.name(index)
        if not self.folder.is_file(name):
            return None
        try:
            data = self.folder.read_bytes(name)
            length = int.from_bytes(data[:8], "little")
            metadata = json.loads(data[8 : 8 + length]).get("__metadata__", {})
            report = LayerReport(**json.loads(metadata["report"]))
            tensors = load(data)
        except Exception as exc:  # a torn or corrupt file: quantize that layer again
            log.warning("layer checkpoint %s/%s is unreadable (%s); quantizing layer %d again", self.folder, name,
                        exc, index)
            self.folder.remove(name)
            return None
        return tensors, report
