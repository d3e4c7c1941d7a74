"""Per-layer checkpoints: one safetensors file per finished layer in a folder (local or object storage),
written atomically, so a restarted stage — on this cluster or another — skips the layers it already
quantized. A sparse layer whose experts are streamed also leaves a part file at each resume point (after its
attention part, after each chunk of experts), so a stage stopped inside a layer — a 671B MoE layer is minutes on
GPUs, over an hour on CPUs — resumes at its last finished chunk."""

from __future__ import annotations

import dataclasses
import json
import logging
import re

import torch
from safetensors import SafetensorError

from typing import Any

from quantizer.engine import LayerParts, LayerReport
from quantizer.safetensors_stream import LazyTensor, lazy_file, lazy_tensors
from quantizer.storage import Location

log = logging.getLogger(__name__)
_NAME = re.compile(r"layer_(\d{5})\.safetensors")
_PART = re.compile(r"layer_(\d{5})\.part_(\d{5})\.safetensors")


class FolderLayerStore:
    """Files `layer_00007.safetensors` (tensors keyed relative to the layer, report in the metadata)."""

    def __init__(self, folder: Location) -> None:
        self.folder = folder
        self.folder.makedirs()

    @staticmethod
    def name(index: int) -> str:
        return f"layer_{index:05d}.safetensors"

    @staticmethod
    def part_name(index: int, part: int) -> str:
        return f"layer_{index:05d}.part_{part:05d}.safetensors"

    def has(self, index: int) -> bool:
        return self.folder.is_file(self.name(index))

    def done(self) -> list[int]:
        return sorted(int(m.group(1)) for n in self.folder.list("layer_") if (m := _NAME.fullmatch(n)))

    def save(self, index: int, tensors: dict[str, torch.Tensor], report: LayerReport) -> None:
        """The finished layer (its part files, if any, are removed once it is written)."""
        self.folder.write_tensors(self.name(index), {k: v.contiguous() for k, v in tensors.items()},
                                  {"report": json.dumps(dataclasses.asdict(report))})
        self.remove_parts(index)

    def save_part(self, index: int, part: int, tensors: dict[str, torch.Tensor], report: str,
                  state: dict[str, Any]) -> None:
        """Part `part` (0, 1, …) of unfinished layer `index`: the tensors new since the part before, the report
        (JSON of the LayerReport as of this part) and the engine's state."""
        self.folder.write_tensors(self.part_name(index, part), {k: v.contiguous() for k, v in tensors.items()},
                                  {"report": report, "state": json.dumps(state)})

    def lazy(self, index: int) -> dict[str, LazyTensor]:
        """Finished layer `index`'s tensors, each read when loaded."""
        return lazy_tensors(self.folder, self.name(index))

    def parts(self, index: int) -> list[int]:
        """Numbers of layer `index`'s part files, ascending."""
        prefix = f"layer_{index:05d}.part_"
        return sorted(int(m.group(2)) for n in self.folder.list(prefix) if (m := _PART.fullmatch(n)))

    def load_parts(self, index: int) -> LayerParts | None:
        """The parts 0 … k of unfinished layer `index` that read back whole, merged (None without part 0); parts
        after a missing or corrupt one are removed (their work is done again). A read that fails (storage
        unreachable) raises: parts are not discarded for it."""
        merged: LayerParts | None = None
        numbers = self.parts(index)
        for expected, part in enumerate(numbers):
            name = self.part_name(index, part)
            why = f"part {expected} is missing" if part != expected else None
            if why is None:
                try:
                    tensors, report, metadata = _read(self.folder, name)
                    state = json.loads(metadata["state"])
                except (SafetensorError, ValueError, KeyError, TypeError) as exc:  # torn or corrupt
                    why = str(exc)
            if why is not None:
                log.warning("layer %d's part checkpoint %s/%s cannot be used (%s); resuming before it", index,
                            self.folder, name, why)
                for later in numbers[expected:]:
                    self.folder.remove(self.part_name(index, later))
                break
            merged = LayerParts({**(merged.tensors if merged else {}), **tensors}, report, state)
        return merged

    def remove_parts(self, index: int) -> None:
        """Discard layer `index`'s part files."""
        for part in self.parts(index):
            self.folder.remove(self.part_name(index, part))

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
            tensors, report, _ = _read(self.folder, name)
        except Exception as exc:  # a torn or corrupt file: quantize that layer again
            log.warning("layer checkpoint %s/%s is unreadable (%s); quantizing layer %d again", self.folder, name,
                        exc, index)
            self.folder.remove(name)
            return None
        return tensors, report


def _read(folder: Location, name: str) -> tuple[dict[str, torch.Tensor], LayerReport, dict[str, str]]:
    """A layer or part file → (its tensors, the report in its metadata, the whole metadata), read a tensor at a
    time (no copy of the whole file in memory). A torn or corrupt file raises ValueError or KeyError."""
    lazy, metadata = lazy_file(folder, name)
    tensors = {k: v.load() for k, v in lazy.items()}
    return tensors, LayerReport(**json.loads(metadata["report"])), metadata
