"""The stage actor: one per GPU (or CPU budget). Loads only its own layers, quantizes them with the
layer-wise engine, streams activations to the next stage and writes its own shard."""

from __future__ import annotations

import logging
import os
from typing import Any, Iterator

import ray
import torch

from cluster.shards import write_layers_shard
from cluster.solve_workers import RaySolver
from quantizer.activations import ActivationChunk, TokenBatch
from quantizer.config import QuantConfig
from quantizer.engine import LayerReport, StageEngine, StagePhase, output_dtype
from quantizer.host_memory import peak_rss_mb
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


def stage_engine(model: ModelRef, layers: range, qcfg: QuantConfig, layers_url: str, threads: int, store,
                 solver, emit_outputs: bool = True) -> tuple[CheckpointReader, FolderLayerStore, StageEngine]:
    """The engine a worker runs: `threads` torch threads (the same everywhere: results must not depend on
    the split), its device (a GPU when Ray gave it one), fp32 compute on CPU, the checkpoint dtype on GPU;
    `emit_outputs`: whether anything reads its last layer's outputs."""
    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
    reader = CheckpointReader(model.open())
    stored = reader.embedding_info().dtype_torch
    dtype = torch.float32 if device == "cpu" else output_dtype(stored)
    layer_store = FolderLayerStore(Location(layers_url))
    return reader, layer_store, StageEngine(reader, layers, qcfg, store, layer_store, device, dtype, solver,
                                            emit_outputs)


@ray.remote
class StageWorker:
    def __init__(self, index: int, model: ModelRef, layers: range, qcfg: QuantConfig, layers_url: str,
                 first: bool, last: bool, threads: int, solve_workers: int = 1, gpus: float = 0) -> None:
        """model: as the driver resolved it (local dir, Hub commit, or URL; shards are fetched on first use);
        layers_url: the folder of per-layer checkpoints (local or object storage); solve_workers: processes
        that solve a layer's units, this one included (the others are Ray tasks of the same size)."""
        self.index, self.first, self.last = index, first, last
        self.store = RayObjectStore()
        solver = RaySolver(solve_workers, threads, gpus) if solve_workers > 1 else LocalSolver()
        self.reader, self.layer_store, self.engine = stage_engine(model, layers, qcfg, layers_url, threads, self.store,
                                                                  solver, emit_outputs=not last)
        self.device = str(self.engine.device)
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
            chunk = self.engine.forward_layer(self._float_layers[index], index, chunk)
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
        return write_layers_shard(self.reader, self.layer_store, self.engine.layers, self.first, self.last,
                                  self.engine.out_dtype, folder, name)

    def stats(self) -> dict[str, Any]:
        """bytes_read: object-store reads (each layer pass re-reads its inputs); bytes_emitted: activations
        handed to later stages."""
        solver = self.engine.solver
        return {"stage": self.index, "peak_rss_mb": peak_rss_mb(), "bytes_read": self.store.bytes_read,
                "solves_elsewhere": getattr(solver, "remote_jobs", 0),
                "bytes_emitted": self.bytes_emitted, "device": self.device, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id()}
