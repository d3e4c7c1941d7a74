"""One worker of the data-parallel schedule: it holds the layer being quantized and 1/W of the calibration
sequences, whose activations never leave it. For each capture pass it accumulates partial Hessians over its
own batches and hands each owner the partials of the units that owner solves; an owner sums the W partials
in worker order (the same bits on every rerun with the same W), solves its units, and every worker applies
every owner's results before the next pass. Finally each worker pushes its own batches through the
quantized layer. Only Hessians, results (packed weights) and control messages cross between workers: through
Ray's object store (`partials`, `solve`, `apply`) or a torch.distributed group (`exchange`: NCCL on GPUs,
gloo on CPUs).
"""

from __future__ import annotations

import os
import time
from typing import Any

import ray
import torch

from cluster import collective
from cluster.shards import write_layers_shard
from cluster.stage import stage_engine
from quantizer.activations import ActivationChunk, TokenBatch
from quantizer.config import QuantConfig
from quantizer.decoder import Unit
from quantizer.engine import LayerReport, LayerWork, peak_rss_mb
from quantizer.hessian import reduce_in_order
from quantizer.layer_builder import build_quantized_layer
from quantizer.result import QuantResult
from quantizer.solvers import LocalSolver
from quantizer.sources import ModelRef


def _hessian_bytes(accs: dict) -> int:
    return sum(acc.xtx.numel() * acc.xtx.element_size() for acc in {id(a): a for a in accs.values()}.values())


class MemoryStore:
    """Activations stay in this worker's memory: they are never sent anywhere."""

    def put(self, chunk: ActivationChunk) -> ActivationChunk:
        return chunk

    def get(self, handle: ActivationChunk) -> ActivationChunk:
        return handle


@ray.remote
class DataParallelWorker:
    def __init__(self, rank: int, world: int, model: ModelRef, qcfg: QuantConfig, layers_url: str, threads: int,
                 num_layers: int) -> None:
        self.rank, self.world = rank, world
        self.reader, self.layer_store, self.engine = stage_engine(model, range(num_layers), qcfg, layers_url, threads,
                                                                  MemoryStore(), LocalSolver())
        self.handles: list[ActivationChunk] = []
        self.position = 0  # the layer whose inputs self.handles hold
        self.work: LayerWork | None = None
        self.accs: dict = {}  # the current pass's partial Hessians, until they are sent
        self.bytes_sent = 0  # Hessian partials and results this worker sent to other workers

    def pid(self) -> int:
        return os.getpid()

    def load_batches(self, batches: list[TokenBatch]) -> int:
        """This worker's share of the calibration, embedded; returns its real tokens."""
        self.handles = [self.engine.embed(b) for b in batches]
        self.position = 0
        return sum(b.tokens for b in batches)

    def at_layer(self) -> int:
        """The layer whose inputs this worker holds."""
        return self.position

    def replay(self, index: int) -> tuple[float, LayerReport]:
        """A finished layer (from the layer store): push this worker's batches through it. Returns the seconds
        and the report saved with the layer."""
        start = time.perf_counter()
        saved = self.layer_store.load(index)
        if saved is None:
            raise RuntimeError(f"layer {index} has no checkpoint to replay")
        self._forward(index, saved[0])
        return time.perf_counter() - start, saved[1]

    def begin_layer(self, index: int) -> None:
        self.work = LayerWork(self.engine, index, LayerReport(layer=index, started=time.time()))
        self.engine.hessian_seconds = 0.0

    def rendezvous(self) -> str:
        """(Rank 0) host:port for the collective group to meet at."""
        return collective.rendezvous_address(ray.util.get_node_ip_address())

    def join_group(self, address: str) -> None:
        """Join the workers' torch.distributed group (NCCL on GPUs, gloo on CPUs), anew after a restart."""
        collective.join(address, self.rank, self.world, self.engine.device)

    def capture(self, pass_index: int, expert_tokens: list[int]) -> dict[str, Any]:
        """Partial Hessians of pass `pass_index` over this worker's batches, kept here until `partials` or
        `exchange` sends them. `expert_tokens`: the tokens routed to each expert over the whole calibration
        (empty until the pass that counts them). Returns this worker's counts and timings."""
        if expert_tokens:
            self.work.report.expert_tokens = list(expert_tokens)
        counted = not self.work.report.expert_tokens
        start = time.perf_counter()
        self.accs = self.work.capture(self.work.passes[pass_index], self.handles, settle=False)
        seconds = time.perf_counter() - start
        hessian_s, self.engine.hessian_seconds = self.engine.hessian_seconds, 0.0
        return {"tokens": self.engine._tokens, "routed": self.work.routed_counts(self.accs),
                "expert_tokens": self.work.report.expert_tokens if counted else [],
                "forward_s": seconds - hessian_s, "hessian_s": hessian_s}

    def _settled(self, owners: dict[Unit, int], routed: dict[Unit, int]) -> dict[Unit, Any]:
        accs, self.accs = self.work.settle(self.accs, routed or None), {}
        return {unit: accs[unit] for unit in owners}

    def partials(self, owners: dict[Unit, int], routed: dict[Unit, int]) -> tuple:
        """Object-store transport: this worker's partials, one object per owner rank ({unit: accumulator} of
        the units that rank solves), then the bytes sent to other ranks."""
        accs = self._settled(owners, routed)
        parts = [{unit: acc for unit, acc in accs.items() if owners[unit] == rank} for rank in range(self.world)]
        sent = sum(_hessian_bytes(part) for rank, part in enumerate(parts) if rank != self.rank)
        self.bytes_sent += sent
        return (*parts, sent)

    def solve(self, pass_index: int, tokens: int, *partials: dict) -> dict[str, Any]:
        """Object-store transport: sum the W partials of this owner's units in worker order, then solve them."""
        start = time.perf_counter()
        output = self._solve(pass_index, tokens, reduce_in_order(list(partials)), time.perf_counter() - start)
        self.bytes_sent += output["result_bytes_sent"]
        return output

    def exchange(self, pass_index: int, owners: dict[Unit, int], routed: dict[Unit, int], tokens: int
                 ) -> dict[str, Any]:
        """Collective transport: the whole exchange of a pass on every worker at once — partials to their
        owners (summed in worker order), this worker's solves, every owner's results to every worker."""
        start = time.perf_counter()
        accs, sent = collective.reduce_to_owners(self._settled(owners, routed), owners, self.rank, self.world)
        self.bytes_sent += sent
        output = self._solve(pass_index, tokens, accs, time.perf_counter() - start)
        output["hessian_bytes_sent"] = sent
        collective.barrier()  # every owner has solved: the broadcast's time is then its own, not a wait
        start = time.perf_counter()
        outputs, result_sent = collective.broadcast_from_owners(output["results"], self.rank, self.world,
                                                               self.engine.device)
        self.bytes_sent += result_sent
        output["result_bytes_sent"] = result_sent
        self._apply_results(outputs)
        output["broadcast_s"] = time.perf_counter() - start
        return output

    def _solve(self, pass_index: int, tokens: int, accs: dict, reduce_s: float) -> dict[str, Any]:
        self.engine._tokens = tokens
        start = time.perf_counter()
        report = LayerReport(layer=self.work.index)
        results: list[tuple[str, QuantResult]] = []
        for group in self.work.passes[pass_index].groups:
            mine = tuple(unit for unit in group if unit in accs)
            if mine:
                results += list(self.engine._solve_group(self.work.layer, mine, accs, report))
        size = sum(r.codes.numel() + r.scales.numel() * 2 + r.zeros.numel() * 4 for _, r in results)
        return {"results": results, "result_bytes_sent": size * (self.world - 1),
                "hessian_tokens": report.hessian_tokens, "expert_fallbacks": report.expert_fallbacks,
                "reduce_s": reduce_s, "solve_s": time.perf_counter() - start}

    def apply(self, *owner_outputs: dict[str, Any]) -> float:
        """Object-store transport: every owner's results, in owner order (later passes and the output forward
        see them)."""
        start = time.perf_counter()
        self._apply_results([output["results"] for output in owner_outputs])
        return time.perf_counter() - start

    def _apply_results(self, per_owner: list[list[tuple[str, QuantResult]]]) -> None:
        for results in per_owner:
            for name, result in results:
                self.work.apply(name, result)

    def finish_layer(self, report: LayerReport | None) -> dict[str, float]:
        """Push this worker's batches through the quantized layer; with `report` (one worker does this), also
        checkpoint the layer. Returns the forward seconds."""
        index, tensors = self.work.index, self.work.finish()
        self.work = None  # the float layer goes before the quantized one is built
        if report is not None:
            report.peak_rss_mb = peak_rss_mb()
            self.layer_store.save(index, tensors, report)
        start = time.perf_counter()
        self._forward(index, tensors)
        return {"forward_s": time.perf_counter() - start}

    def _forward(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        e = self.engine
        if index != self.position:
            raise RuntimeError(f"worker {self.rank} holds the inputs of layer {self.position}, not {index}")
        layer = build_quantized_layer(e.arch, index, tensors, e.qcfg, e.dtype, e.device)
        self.handles = [e.forward_layer(layer, index, chunk) for chunk in self.handles]
        self.position = index + 1

    def write_shard(self, folder: str, name: str, layers: range, first: bool, last: bool) -> dict[str, Any]:
        return write_layers_shard(self.reader, self.layer_store, layers, first, last, self.engine.out_dtype, folder,
                                  name)

    def stats(self) -> dict[str, Any]:
        return {"worker": self.rank, "peak_rss_mb": peak_rss_mb(), "bytes_sent": self.bytes_sent,
                "device": str(self.engine.device), "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id()}
