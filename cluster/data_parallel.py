"""The data-parallel schedule: exact GPTQ with every worker busy. W workers (one per GPU, or per CPU
budget, on any nodes) each hold the current layer and 1/W of the calibration sequences. Per capture pass:
every worker accumulates partial Hessians over its sequences; each unit's partials go to the worker that
owns it (units assigned by solve cost, largest first), which sums them in worker order, solves, and the
results go to every worker. Then every worker pushes its own sequences through the quantized layer.

Finished layers are checkpointed by worker 0; a rerun, or a worker restarted after its node was lost,
replays them on its own sequences — so a job that loses a worker ends with the tensors of a clean run.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray

from cluster.dp_worker import DataParallelWorker
from cluster.progress import JobProgress, StageProgress
from cluster.recovery import Recovery, actor_lost, wait_until_restarted
from rayquant.ray_private import actor_state
from quantizer.activations import TokenBatch
from quantizer.calibration import make_batches
from quantizer.checkpoint import shard_name
from quantizer.decoder import Unit
from quantizer.engine import LayerReport, StagePhase, start_chunks
from quantizer.errors import ConfigError
from quantizer.layer_store import FolderLayerStore
from quantizer.model_io import CheckpointReader
from quantizer.passes import layer_passes
from quantizer.storage import Location

log = logging.getLogger(__name__)


def split_sequences(samples: list, workers: int, batch_size: int, pad_id: int) -> list[list[TokenBatch]]:
    """Worker w gets sequences w, w+W, w+2W, … (balanced lengths), batched as a single run would batch."""
    if workers > len(samples):
        raise ConfigError(f"{workers} data-parallel workers need at least {workers} calibration sequences, the "
                          f"calibration gives {len(samples)}: lower --workers or raise --num-samples")
    return [make_batches(samples[w::workers], batch_size, pad_id) for w in range(workers)]


def assign_units(reader: CheckpointReader, index: int, groups: list[tuple[Unit, ...]], workers: int
                 ) -> dict[Unit, int]:
    """Owner rank of each unit of a pass: largest solve first (rows · in²), each to the least loaded worker;
    ties go to the lowest rank, so the assignment is the same on every run."""
    shapes = reader.linear_shapes(index)
    units = [u for g in groups for u in g]
    cost = {u: sum(shapes[n][0] for n in u) * shapes[u[0]][1] ** 2 for u in units}
    load = [0] * workers
    owners: dict[Unit, int] = {}
    for unit in sorted(units, key=lambda u: (-cost[u], units.index(u))):
        rank = min(range(workers), key=lambda r: (load[r], r))
        owners[unit] = rank
        load[rank] += cost[unit]
    return owners


class DataParallelRun:
    """Drives W DataParallelWorker actors through every layer; the driver's part of the schedule."""

    def __init__(self, reader: CheckpointReader, model, qcfg, layers_url: str, shares: list[list[TokenBatch]],
                 threads: int, gpus: float, max_restarts: int, transport: str) -> None:
        self.reader, self.qcfg, self.shares = reader, qcfg, shares
        self.collective = transport == "collective"  # else the object store
        self.layer_store = FolderLayerStore(Location(layers_url))
        self.world = len(shares)
        self.workers = [DataParallelWorker.options(num_cpus=threads, num_gpus=gpus, max_restarts=max_restarts,
                                                   max_task_retries=0).remote(
            rank, self.world, model, qcfg, layers_url, threads, reader.num_layers) for rank in range(self.world)]
        self.budget = [max_restarts] * self.world
        self.recoveries: list[Recovery] = []
        self.phases: list[dict[str, Any]] = []

    def run(self, done: list[int], progress: StageProgress, overall: JobProgress) -> None:
        """Quantize (or replay, when finished earlier) every layer."""
        self.pids = ray.get([w.pid.remote() for w in self.workers])  # all up: start-up errors surface here
        self._form_group()
        ray.get([w.load_batches.remote(share) for w, share in zip(self.workers, self.shares)])
        overall.activity = f"{self.world} data-parallel workers up"
        index = 0
        while index < self.reader.num_layers:
            try:
                if index in done:
                    progress.update(StagePhase(index, "replaying the finished layer from its checkpoint"))
                    replays = ray.get([w.replay.remote(index) for w in self.workers])
                    old = replays[0][1]
                    old.resumed, old.seconds = True, max(seconds for seconds, _ in replays)
                    progress.update(old)
                else:
                    self._layer(index, progress)
                    done.append(index)
                index += 1
            except ray.exceptions.RayError as exc:
                target = self._recover(exc, index)
                for finished in range(index, target):  # checkpointed before the loss: its report is kept
                    progress.update(self.layer_store.report(finished))
                index = target

    def _layer(self, index: int, progress: StageProgress) -> None:
        started, wall = time.time(), time.perf_counter()
        ray.get([w.begin_layer.remote(index) for w in self.workers])
        arch = self.reader.arch
        passes = layer_passes(arch.spec(index), arch.num_experts(index), self.qcfg.experts_per_chunk,
                              self.qcfg.true_sequential)
        report = LayerReport(layer=index, started=started)
        start_chunks(report, passes)
        phase = {"layer": index, "forward_s": 0.0, "hessian_s": 0.0, "reduce_s": 0.0, "solve_s": 0.0,
                 "broadcast_s": 0.0, "hessian_bytes": 0, "result_bytes": 0}
        for p, step in enumerate(passes):
            pass_start = time.perf_counter()
            chunk = "" if step.experts is None else \
                f"experts {step.experts.start}-{step.experts.stop - 1} of {arch.num_experts(index)}, "
            progress.update(StagePhase(index, f"calibration forward on {self.world} workers ({chunk}pass {p + 1}/"
                                              f"{len(passes)})"))
            owners = assign_units(self.reader, index, step.groups, self.world)
            meta = ray.get([w.capture.remote(p, report.expert_tokens) for w in self.workers])
            phase["forward_s"] += max(m["forward_s"] for m in meta)
            phase["hessian_s"] += max(m["hessian_s"] for m in meta)
            if not report.expert_tokens and any(m["expert_tokens"] for m in meta):
                report.expert_tokens = [sum(col) for col in zip(*(m["expert_tokens"] for m in meta))]
            routed = {unit: sum(m["routed"][unit] for m in meta) for unit in meta[0]["routed"]}
            tokens = sum(m["tokens"] for m in meta)
            progress.update(StagePhase(index, f"reducing and solving {len(owners)} unit(s) on "
                                              f"{len(set(owners.values()))} worker(s)"))
            outputs = (self._exchange_collective if self.collective else self._exchange_object_store)(
                p, owners, routed, tokens)
            for key in ("reduce_s", "solve_s", "broadcast_s"):
                phase[key] += max(o[key] for o in outputs)
            phase["hessian_bytes"] += sum(o["hessian_bytes_sent"] for o in outputs)
            phase["result_bytes"] += sum(o["result_bytes_sent"] for o in outputs)
            for output in outputs:
                for name, result in output["results"]:
                    report.losses[name] = result.loss
                    if result.cholesky_fallback:
                        report.cholesky_fallbacks[name] = result.cholesky_fallback
                report.hessian_tokens.update(output["hessian_tokens"])
                report.expert_fallbacks.update(output["expert_fallbacks"])
            if step.chunk is not None:
                report.chunk_seconds[step.chunk] += time.perf_counter() - pass_start
        progress.update(StagePhase(index, "forward through the quantized layer"))
        report.finished = time.time()
        report.seconds = time.perf_counter() - wall
        forward = ray.get([w.finish_layer.remote(report if rank == 0 else None)
                           for rank, w in enumerate(self.workers)])
        phase["forward_s"] += max(f["forward_s"] for f in forward)
        report.seconds = time.perf_counter() - wall
        self.phases.append(phase)
        progress.update(report)

    def _exchange_object_store(self, p: int, owners: dict[Unit, int], routed: dict[Unit, int], tokens: int
                               ) -> list[dict[str, Any]]:
        """Partials to their owners and results to every worker through Ray's object store."""
        parts = [w.partials.options(num_returns=self.world + 1).remote(owners, routed) for w in self.workers]
        sent = ray.get([worker_parts[-1] for worker_parts in parts])
        owner_refs = [self.workers[r].solve.remote(p, tokens, *[worker_parts[r] for worker_parts in parts])
                      for r in range(self.world)]
        outputs = ray.get(owner_refs)
        start = time.perf_counter()
        ray.get([w.apply.remote(*owner_refs) for w in self.workers])  # broadcast, in owner order
        broadcast_s = time.perf_counter() - start
        for output, hessian_bytes in zip(outputs, sent):
            output.update(hessian_bytes_sent=hessian_bytes, broadcast_s=broadcast_s)
        return outputs

    def _exchange_collective(self, p: int, owners: dict[Unit, int], routed: dict[Unit, int], tokens: int
                             ) -> list[dict[str, Any]]:
        """The workers exchange partials and results among themselves (torch.distributed)."""
        return _get_all([w.exchange.remote(p, owners, routed, tokens) for w in self.workers])

    def _form_group(self) -> None:
        """Collective transport: every worker joins the group at the address worker 0 offers."""
        if self.collective:
            address = ray.get(self.workers[0].rendezvous.remote())
            _get_all([w.join_group.remote(address) for w in self.workers])

    def _lost_ranks(self) -> list[int]:
        """Workers whose process is gone: dead, restarting, or already restarted (another pid). Under the
        collective transport a worker that does not answer is waiting on the group: alive, not lost."""
        lost = []
        for rank, worker in enumerate(self.workers):
            try:
                if ray.get(worker.pid.remote(), timeout=10) != self.pids[rank]:
                    lost.append(rank)
            except ray.exceptions.RayActorError:
                lost.append(rank)
            except ray.exceptions.GetTimeoutError:
                if not self.collective or actor_state(worker) != "ALIVE":
                    lost.append(rank)
        return lost

    def _recover(self, exc: BaseException, index: int) -> int:
        """A worker died (its node, or its process) during layer `index`: wait for Ray to restart it, then
        bring every worker to the inputs of the first layer not checkpointed yet — the restarted one by
        replaying the finished layers on its sequences, one that went past it by starting over — and return
        that layer, which every worker then quantizes again. Under the collective transport the group dies
        with any of its members: every worker is restarted and the group formed anew."""
        lost = self._lost_ranks() if actor_lost(exc) or self.collective else []
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
        for rank in restart:
            wait_until_restarted(self.workers[rank], rank)
        self.pids = ray.get([w.pid.remote() for w in self.workers])
        self._form_group()
        saved = set(self.layer_store.done())
        target = index + 1 if index in saved else index
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
