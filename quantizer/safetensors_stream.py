"""safetensors files read and written one tensor at a time.

A stage's shard holds all its layers — for DeepSeek-V3, eight MoE layers of 5.6 GB of packed tensors each —
and a layer checkpoint of Kimi-K2 is 8.5 GB: holding either whole (and, reading through a bytes buffer, twice)
is more host memory than quantizing the layer took. Here the header is written first from each tensor's dtype
and shape, then each tensor is read, checked and written in turn: the memory held is one tensor's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import torch

from quantizer.storage import Location

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class LazyTensor:
    """A tensor known by its safetensors dtype name and shape, read when `load` is called."""
    dtype: str
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * DTYPES[self.dtype].itemsize


def read_header(folder: Location, name: str) -> tuple[dict, int]:
    """The file's JSON header and the offset where its data begins."""
    length = int.from_bytes(folder.read_range(name, 0, 8), "little")
    return json.loads(folder.read_range(name, 8, length)), 8 + length


def lazy_tensors(folder: Location, name: str) -> dict[str, LazyTensor]:
    """Every tensor of file `name` in `folder` (local or object storage), each read alone when loaded."""
    return lazy_file(folder, name)[0]


def lazy_file(folder: Location, name: str) -> tuple[dict[str, LazyTensor], dict[str, str]]:
    """(lazy_tensors of file `name`, its header's metadata), from one read of the header."""
    header, start = read_header(folder, name)
    metadata = header.pop("__metadata__", {})

    def loader(info: dict) -> Callable[[], torch.Tensor]:
        begin, end = info["data_offsets"]

        def load() -> torch.Tensor:
            raw = bytearray(folder.read_range(name, start + begin, end - begin))
            if len(raw) != end - begin:
                raise ValueError(f"{name} is truncated: {len(raw)} of {end - begin} bytes of a tensor")
            return torch.frombuffer(raw, dtype=DTYPES[info["dtype"]]).reshape(info["shape"]) if raw else \
                torch.empty(info["shape"], dtype=DTYPES[info["dtype"]])
        return load

    return {k: LazyTensor(v["dtype"], tuple(v["shape"]), loader(v)) for k, v in header.items()}, metadata


def _header(entries: dict[str, LazyTensor], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, entry in entries.items():
        header[name] = {"dtype": entry.dtype, "shape": list(entry.shape),
                        "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return len(raw).to_bytes(8, "little") + raw


def write_streamed(folder: Location, name: str, entries: dict[str, LazyTensor], metadata: dict[str, str],
                   check: Callable[[str, torch.Tensor], None] | None = None) -> None:
    """Write `entries` as safetensors file `name`, loading one tensor at a time (`check`, if given, sees each
    before it is written). A reader never sees a half-written file: local, a temp name then a rename; object
    storage, one upload of the finished local file."""
    with folder.writing(name) as tmp, open(tmp, "wb") as f:
        f.write(_header(entries, metadata))
        for key, entry in entries.items():
            tensor = entry.load().contiguous()
            if NAMES.get(tensor.dtype) != entry.dtype or tuple(tensor.shape) != entry.shape:
                raise RuntimeError(f"{key}: read as {tensor.dtype} {tuple(tensor.shape)}, its header says "
                                   f"{entry.dtype} {entry.shape}")
            if check is not None:
                check(key, tensor)
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            del tensor
