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
from quantizer.activations import TokenBatch
from quantizer.architectures import Unit
from quantizer.calibration import make_batches
from quantizer.checkpoint import shard_name
from quantizer.engine import LayerReport, StagePhase
from quantizer.errors import ConfigError
from quantizer.layer_store import FolderLayerStore
from quantizer.model_io import CheckpointReader
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
                 threads: int, gpus: float, max_restarts: int) -> None:
        self.reader, self.qcfg, self.shares = reader, qcfg, shares
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
        ray.get([w.pid.remote() for w in self.workers])  # all up: start-up errors surface here
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
        groups = self.reader.arch.layer_units(self.reader.config, index)
        passes = [[g] for g in groups] if self.qcfg.true_sequential else [list(groups)]
        report = LayerReport(layer=index, started=started)
        phase = {"layer": index, "forward_s": 0.0, "hessian_s": 0.0, "reduce_s": 0.0, "solve_s": 0.0,
                 "broadcast_s": 0.0, "hessian_bytes": 0, "result_bytes": 0}
        for p, pass_groups in enumerate(passes):
            progress.update(StagePhase(index, f"calibration forward on {self.world} workers (pass {p + 1}/"
                                              f"{len(passes)})"))
            owners = assign_units(self.reader, index, pass_groups, self.world)
            t0 = time.perf_counter()
            partials = [w.capture.options(num_returns=self.world).remote(p, owners) for w in self.workers]
            if self.world == 1:
                partials = [[ref] for ref in partials]
            meta = ray.get([parts[0] for parts in partials])  # every worker's first part: its timings, tokens
            phase["forward_s"] += max(m["forward_s"] for m in meta)
            phase["hessian_s"] += max(m["hessian_s"] for m in meta)
            phase["hessian_bytes"] += sum(m["hessian_bytes_sent"] for m in meta)
            if any(m["expert_tokens"] for m in meta) and not report.expert_tokens:
                report.expert_tokens = [sum(col) for col in zip(*(m["expert_tokens"] for m in meta))]
            progress.update(StagePhase(index, f"reducing and solving {len(owners)} unit(s) on "
                                              f"{len(set(owners.values()))} worker(s)"))
            t1 = time.perf_counter()
            owner_refs = [self.workers[r].solve.remote(p, *[parts[r] for parts in partials]) for r in range(self.world)]
            outputs = ray.get(owner_refs)
            t2 = time.perf_counter()
            phase["reduce_s"] += max(o["reduce_s"] for o in outputs)
            phase["solve_s"] += max(o["solve_s"] for o in outputs)
            phase["result_bytes"] += sum(o["result_bytes_sent"] for o in outputs)
            ray.get([w.apply.remote(*owner_refs) for w in self.workers])  # broadcast, in owner order
            phase["broadcast_s"] += time.perf_counter() - t2
            for output in outputs:
                for name, result in output["results"]:
                    report.losses[name] = result.loss
                    if result.cholesky_fallback:
                        report.cholesky_fallbacks[name] = result.cholesky_fallback
                report.hessian_tokens.update(output["hessian_tokens"])
                report.expert_fallbacks.update(output["expert_fallbacks"])
            log.debug("layer %d pass %d: capture %.2f s, reduce+solve %.2f s", index, p, t1 - t0, t2 - t1)
        progress.update(StagePhase(index, "forward through the quantized layer"))
        report.finished = time.time()
        report.seconds = time.perf_counter() - wall
        forward = ray.get([w.finish_layer.remote(report if rank == 0 else None)
                           for rank, w in enumerate(self.workers)])
        phase["forward_s"] += max(f["forward_s"] for f in forward)
        report.seconds = time.perf_counter() - wall
        self.phases.append(phase)
        progress.update(report)

    def _recover(self, exc: BaseException, index: int) -> int:
        """A worker died (its node, or its process) during layer `index`: wait for Ray to restart it, then
        bring every worker to the inputs of the first layer not checkpointed yet — the restarted one by
        replaying the finished layers on its sequences, one that went past it by starting over — and return
        that layer, which every worker then quantizes again."""
        if not actor_lost(exc):
            raise exc
        lost = [r for r, w in enumerate(self.workers) if not _alive(w)]
        for rank in lost:
            if self.budget[rank] == 0:
                raise exc
            self.budget[rank] -= 1
            self.recoveries.append(Recovery(rank, type(exc).__name__, True, time.time()))
            log.warning("data-parallel worker %d lost during layer %d (%s); restarting it and replaying the finished "
                        "layers on its sequences", rank, index, type(exc).__name__)
            wait_until_restarted(self.workers[rank], rank)
        saved = set(self.layer_store.done())
        target = index + 1 if index in saved else index
        positions = ray.get([w.at_layer.remote() for w in self.workers])
        replays = []
        for rank, (worker, position) in enumerate(zip(self.workers, positions)):
            if rank in lost or position > target:
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


def _alive(worker) -> bool:
    try:
        ray.get(worker.pid.remote(), timeout=10)
        return True
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return False
