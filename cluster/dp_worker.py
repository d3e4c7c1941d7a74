"""One worker of the data-parallel schedule: it holds the layer being quantized and 1/W of the calibration
sequences, whose activations never leave it. For each capture pass it accumulates partial Hessians over its
own batches and hands them to the ranks that solve each unit: one owner for a unit solved whole, every worker
for a unit solved in row shares (a dense layer's units, one per pass). Each solving rank sums the W partials
in worker order (the same bits on every rerun with the same W) and solves its units or its share of their
rows — rows are independent given H⁻¹, so the merged shares are the bits of one worker solving all rows —
and every worker applies every worker's results before the next pass. Finally each worker pushes its own
batches through the quantized layer. Only Hessians, results (packed weights) and control messages cross
between workers: through Ray's object store (`partials`, `solve`, then applied by the next call) or a
torch.distributed group (`exchange`: NCCL on GPUs, gloo on CPUs). Each worker records the spans it was busy
in (`cluster.timeline`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from concurrent.futures import Future
from typing import Any

import ray
import torch

from cluster import collective
from cluster.shards import write_layers_shard
from cluster.stage import stage_engine
from cluster.timeline import Timeline
from quantizer.activations import ActivationChunk, TokenBatch
from quantizer.config import QuantConfig
from quantizer.decoder import Unit
from quantizer.engine import LayerReport, LayerWork
from quantizer.host_memory import peak_rss_mb, release_free_heap
from quantizer.hessian import reduce_in_order
from quantizer.layer_builder import build_quantized_layer
from quantizer.result import QuantResult
from quantizer.solvers import LocalSolver, merge_rows, split_rows
from quantizer.sources import ModelRef


Owners = dict[Unit, tuple[int, ...]]  # the ranks that solve each unit of a pass: one (whole) or all (row shares)


def pass_totals(metas: tuple[dict[str, Any], ...] | list[dict[str, Any]]) -> dict[str, Any]:
    """Every worker's `capture` counts summed: real tokens, routed tokens per gate/up unit, tokens per expert
    (empty unless this pass counted them)."""
    counted = [m["expert_tokens"] for m in metas if m["expert_tokens"]]
    return {"tokens": sum(m["tokens"] for m in metas),
            "routed": {unit: sum(m["routed"][unit] for m in metas) for unit in metas[0]["routed"]},
            "expert_tokens": [sum(col) for col in zip(*counted)] if counted else []}


def module_results(solved: list[dict[str, Any]], shapes: dict[str, tuple[int, int]]
                   ) -> list[tuple[str, QuantResult]]:
    """Every module's result from the workers' solve outputs (rank order): units solved whole as they are;
    units solved in row shares merged (rank order is row order) and split back per module. `shapes`: the
    layer's {module: (rows, in)}."""
    results = [item for output in solved for item in output["results"]]
    pieces: dict[Unit, list[QuantResult]] = {}
    for output in solved:
        for unit, result in output["shares"]:
            pieces.setdefault(unit, []).append(result)
    for unit, parts in pieces.items():
        results += split_rows(unit, merge_rows(parts), [shapes[name][0] for name in unit]).items()
    return results


def solve_summary(results: list[tuple[str, QuantResult]], shares: list[tuple[Unit, QuantResult]]
                  ) -> dict[str, list]:
    """What the driver reads of a worker's solves (never the tensors): each whole module's (loss, Cholesky
    fallback), and each row share's per-row losses [rows] (None for a solve without a Hessian)."""
    return {"losses": [(name, r.loss, r.cholesky_fallback) for name, r in results],
            "share_losses": [(unit, r.row_losses, r.cholesky_fallback) for unit, r in shares]}


def module_losses(summaries: list[dict[str, Any]], shapes: dict[str, tuple[int, int]]
                  ) -> list[tuple[str, float, str]]:
    """(module, loss, Cholesky fallback) of every module of a pass from the workers' summaries (rank order):
    a unit solved in row shares has its rows' losses joined in rank order (row order) and summed per module —
    the numbers `module_results` gives from the merged results. `shapes`: the layer's {module: (rows, in)}."""
    losses = [item for summary in summaries for item in summary["losses"]]
    pieces: dict[Unit, list[tuple[torch.Tensor | None, str]]] = {}
    for summary in summaries:
        for unit, row_losses, fallback in summary["share_losses"]:
            pieces.setdefault(unit, []).append((row_losses, fallback))
    for unit, parts in pieces.items():
        rows = None if parts[0][0] is None else torch.cat([r for r, _ in parts])
        start = 0
        for name in unit:
            width = shapes[name][0]
            loss = 0.0 if rows is None else float(rows[start:start + width].sum())
            losses.append((name, loss, parts[0][1]))
            start += width
    return losses


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
                                                                  MemoryStore(), LocalSolver(), emit_outputs=False)
        self.handles: list[ActivationChunk] = []
        self.position = 0  # the layer whose inputs self.handles hold
        self.work: LayerWork | None = None
        self.accs: dict = {}  # the current pass's partial Hessians, until they are sent
        self.own_part: dict | None = None  # (object store) this worker's partials of the units it solves, kept here
        self.bytes_sent = 0  # Hessian partials and results this worker sent to other workers
        self.timeline = Timeline()  # this layer's busy spans, returned by finish_layer
        self.broadcast_s = 0.0  # this layer's time applying other workers' results (object-store transport)
        self.store = None  # (rank 0, collective transport) the group's store, served by this worker
        self.first_pass = 0  # the pass the current layer started from (after its part checkpoints, if resumed)
        self.part: tuple | None = None  # (rank 0) the layer as of the last chunk's start, until `save_part`
        self.saving_part: Future | None = None  # (rank 0) the part checkpoint being written
        self.unsaved: dict[int, dict[str, torch.Tensor]] = {}  # (rank 0) finished layers' tensors, until `save_layer`
        self.saving_layer: Future | None = None  # (rank 0) the layer checkpoint being written

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
        self.flush()
        saved = self.layer_store.load(index)
        if saved is None:
            raise RuntimeError(f"layer {index} has no checkpoint to replay")
        self._forward(index, saved[0])
        return time.perf_counter() - start, saved[1]

    def begin_layer(self, index: int, resume: bool = False) -> tuple[int, LayerReport | None]:
        """Load layer `index`'s float weights. With `resume` (a layer whose experts are streamed), continue after
        its part checkpoints (worker 0 reads them first: it discards torn ones): returns the passes already done
        and the report saved with them (None when starting from the first pass)."""
        self.flush()  # (a layer begun again after another worker was lost) its last part is written whole
        with self.timeline.span("load"):
            self.work = LayerWork(self.engine, index, LayerReport(layer=index, started=time.time()))
            self.first_pass = self.work.resume(self.layer_store) if resume else 0
        self.engine.hessian_seconds = 0.0
        self.part = None
        return self.first_pass, self.work.report if self.first_pass else None

    def rendezvous(self) -> str:
        """(Rank 0) host:port of the store the collective group meets at; this worker serves it."""
        self.store, address = collective.rendezvous(ray.util.get_node_ip_address())
        return address

    def join_group(self, address: str) -> None:
        """Join the workers' torch.distributed group (NCCL on GPUs, gloo on CPUs), anew after a restart."""
        collective.join(address, self.rank, self.world, self.engine.device, self.store if self.rank == 0 else None)

    def capture(self, pass_index: int, *previous: dict[str, Any]) -> dict[str, Any]:
        """Partial Hessians of pass `pass_index` over this worker's batches, kept here until `partials` or
        `exchange` sends them; first, `previous`: every worker's solve outputs of the pass before (object-store
        transport), applied. Returns this worker's counts (real tokens, routed tokens per gate/up unit, per
        expert when this pass counted them) and timings."""
        self.apply(*previous)
        release_free_heap()  # the pass before's Hessians and solves
        if self.rank == 0 and pass_index > self.first_pass and self.work.resume_point(pass_index - 1):
            self.part = self.work.part(pass_index)  # every result of the passes before is applied: a part
        counted = not self.work.report.expert_tokens
        with self.timeline.span("capture") as span:
            self.accs = self.work.capture(self.work.passes[pass_index], self.handles, settle=False)
        hessian_s, self.engine.hessian_seconds = self.engine.hessian_seconds, 0.0
        return {"tokens": self.engine._tokens, "routed": self.work.routed_counts(self.accs),
                "expert_tokens": self.work.report.expert_tokens if counted else [],
                "forward_s": span.seconds - hessian_s, "hessian_s": hessian_s}

    def _settled(self, owners: Owners, metas: tuple[dict[str, Any], ...]) -> dict[Unit, Any]:
        """This pass's partials; a pass over experts settles them on the whole calibration's counts (`metas`:
        every worker's `capture` meta). Any other pass gets no metas: nothing in it depends on the other
        workers' counts, so its partials leave as soon as its own capture ends."""
        accs, self.accs = self.accs, {}
        if metas:
            totals = pass_totals(metas)
            if totals["expert_tokens"]:  # the pass that counted routed tokens: the whole calibration's
                self.work.report.expert_tokens = totals["expert_tokens"]
            accs = self.work.settle(accs, totals["routed"] or None)
            self.engine._tokens = totals["tokens"]
        return {unit: accs[unit] for unit in owners}

    def partials(self, owners: Owners, *metas: dict[str, Any]) -> tuple:
        """Object-store transport: this worker's partials, one object per rank ({unit: accumulator} of the
        units that rank solves, whole or a share of their rows) — its own share stays here, for its `solve`
        (None in its place) — then the bytes sent to other ranks."""
        with self.timeline.span("reduce"):
            accs = self._settled(owners, metas)
            parts = [{unit: acc for unit, acc in accs.items() if rank in owners[unit]} for rank in range(self.world)]
        self.own_part, parts[self.rank] = parts[self.rank], None
        sent = sum(_hessian_bytes(part) for part in parts if part is not None)
        self.bytes_sent += sent
        return (*parts, sent)

    @ray.method(num_returns=2)
    def solve(self, pass_index: int, owners: Owners, *partials: dict | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Object-store transport: sum the W partials of this worker's units in worker order (its own kept by
        `partials`), then solve them. Returns the results for every worker (applied by its next call) and the
        summary for the driver."""
        with self.timeline.span("reduce") as span:
            own, self.own_part = self.own_part, None
            accs = reduce_in_order([own if rank == self.rank else part for rank, part in enumerate(partials)])
        solved, summary = self._solve(pass_index, owners, accs, span.seconds)
        self.bytes_sent += summary["result_bytes_sent"]
        return solved, summary

    def exchange(self, pass_index: int, owners: Owners, *metas: dict[str, Any]) -> dict[str, Any]:
        """Collective transport: the whole exchange of a pass on every worker at once — partials to the ranks
        that solve them (summed in worker order), this worker's solves, every worker's results to every
        worker. Returns the summary for the driver."""
        with self.timeline.span("reduce") as span:
            accs, sent = collective.reduce_to_owners(self._settled(owners, metas), owners, self.rank, self.world)
        self.bytes_sent += sent
        solved, summary = self._solve(pass_index, owners, accs, span.seconds)
        summary["hessian_bytes_sent"] = sent
        collective.barrier()  # every worker has solved: the broadcast's time is then its own, not a wait
        with self.timeline.span("broadcast") as span:
            outputs, result_sent = collective.broadcast_from_owners(solved, self.rank, self.world, self.engine.device)
            self.bytes_sent += result_sent
            summary["result_bytes_sent"] = result_sent
            self._apply_results(outputs)
        summary["broadcast_s"] = span.seconds
        return summary

    def _solve(self, pass_index: int, owners: Owners, accs: dict, reduce_s: float
               ) -> tuple[dict[str, Any], dict[str, Any]]:
        """This worker's units of the pass: those it owns alone, whole, and its share of the rows of those
        every worker solves. Returns what every worker applies ({"results", "shares"}) and the summary for the
        driver (`solve_summary`, counts, bytes, seconds)."""
        with self.timeline.span("solve") as span:
            report = LayerReport(layer=self.work.index)
            results: list[tuple[str, QuantResult]] = []
            shares: list[tuple[Unit, QuantResult]] = []
            for group in self.work.passes[pass_index].groups:
                whole = tuple(unit for unit in group if owners[unit] == (self.rank,))
                if whole:
                    results += list(self.engine._solve_group(self.work.layer, whole, accs, report))
                split = tuple(unit for unit in group if len(owners[unit]) > 1 and self.rank in owners[unit])
                if split:
                    shares += self.engine.solve_shares(self.work.layer, split, accs, report, self.rank, self.world)
        size = sum(r.codes.numel() + r.scales.numel() * 2 + r.zeros.numel() * 4 for _, r in results + shares)
        return {"results": results, "shares": shares}, {
            **solve_summary(results, shares), "result_bytes_sent": size * (self.world - 1),
            "hessian_tokens": report.hessian_tokens, "expert_fallbacks": report.expert_fallbacks,
            "reduce_s": reduce_s, "solve_s": span.seconds}

    def apply(self, *solved: dict[str, Any]) -> None:
        """Object-store transport: every worker's results, in rank order (later passes and the output forward
        see them); the next `capture` or `finish_layer` call brings them, so a pass costs no call of its own."""
        if solved:
            with self.timeline.span("broadcast") as span:
                self._apply_results(list(solved))
            self.broadcast_s += span.seconds

    def save_part(self, report: LayerReport) -> None:
        """(Worker 0) write the part checkpoint taken as the current chunk began, with `report` — the driver's
        report of the passes before it —, in the background while the chunk runs."""
        number, tensors, _, state = self.part
        self.part = None
        self.flush()
        self.saving_part = self.engine.background.submit(self.layer_store.save_part, self.work.index, number,
                                                         tensors, json.dumps(dataclasses.asdict(report)), state)

    def flush(self) -> None:
        """Wait for the checkpoints being written, the part and the layer (their errors raise here)."""
        for attr in ("saving_part", "saving_layer"):
            saving = getattr(self, attr)
            if saving is not None:
                setattr(self, attr, None)
                saving.result()

    def save_layer(self, index: int, report: LayerReport) -> None:
        """(Worker 0) checkpoint finished layer `index` with `report` — the driver's, whole once every worker's
        forward is in —, in the background while the next layer runs."""
        tensors = self.unsaved.pop(index)
        waiting = self.saving_layer is not None and not self.saving_layer.done()  # the layer before, still written
        with self.timeline.span("save") if waiting else contextlib.nullcontext():
            self.flush()
        report.peak_rss_mb = peak_rss_mb()
        self.saving_layer = self.engine.background.submit(self.layer_store.save, index, tensors, report)

    def _apply_results(self, solved: list[dict[str, Any]]) -> None:
        for name, result in module_results(solved, self.reader.linear_shapes(self.work.index)):
            self.work.apply(name, result)

    def finish_layer(self, *previous: dict[str, Any]) -> dict[str, Any]:
        """Push this worker's batches through the quantized layer, reading the next layer's weights meanwhile;
        worker 0 keeps the layer's tensors until `save_layer`. Returns the forward seconds, the seconds spent
        applying other workers' results (object-store transport: `previous`, the last pass's results, are
        applied first) and this layer's timeline on this worker."""
        self.apply(*previous)
        self.flush()  # the layer's file replaces its parts: none may land after it
        index, tensors = self.work.index, self.work.finish()
        self.work = None  # the float layer goes before the quantized one is built
        if self.rank == 0:
            self.unsaved[index] = tensors
        self.engine.prefetch(index + 1)
        with self.timeline.span("forward") as span:
            self._forward(index, tensors)
        applied, self.broadcast_s = self.broadcast_s, 0.0
        return {"forward_s": span.seconds, "broadcast_s": applied, "events": self.timeline.take()}

    def _forward(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        e = self.engine
        if index != self.position:
            raise RuntimeError(f"worker {self.rank} holds the inputs of layer {self.position}, not {index}")
        if not e.runs_forward(index):  # the model's last layer: nothing reads its outputs
            self.handles = []
        else:
            layer = build_quantized_layer(e.arch, index, tensors, e.qcfg, e.dtype, e.device)
            self.handles = [e.forward_layer(layer, index, chunk) for chunk in self.handles]
        self.position = index + 1

    def write_shard(self, folder: str, name: str, layers: range, first: bool, last: bool) -> dict[str, Any]:
        self.flush()
        return write_layers_shard(self.reader, self.layer_store, layers, first, last, self.engine.out_dtype, folder,
                                  name)

    def stats(self) -> dict[str, Any]:
        return {"worker": self.rank, "peak_rss_mb": peak_rss_mb(), "bytes_sent": self.bytes_sent,
                "device": str(self.engine.device), "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id()}
