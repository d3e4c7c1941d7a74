"""The data-parallel schedule: exact GPTQ with every worker busy. W workers (one per GPU, or per CPU
budget, on any nodes) each hold the current layer and 1/W of the calibration sequences. Per capture pass:
every worker accumulates partial Hessians over its sequences; each unit's partials go to the worker that
owns it (units assigned by solve cost, largest first) — or to every worker, each solving a share of its rows,
when one unit is most of the pass (a dense layer's) — which sums them in worker order and solves; the results
go to every worker. Then every worker pushes its own sequences through the quantized layer. The driver
submits each pass whole and waits once for it; per layer, every worker's busy spans are kept (its timeline).

Finished layers are checkpointed by worker 0; a rerun, or a worker restarted after its node was lost,
replays them on its own sequences — so a job that loses a worker ends with the tensors of a clean run.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import ray

from cluster.dp_worker import DataParallelWorker, Owners, module_losses, pass_totals
from cluster.plan import LINK_BYTES_PER_S, solving_ranks, worker_flops
from cluster.progress import JobProgress, StageProgress
from cluster.timeline import layer_timeline
from cluster.recovery import Recovery, recoverable, wait_until_restarted
from rayquant.ray_private import actor_process
from quantizer.activations import TokenBatch
from quantizer.calibration import make_batches
from quantizer.checkpoint import shard_name
from quantizer.decoder import Unit
from quantizer.engine import LayerReport, StagePhase, start_chunks
from quantizer.errors import ConfigError
from quantizer.layer_store import FolderLayerStore
from quantizer.model_io import CheckpointReader
from quantizer.passes import experts_label, experts_progress, layer_passes, part_after, streamed
from quantizer.storage import Location

log = logging.getLogger(__name__)
ANSWER_TIMEOUT_S = 10.0  # (_lost_ranks) how long a worker gets to say which process it is


def split_sequences(samples: list, workers: int, batch_size: int, pad_id: int) -> list[list[TokenBatch]]:
    """Each worker's share of the calibration, batched as a single run would batch (longest sequence first,
    `batch_size` to a batch, each batch as wide as its first sequence). A worker's forwards cost its padded
    tokens, so sequences go longest first to the worker whose padded tokens stay fewest with it added — the
    width of its open batch, or the sequence's own for a new batch — (ties to the lowest rank). Dealt by real
    tokens instead, worker 0 took the longest sequence and its batch's width: 3 % more padded tokens on the
    default job, which the other worker waited for at every pass."""
    if workers > len(samples):
        raise ConfigError(f"{workers} data-parallel workers need at least {workers} calibration sequences, the "
                          f"calibration gives {len(samples)}: lower --workers or raise --num-samples")
    shares: list[list] = [[] for _ in range(workers)]
    padded = [0] * workers

    def padded_with(rank: int, sample) -> int:
        share = shares[rank]
        open_batch = len(share) % batch_size
        return padded[rank] + (len(share[-open_batch]) if open_batch else len(sample))

    for sample in sorted(samples, key=len, reverse=True):
        after = [padded_with(r, sample) for r in range(workers)]
        rank = min(range(workers), key=lambda r: (after[r], r))
        padded[rank] = after[rank]
        shares[rank].append(sample)
    return [make_batches(share, batch_size, pad_id) for share in shares]


def assign_units(reader: CheckpointReader, index: int, groups: list[tuple[Unit, ...]], workers: int,
                 flops: float, link_bytes_per_s: float) -> Owners:
    """The ranks that solve each unit of a pass (`cluster.plan.solving_ranks` on the units' stacked shapes, for
    workers of `flops` FLOP/s joined at `link_bytes_per_s`): one owner, or every worker in row shares. Either
    way the bits are the same (a row's solve does not depend on the other rows)."""
    shapes = reader.linear_shapes(index)
    units = [u for g in groups for u in g]
    sizes = [(sum(shapes[n][0] for n in u), shapes[u[0]][1]) for u in units]
    return dict(zip(units, solving_ranks(sizes, workers, flops, link_bytes_per_s)))


class DataParallelRun:
    """Drives W DataParallelWorker actors through every layer; the driver's part of the schedule."""

    def __init__(self, reader: CheckpointReader, model, qcfg, layers_url: str, shares: list[list[TokenBatch]],
                 threads: int, gpus: float, max_restarts: int, transport: str) -> None:
        self.reader, self.qcfg, self.shares = reader, qcfg, shares
        self.collective = transport == "collective"  # else the object store
        self.layer_store = FolderLayerStore(Location(layers_url))
        self.world = len(shares)
        self.flops = worker_flops(gpus, threads)  # what the row-share decisions assume (cluster.plan)
        self.collected = 0.0  # when the driver last collected a pass (perf_counter)
        self.workers = [DataParallelWorker.options(num_cpus=threads, num_gpus=gpus, max_restarts=max_restarts,
                                                   max_task_retries=0).remote(
            rank, self.world, model, qcfg, layers_url, threads, reader.num_layers) for rank in range(self.world)]
        self.budget = [max_restarts] * self.world
        self.recoveries: list[Recovery] = []
        self.phases: list[dict[str, Any]] = []
        self.reported: set[int] = set()  # layers whose report went to the progress
        self.saving: list = []  # worker 0's call saving the last finished layer

    def run(self, done: list[int], progress: StageProgress, overall: JobProgress) -> None:
        """Quantize (or replay, when finished earlier) every layer."""
        self.pids = ray.get([w.pid.remote() for w in self.workers])  # all up: start-up errors surface here
        self._form_group()
        ray.get([w.load_batches.remote(share) for w, share in zip(self.workers, self.shares)])
        overall.activity = f"{self.world} data-parallel workers up"
        saved, index = set(done), 0
        while True:
            try:
                if index == self.reader.num_layers:
                    ray.get([*self.saving, self.workers[0].flush.remote()])  # the last layer's checkpoint is written
                    return
                if index in saved:
                    progress.update(StagePhase(index, "replaying the finished layer from its checkpoint"))
                    replays = ray.get([w.replay.remote(index) for w in self.workers])
                    old = replays[0][1]
                    old.resumed, old.seconds = True, max(seconds for seconds, _ in replays)
                    progress.update(old)
                    self.reported.add(index)
                else:
                    self._layer(index, progress)
                index += 1
            except ray.exceptions.RayError as exc:
                self.saving = []
                index = self._recover(exc, index)
                saved = set(self.layer_store.done())
                for finished in sorted(saved - self.reported):  # checkpointed before the loss: its report is kept
                    if finished < index:
                        progress.update(self.layer_store.report(finished))
                        self.reported.add(finished)

    def _layer(self, index: int, progress: StageProgress) -> None:
        """One layer on every worker. Each pass is submitted whole — capture, then the exchange and solves; a
        worker runs its calls in order and Ray hands results from one to the next; through the object store a
        pass's results are applied by the next pass's capture — and the driver reads a pass's outcome (a
        summary: no tensors) once the next pass is queued, and the forward through the quantized layer is
        queued before the last pass is read, so within a layer the workers never wait on the driver. Worker
        0 checkpoints the layer (in the background, during the next one) once the report is whole."""
        started, wall = time.time(), time.perf_counter()
        arch = self.reader.arch
        passes = layer_passes(arch.spec(index), arch.num_experts(index), self.qcfg.experts_per_chunk,
                              self.qcfg.true_sequential)
        report = LayerReport(layer=index, started=started)
        start_chunks(report, passes)
        done, begun = 0, []
        if streamed(passes):  # continue after the layer's part checkpoints: worker 0 reads them first (it discards
            done, saved = ray.get(self.workers[0].begin_layer.remote(index, True))  # torn ones), then the others
            others = [d for d, _ in ray.get([w.begin_layer.remote(index, True) for w in self.workers[1:]])]
            if any(d != done for d in others):
                raise RuntimeError(f"layer {index}: the workers read its part checkpoints differently (passes done: "
                                   f"{[done, *others]}); is {self.layer_store.folder} the same storage for all?")
            report = dataclasses.replace(saved, started=started) if saved is not None else report
        else:
            begun = [w.begin_layer.remote(index) for w in self.workers]
        phase = {"layer": index, "forward_s": 0.0, "hessian_s": 0.0, "reduce_s": 0.0, "solve_s": 0.0,
                 "broadcast_s": 0.0, "hessian_bytes": 0, "result_bytes": 0}
        previous: list = []  # the last pass's results (object store), applied by each worker's next call
        pending: tuple | None = None
        part_writes: list = []  # worker 0's part checkpoints, each once the passes before it are collected
        self.collected = wall
        for p, step in enumerate(passes[done:], start=done):
            chunk = experts_label(step, arch.num_experts(index))
            chunk = f"{chunk}, " if chunk else ""
            owners = assign_units(self.reader, index, step.groups, self.world, self.flops, LINK_BYTES_PER_S)
            split = sum(len(ranks) > 1 for ranks in owners.values())
            progress.update(StagePhase(index, f"{chunk}pass {p + 1}/{len(passes)} on {self.world} workers: "
                                              f"calibration forward, then {len(owners)} unit(s) reduced and solved"
                                              + (f" ({split} in row shares on every worker)" if split else ""),
                                       *experts_progress(step, arch.num_experts(index))))
            metas = [w.capture.remote(p, *previous) for w in self.workers]
            counts = metas if step.experts is not None else []  # only a pass over experts waits for every count
            if self.collective:  # the workers exchange partials and results among themselves
                summaries, sent = [w.exchange.remote(p, owners, *counts) for w in self.workers], None
            else:  # partials to the ranks that solve them, results to every worker, through the object store
                parts = [w.partials.options(num_returns=self.world + 1).remote(owners, *counts) for w in self.workers]
                solves = [self.workers[r].solve.remote(p, owners, *[worker_parts[r] for worker_parts in parts])
                          for r in range(self.world)]
                previous, summaries = [solved for solved, _ in solves], [summary for _, summary in solves]
                sent = [worker_parts[-1] for worker_parts in parts]
            if pending is not None:
                self._collect(report, phase, *pending[1:])
                if part_after(passes, pending[0]):
                    part_writes.append(self.workers[0].save_part.remote(report))
            pending = (p, index, step, begun + metas, summaries, sent)
            begun = []
        forward = [w.finish_layer.remote(*previous) for w in self.workers]
        self._collect(report, phase, *pending[1:])
        ray.get(part_writes)
        progress.update(StagePhase(index, "forward through the quantized layer"))
        report.finished = time.time()
        outputs = ray.get(forward)
        phase["forward_s"] += max(f["forward_s"] for f in outputs)
        phase["broadcast_s"] += max(f["broadcast_s"] for f in outputs)
        report.seconds = time.perf_counter() - wall
        phase["timeline"] = layer_timeline(started, report.seconds, [f["events"] for f in outputs])
        ray.get(self.saving)  # the layer before's save call (its write is waited for by this one)
        self.saving = [self.workers[0].save_layer.remote(index, report)]
        self.phases.append(phase)
        progress.update(report)
        self.reported.add(index)

    def _collect(self, report: LayerReport, phase: dict[str, Any], index: int, step, metas: list, summaries: list,
                 sent: list | None) -> None:
        """A pass's outcome into the layer's report and phase times: counts, losses, fallbacks, bytes moved."""
        meta = ray.get(metas)[-self.world:]
        outputs = _get_all(summaries)
        if sent is not None:
            for output, hessian_bytes in zip(outputs, ray.get(sent)):
                output["hessian_bytes_sent"] = hessian_bytes
        phase["forward_s"] += max(m["forward_s"] for m in meta)
        phase["hessian_s"] += max(m["hessian_s"] for m in meta)
        if not report.expert_tokens:
            report.expert_tokens = pass_totals(meta)["expert_tokens"]
        for key in ("reduce_s", "solve_s", "broadcast_s"):
            phase[key] += max(o.get(key, 0.0) for o in outputs)
        phase["hessian_bytes"] += sum(o["hessian_bytes_sent"] for o in outputs)
        phase["result_bytes"] += sum(o["result_bytes_sent"] for o in outputs)
        for name, loss, fallback in module_losses(outputs, self.reader.linear_shapes(index)):
            report.losses[name] = loss
            if fallback:
                report.cholesky_fallbacks[name] = fallback
        for output in outputs:
            report.hessian_tokens.update(output["hessian_tokens"])
            report.expert_fallbacks.update(output["expert_fallbacks"])
        now = time.perf_counter()
        if step.chunk is not None:  # passes end in order: a pass took from the last one's end to its own
            report.chunk_seconds[step.chunk] += now - self.collected
        self.collected = now

    def _form_group(self) -> None:
        """Collective transport: every worker joins the group at the address worker 0 offers."""
        if self.collective:
            address = ray.get(self.workers[0].rendezvous.remote())
            _get_all([w.join_group.remote(address) for w in self.workers])

    def _lost_ranks(self) -> list[int]:
        """Workers whose process is gone: dead, restarting, or already restarted (another pid). A worker that
        does not answer within ANSWER_TIMEOUT_S is busy — its queue holds calls that wait on the lost worker's
        results, or on the collective group — and is lost only if Ray's record shows another state or process."""
        lost = []
        for rank, worker in enumerate(self.workers):
            try:
                if ray.get(worker.pid.remote(), timeout=ANSWER_TIMEOUT_S) != self.pids[rank]:
                    lost.append(rank)
            except ray.exceptions.RayActorError:
                lost.append(rank)
            except ray.exceptions.GetTimeoutError:
                if actor_process(worker) != ("ALIVE", self.pids[rank]):
                    lost.append(rank)
        return lost

    def _recover(self, exc: BaseException, index: int) -> int:
        """A worker died (its node, or its process) during layer `index` (`num_layers`: as the last checkpoint
        was written): wait for Ray to restart it, then bring every worker to the inputs of the first layer not
        checkpointed yet — the restarted one by
        replaying the finished layers on its sequences, one that went past it by starting over — and return
        that layer, which every worker then quantizes again. Under the collective transport the group dies
        with any of its members: every worker is restarted and the group formed anew."""
        # a worker's own task fails when the worker is lost — or when an input came from one that was
        lost = self._lost_ranks() if recoverable(exc) or self.collective else []
        if not lost:
            raise exc
        restart = list(range(self.world)) if self.collective else lost
        if any(self.budget[rank] == 0 for rank in restart):
            raise exc
        for rank in restart:
            self.budget[rank] -= 1
            if rank in lost:
                self.recoveries.append(Recovery(rank, type(exc).__name__, True, time.time()))
                log.warning("data-parallel worker %d lost during layer %d (%s); restarting it and replaying the "
                            "finished layers on its sequences", rank, index, type(exc).__name__)
            else:  # waiting on the broken group: a new process joins the new one
                ray.kill(self.workers[rank], no_restart=False)
        for rank in restart:  # a worker this call killed may answer from its old process until the kill lands
            wait_until_restarted(self.workers[rank], rank, old_pid=None if rank in lost else self.pids[rank])
        self.pids = ray.get([w.pid.remote() for w in self.workers])
        self._form_group()
        saved = set(self.layer_store.done())  # (a layer's checkpoint is written during the next layer)
        target = min(set(range(self.reader.num_layers + 1)) - saved)
        positions = ray.get([w.at_layer.remote() for w in self.workers])
        replays = []
        for rank, (worker, position) in enumerate(zip(self.workers, positions)):
            if rank in restart or position > target:
                ray.get(worker.load_batches.remote(self.shares[rank]))
                position = 0
            replays += [worker.replay.remote(layer) for layer in range(position, target)]
        ray.get(replays)
        return target

    def write_shards(self, folder: str) -> tuple[list[dict], list[dict]]:
        """Worker w writes shard w: a contiguous share of the layers (+ embeddings first, norm/head last)."""
        n, world = self.reader.num_layers, self.world
        count = min(world, n)
        bounds = [round(k * n / count) for k in range(count + 1)]
        shards = ray.get([self.workers[k].write_shard.remote(folder, shard_name(k, count), range(bounds[k],
                          bounds[k + 1]), k == 0, k == count - 1) for k in range(count)])
        stats = ray.get([w.stats.remote() for w in self.workers])
        return shards, stats

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)


def _get_all(refs: list) -> list:
    """ray.get of every ref, raising as soon as one fails (its peers may then wait on a broken group)."""
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready)
    return ray.get(refs)
