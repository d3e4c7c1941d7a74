"""A worker's output shard: its finished layers from the layer store, plus the tensors outside the layers
(embeddings, final norm, …) when it writes the first shard and the output head when it writes the last —
written a tensor at a time, so the memory it takes is one tensor's, not the shard's."""

from __future__ import annotations

from typing import Any

import torch

from quantizer.checkpoint import write_shard
from quantizer.layer_store import FolderLayerStore
from quantizer.model_io import CheckpointReader
from quantizer.safetensors_stream import NAMES, LazyTensor
from quantizer.storage import Location


def write_layers_shard(reader: CheckpointReader, layer_store: FolderLayerStore, layers: range, first: bool,
                       last: bool, out_dtype: torch.dtype, folder: str, name: str) -> dict[str, Any]:
    """Write `layers` (+ the tensors outside the layers but the head when `first`, the head when `last`) as shard
    `name` into `folder` (a local dir, or an object-store prefix it uploads to); no NaN or Inf is written."""
    arch = reader.arch
    tensors: dict[str, LazyTensor] = {}
    for index in layers:
        if not layer_store.has(index):
            raise RuntimeError(f"layer {index} has no checkpoint; its quantization did not finish")
        prefix = arch.layer_prefix(index)
        tensors.update({arch.names.disk_name(f"{prefix}.{k}"): v for k, v in layer_store.lazy(index).items()})
    head = reader.head_names()
    names = [n for n in reader.outside_layers() if n not in head] if first else []
    if last:
        names += head
    for n in names:
        tensors[n] = _outside(reader, n, out_dtype)
    write_shard(Location(folder), name, tensors)
    return {"tensors": len(tensors), "bytes": sum(t.nbytes for t in tensors.values())}


def _outside(reader: CheckpointReader, name: str, out_dtype: torch.dtype) -> LazyTensor:
    """Tensor `name` of the source model as the shard holds it: floats in `out_dtype`."""
    info = reader.tensors[name]
    floating = info.dtype.startswith(("F", "BF"))  # F16/BF16/F32/F64, and FP8 (loaded dequantized)
    dtype = NAMES[out_dtype] if floating else info.dtype

    def load() -> torch.Tensor:
        t = reader.load([name])[name]
        return t.to(out_dtype) if floating else t
    return LazyTensor(dtype, tuple(info.shape), load)
