"""A worker's output shard: its finished layers from the layer store, plus the tensors outside the layers
(embeddings, final norm, …) when it writes the first shard and the output head when it writes the last."""

from __future__ import annotations

from typing import Any

import torch

from quantizer.checkpoint import check_finite, write_shard
from quantizer.layer_store import FolderLayerStore
from quantizer.model_io import CheckpointReader
from quantizer.storage import Location


def write_layers_shard(reader: CheckpointReader, layer_store: FolderLayerStore, layers: range, first: bool,
                       last: bool, out_dtype: torch.dtype, folder: str, name: str) -> dict[str, Any]:
    """Write `layers` (+ the tensors outside the layers but the head when `first`, the head when `last`) as shard
    `name` into `folder` (a local dir, or an object-store prefix it uploads to); no NaN or Inf is written."""
    arch = reader.arch
    tensors: dict[str, torch.Tensor] = {}
    for index in layers:
        saved = layer_store.load(index)
        if saved is None:
            raise RuntimeError(f"layer {index} has no checkpoint; its quantization did not finish")
        prefix = arch.layer_prefix(index)
        tensors.update({arch.names.disk_name(f"{prefix}.{k}"): v for k, v in saved[0].items()})
    head = reader.head_names()
    names = [n for n in reader.outside_layers() if n not in head] if first else []
    if last:
        names += head
    tensors.update({n: t.to(out_dtype) if t.is_floating_point() else t for n, t in reader.load(names).items()})
    check_finite(tensors)
    write_shard(Location(folder), name, tensors)
    return {"tensors": len(tensors), "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}
