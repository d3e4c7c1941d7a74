"""The stage actor: one per GPU (or CPU budget). Loads only its own layers, quantizes them with the
layer-wise engine, streams activations to the next stage and writes its own shard."""

from __future__ import annotations

import logging
import os
from typing import Any, Iterator

import ray
import torch

from cluster.solve_workers import RaySolver
from quantizer.activations import ActivationChunk, TokenBatch
from quantizer.checkpoint import check_finite, write_shard
from quantizer.config import QuantConfig
from quantizer.engine import LayerReport, StageEngine, StagePhase, output_dtype, peak_rss_mb
from quantizer.layer_store import FolderLayerStore
from quantizer.model_io import CheckpointReader
from quantizer.solvers import LocalSolver
from quantizer.sources import ModelRef
from quantizer.storage import Location

log = logging.getLogger(__name__)


class RayObjectStore:
    """Activations between layer passes live in Ray's object store (spilled to disk when full),
    so a stage's own memory stays at one layer plus one batch however many samples there are."""

    def __init__(self) -> None:
        self.bytes_read = 0

    def put(self, chunk: ActivationChunk) -> ray.ObjectRef:
        return ray.put(chunk)

    def get(self, handle: ray.ObjectRef) -> ActivationChunk:
        chunk = ray.get(handle)
        self.bytes_read += chunk.nbytes
        return chunk


@ray.remote
class StageWorker:
    def __init__(self, index: int, model: ModelRef, layers: range, qcfg: QuantConfig, layers_url: str,
                 first: bool, last: bool, threads: int, solve_workers: int = 1, gpus: float = 0) -> None:
        """model: as the driver resolved it (local dir, Hub commit, or URL; shards are fetched on first use);
        layers_url: the folder of per-layer checkpoints (local or object storage); solve_workers: processes
        that solve a layer's units, this one included (the others are Ray tasks of the same size)."""
        torch.set_num_threads(threads)  # the same in every stage: results must not depend on the split
        self.index, self.first, self.last = index, first, last
        self.device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        self.reader = CheckpointReader(model.open())
        dtype = torch.float32 if self.device == "cpu" else output_dtype(
            self.reader.tensors[self.reader.arch.embed + ".weight"].dtype_torch)
        self.store = RayObjectStore()
        self.layer_store = FolderLayerStore(Location(layers_url))
        solver = RaySolver(solve_workers, threads, gpus) if solve_workers > 1 else LocalSolver()
        self.engine = StageEngine(self.reader, layers, qcfg, self.store, self.layer_store, self.device, dtype, solver)
        self.bytes_emitted = 0
        self._float_layers: dict[int, torch.nn.Module] = {}

    def pid(self) -> int:
        return os.getpid()

    def _as_activations(self, item: TokenBatch | ActivationChunk) -> ActivationChunk:
        return self.engine.embed(item) if isinstance(item, TokenBatch) else item

    def forward_float(self, item: TokenBatch | ActivationChunk) -> ActivationChunk:
        """This stage's float layers on one batch (builds the float inputs of later stages when pipelined)."""
        chunk = self._as_activations(item)
        for index in self.engine.layers:
            if index not in self._float_layers:
                self._float_layers[index] = self.engine.float_layer(index)
            chunk = self.engine.forward_layer(self._float_layers[index], chunk)
        self.bytes_emitted += chunk.nbytes
        return chunk

    def quantize(self, inputs: list[ray.ObjectRef]) -> Iterator[LayerReport | StagePhase]:
        """Streams what the stage is doing and one LayerReport per layer. Finished layers found in the layer
        store are replayed, not re-solved."""
        self._float_layers.clear()
        handles = [self.store.put(self._as_activations(ray.get(ref))) if self.first else ref for ref in inputs]
        yield from self.engine.quantize(handles)

    def emit_outputs(self) -> Iterator[ActivationChunk]:
        """Streams the last layer's quantized outputs; the caller owns the objects it receives."""
        for handle in self.engine.outputs:
            chunk = self.store.get(handle)
            self.bytes_emitted += chunk.nbytes
            yield chunk
        self.engine.outputs = []  # the next stage holds them now

    def write_shard(self, folder: str, name: str) -> dict[str, Any]:
        """Write this stage's layers (+ embeddings / norm / head on the ends) as one shard into `folder`
        (a local dir, or an object-store prefix it uploads to)."""
        arch, out_dtype = self.reader.arch, self.engine.out_dtype
        tensors: dict[str, torch.Tensor] = {}
        for index in self.engine.layers:
            saved = self.layer_store.load(index)
            if saved is None:
                raise RuntimeError(f"layer {index} has no checkpoint; the stage did not finish")
            prefix = arch.layer_prefix(index)
            tensors.update({f"{prefix}.{arch.to_disk(k)}": v for k, v in saved[0].items()})
        names = []
        if self.first:
            names.append(arch.embed + ".weight")
        if self.last:
            names += [n for n in self.reader.tensors if n.startswith((arch.final_norm + ".", arch.lm_head + "."))]
        tensors.update({n: t.to(out_dtype) for n, t in self.reader.load(names).items()})
        check_finite(tensors)
        write_shard(Location(folder), name, tensors)
        return {"tensors": len(tensors), "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}

    def stats(self) -> dict[str, Any]:
        """bytes_read: object-store reads (each layer pass re-reads its inputs); bytes_emitted: activations
        handed to later stages."""
        solver = self.engine.solver
        return {"stage": self.index, "peak_rss_mb": peak_rss_mb(), "bytes_read": self.store.bytes_read,
                "solves_elsewhere": getattr(solver, "remote_jobs", 0),
                "bytes_emitted": self.bytes_emitted, "device": self.device, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id()}
