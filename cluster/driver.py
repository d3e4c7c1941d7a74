"""The Ray driver: plans stages, starts one StageWorker per stage, streams calibration activations
between them, and assembles the checkpoint. It reads configs, headers and token ids, never weights."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ray

from cluster.data_parallel import DataParallelRun, split_sequences
from cluster.job import JobConfig
from cluster.job_lock import LOCK_FILE, JobLock
from cluster.output import OutputTarget
from cluster.plan import GB, StagePlan, describe, fitting_plans, model_sizes, plan_stages
from cluster.progress import JobProgress, StageProgress
from cluster.recovery import Recovery, inputs_lost, recoverable, wait_until_restarted
from cluster.timeline import busy_totals
from cluster.resume import layers_folder, open_work_dir, remove_work_dir
from cluster.stage import StageWorker
from quantizer.assets import cache_dir, default_model_dir
from quantizer.calibration import default_calibration_file, make_batches, tokenize_samples
from quantizer.checkpoint import shard_name, write_metadata
from quantizer.decoder import load_tokenizer
from quantizer.engine import output_dtype
from quantizer.host_memory import peak_rss_mb
from quantizer.errors import ConfigError
from quantizer.layer_builder import DENSE_MLP_OUT, compute_architecture, padded_intermediate
from quantizer.model_io import CheckpointReader
from quantizer.sources import ModelRef
from quantizer.sources import resolve_model as resolve_model_name
from quantizer.storage import Location, file_sha256, is_url, local_copy
from rayquant.ray_connect import connect_ray
from rayquant.ray_private import stop_local_ray

log = logging.getLogger(__name__)


def resolve_model(model: str) -> ModelRef:
    """A model name (dir, Hub id[@revision], URL, "default") → what the stages open."""
    return resolve_model_name(model, default_model_dir)


def resolve_calibration(name: str) -> Path:
    """The calibration file as a local path on the driver (the driver alone tokenizes it)."""
    if name == "default":
        return default_calibration_file()
    return local_copy(name, cache_dir() / "calibration")


def in_ray_job_working_dir() -> bool:
    """This driver runs inside Ray's copy of a job's --working-dir (deleted or replaced with the job)."""
    runtime_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
    return "/runtime_resources/working_dir_files/" in os.getcwd() or bool(runtime_env.get("working_dir"))


def resolve_output(name: str) -> str:
    """The output as an absolute path or a URL, fixed on the driver before any actor sees it."""
    if is_url(name):
        return Location(name).url
    path = Path(name).expanduser()
    if not path.is_absolute() and in_ray_job_working_dir():
        raise ConfigError(
            f"output_dir {name} is relative, and this job runs in Ray's temporary copy of its --working-dir "
            f"({os.getcwd()}), where the checkpoint would be lost with it: pass an absolute path on storage the "
            f"cluster keeps (e.g. --out \"$PWD/{name}\" on a local cluster, /data/... on k8s) or an s3:// / gs:// URL")
    return str(path.resolve())


def check_shapes(reader: CheckpointReader, job: JobConfig, intermediate: int) -> None:
    """Fail before any work if a tensor is missing, or the group size cannot split a layer's inputs."""
    reader.check_complete()
    arch = compute_architecture(reader, job.quant)
    sparse = any(arch.is_sparse(i) for i in range(arch.num_layers))
    if job.quant.pad_intermediate_to and (sparse or DENSE_MLP_OUT not in arch.linear_names(0)):
        raise ConfigError(f"pad_intermediate_to applies to Llama-style dense MLPs (mlp.gate_proj / up_proj / "
                          f"down_proj); {reader.arch.model_type} has other or expert MLPs (leave it at 0)")
    checked: set[tuple[str, int, int]] = set()
    for index in range(arch.num_layers):
        for name, (out_features, in_features) in arch.linear_shapes(index).items():
            kind = name.rpartition(".")[2]
            if (kind, out_features, in_features) not in checked:
                checked.add((kind, out_features, in_features))
                job.quant.check_in_features(name, in_features)
                job.quant.check_out_features(name, out_features)
    skipped = reader.skipped_tensors()
    if skipped:
        log.info("skipping %d tensors of layers past num_hidden_layers (%s, …): not part of the causal LM "
                 "(multi-token prediction)", len(skipped), skipped[0])


def warn_if_not_vllm_loadable(job: JobConfig) -> None:
    """One line when vLLM would refuse the checkpoint these settings write, saying which settings it takes."""
    problems = job.quant.vllm_problems()
    if problems:
        log.warning("vLLM will not load this checkpoint: %s. For vLLM use --bits 4 or 8 with --sym and "
                    "--no-desc-act (group-aware order) or --desc-act --static-groups", "; ".join(problems))


def default_budget(job: JobConfig) -> int:
    if job.resources.memory_per_stage_gb:
        return int(job.resources.memory_per_stage_gb * GB)
    if job.resources.gpus_per_stage:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory
        return 80 * GB
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.8)


def job_sizes(reader: CheckpointReader, job: JobConfig, intermediate: int, tokens_per_batch: int, chunk: int = 0):
    """The planner's sizes for this job: stages compute in fp32 on CPU, in the checkpoint dtype on GPU;
    pipelined stages keep their float layers; `chunk` experts of a sparse layer held in float at once (0: all)."""
    return model_sizes(reader, tokens_per_batch, job.resources.max_inflight_chunks, intermediate,
                       compute_bytes=None if job.resources.gpus_per_stage else 4,
                       pipelined=job.resolved_schedule == "pipelined",
                       all_experts=job.quant.moe_calibration == "all",
                       chunk=chunk, bits=job.quant.bits, held_tokens=job.calibration.num_samples *
                       job.calibration.max_len // (job.resources.workers if job.resolved_schedule == "data_parallel"
                                                   else 1))


def experts_line(reader: CheckpointReader, job: JobConfig) -> str:
    """"\n  experts: 32 of 256 held at once (streamed from disk)" for a sparse model ("" for a dense one)."""
    experts = max((reader.arch.num_experts(i) for i in range(reader.num_layers)), default=0)
    if not experts:
        return ""
    chunk = min(job.quant.experts_per_chunk or experts, experts)
    how = "streamed from disk a chunk at a time" if chunk < experts else "all fit"
    return f"\n  experts: {chunk} of {experts} per sparse layer held in float at once ({how})"


def plan_job(reader: CheckpointReader, job: JobConfig, intermediate: int, tokens_per_batch: int, stages: int | str,
             budget: int) -> tuple[list[StagePlan], JobConfig]:
    """The stage split, and the job with its expert chunk resolved: quant.experts_per_chunk as set, or else the
    most experts whose float weights and Hessians fit `budget` beside the rest (every expert when they all fit)."""
    experts = max((reader.arch.num_experts(i) for i in range(reader.num_layers)), default=0)
    chunk = job.quant.experts_per_chunk or experts

    def fits(k: int) -> bool:
        return fitting_plans(job_sizes(reader, job, intermediate, tokens_per_batch, k), stages, budget)[1]

    if experts and not job.quant.experts_per_chunk and not fits(chunk):
        low, high = 1, experts  # the largest chunk that fits: low fits (or nothing does), high does not
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        chunk = low
    plans = plan_stages(job_sizes(reader, job, intermediate, tokens_per_batch, chunk), stages, budget)
    if experts:
        job = dataclasses.replace(job, quant=dataclasses.replace(job.quant, experts_per_chunk=chunk))
    return plans, job


def few_tokens_warning(tokens: int, reader: CheckpointReader) -> str | None:
    """A warning when the calibration has fewer tokens than the widest projection input (an MoE layer's: its
    experts' width, not the unused dense intermediate_size): that Hessian is then rank-deficient, and GPTQ
    fits the calibration text at the expense of other text."""
    kinds = {reader.arch.is_sparse(i): i for i in range(reader.num_layers)}  # a dense and a sparse
    widest = max(shape[1] for index in kinds.values() for shape in reader.linear_shapes(index).values())
    if tokens >= widest:
        return None
    return (f"the calibration has {tokens} tokens, fewer than the widest layer input ({widest}): those Hessians are "
            f"rank-deficient and GPTQ will overfit the calibration text; use at least {widest} tokens "
            "(raise --num-samples or --max-len)")


def check_cluster_resources(workers: int, cpus: int, gpus: float) -> None:
    """Refuse, before any layer starts, a job that needs more CPUs or GPUs than the cluster has: its actors
    and solve tasks would wait for them forever."""
    total = ray.cluster_resources()
    missing = []
    if workers * cpus > total.get("CPU", 0):
        missing.append(f"{workers * cpus} CPUs ({workers} workers × {cpus}), the cluster has {total.get('CPU', 0):g}")
    if gpus and workers * gpus > total.get("GPU", 0):
        missing.append(f"{workers * gpus:g} GPUs ({workers} workers × {gpus:g}), "
                       f"the cluster has {total.get('GPU', 0):g}")
    if missing:
        raise ConfigError(f"this job needs {'; '.join(missing)}: add nodes, or lower --stages, "
                          "resources.solve_workers or resources.cpus_per_stage")


def _unwrap(exc: BaseException) -> BaseException:
    """A ConfigError raised inside an actor reaches the driver wrapped; hand the user the original."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, ConfigError) else exc


class Driver:
    def __init__(self, job: JobConfig, restart: bool = False) -> None:
        """Everything that can be refused is checked here, before Ray starts or anything is written."""
        self.job, self.restart = job, restart
        warn_if_not_vllm_loadable(job)
        self.target = OutputTarget(resolve_output(job.output_dir))
        self.model = resolve_model(job.model)
        self.reader = CheckpointReader(self.model.open())
        self.intermediate = padded_intermediate(self.reader.config, job.quant.pad_intermediate_to)
        check_shapes(self.reader, job, self.intermediate)
        self.tokenizer = load_tokenizer(self.reader.model_dir, self.reader.config)
        calibration = resolve_calibration(job.calibration_file)
        samples = tokenize_samples(calibration, self.tokenizer, job.calibration)
        self.calibration_sha256 = file_sha256(calibration)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.batches = make_batches(samples, job.calibration.batch_size, pad)
        self.calibration_tokens = sum(b.tokens for b in self.batches)
        warning = few_tokens_warning(self.calibration_tokens, self.reader)
        if warning:
            log.warning("%s", warning)
        tokens_per_batch = max(b.input_ids.numel() for b in self.batches)
        self.data_parallel = job.resolved_schedule == "data_parallel"
        self.shares = split_sequences(samples, job.resources.workers, job.calibration.batch_size, pad) \
            if self.data_parallel else []
        # a data-parallel worker holds what a one-stage job holds: one layer at a time, every layer in turn
        self.plans, self.job = plan_job(self.reader, job, self.intermediate, tokens_per_batch,
                                        1 if self.data_parallel else job.stages, default_budget(job))
        self.actors: list = []
        self.dp: DataParallelRun | None = None
        log.info("%s%s", describe(self.plans), experts_line(self.reader, self.job))

    @property
    def actor_count(self) -> int:
        """The job's actors: its data-parallel workers, or the planned stages."""
        return self.job.resources.workers if self.data_parallel else len(self.plans)

    def resume_hash(self) -> str:
        """What a resumed run must share with the run that made the finished layers: the settings, the model's
        files (sizes and header hashes, or the Hub commit), the calibration content, and for the pipelined
        schedule the stage split (each stage calibrates on float inputs from its first layer)."""
        pipelined = self.job.resolved_schedule == "pipelined"
        split = [[p.layers.start, p.layers.stop] for p in self.plans] if pipelined else None
        relevant = {"settings": self.job.settings_hash(), "model": self.reader.source.identity(),
                    "calibration_sha256": self.calibration_sha256, "split": split}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]

    def run(self) -> dict[str, Any]:
        job, target, started = self.job, self.target, time.time()
        settings = self.resume_hash()
        finished = target.completed()
        if finished is not None and finished.get("settings_hash") == settings and not job.overwrite:
            log.info("%s already holds this job's finished checkpoint; nothing to do", target.final)
            layers_folder(target.work).remove_tree()  # a run that stopped right after publishing
            return json.loads(target.final.read_text("quantize_report.json"))
        replacing = target.check(job.overwrite)
        workers = self.actor_count
        cpus, cpus_in_all = job.actor_cpus(workers)
        progress = [StageProgress(p.index, len(p.layers)) for p in self.plans]
        overall = JobProgress(progress, parallel_stages=job.resolved_schedule == "pipelined").start("starting Ray")
        lock = JobLock(target.work)
        published = False
        try:
            owns_ray = connect_ray(job.ray_address, cpus_in_all)  # (already connected by cluster.launch: False)
            try:
                check_cluster_resources(workers + job.resources.solve_workers - 1, cpus, job.resources.gpus_per_stage)
                lock.acquire()
                target.prepare(replacing)
                done, stamp = open_work_dir(target.work, settings, self.restart, {"replacing": replacing})
                if done:
                    log.info("resuming: %d of %d layers already quantized in %s", len(done), self.reader.num_layers,
                             target.work)
                overall.activity = f"starting {workers} {'worker' if self.data_parallel else 'stage actor'}(s)"
                run = self._data_parallel if self.data_parallel else self._quantize_all
                shards, stats = run(cpus, progress, overall, done)
            finally:
                overall.stop()
                if owns_ray:
                    stop_local_ray()
            out_dtype = output_dtype(self.reader.embedding_info().dtype_torch)
            files = write_metadata(target.staging, self.reader, job.quant, self.intermediate, out_dtype)
            report = self._report(started, progress, shards, stats, settings)
            target.staging.write_text("quantize_report.json", json.dumps(report, indent=2))
            target.publish([*files, "quantize_report.json"], settings, stamp.get("replacing"))
            published = True
            remove_work_dir(target.work, keep=(LOCK_FILE,))
        finally:
            lock.release()
            target.discard_unused(published)
        log.info("wrote %s in %.1f s", target.final, report["wall_seconds"])
        return report

    def _data_parallel(self, cpus: int, progress: list[StageProgress], overall: JobProgress, done: list[int]
                       ) -> tuple[list, list]:
        """Every worker on every layer, each with its share of the calibration; then each writes a shard."""
        job = self.job
        self.dp = DataParallelRun(self.reader, self.model, job.quant, layers_folder(self.target.work).url,
                                  self.shares, cpus, job.resources.gpus_per_stage, job.resources.max_restarts,
                                  job.resources.resolved_transport)
        self.recoveries = self.dp.recoveries
        try:
            self.dp.run(list(done), progress[0], overall)
            overall.activity = "writing shards"
            staging = self.target.staging
            for old in staging.list("model-"):  # shards of an earlier attempt
                staging.remove(old)
            return self.dp.write_shards(staging.url)
        except ray.exceptions.RayError as exc:
            raise _unwrap(exc) from exc
        finally:
            self.dp.shutdown()

    def _quantize_all(self, cpus: int, progress: list[StageProgress], overall: JobProgress, done: list[int]
                      ) -> tuple[list, list]:
        """Start the stage actors, run the schedule, and have each stage write its shard."""
        job, staging = self.job, self.target.staging
        self.actors = [
            StageWorker.options(num_cpus=cpus, num_gpus=job.resources.gpus_per_stage,
                                max_restarts=job.resources.max_restarts, max_task_retries=0).remote(
                p.index, self.model, p.layers, job.quant, layers_folder(self.target.work).url,
                p.index == 0, p.index == len(self.plans) - 1, cpus, job.resources.solve_workers,
                job.resources.gpus_per_stage)
            for p in self.plans
        ]
        self.recoveries: list[Recovery] = []
        self._budget = [job.resources.max_restarts] * len(self.actors)
        try:
            ray.get([a.pid.remote() for a in self.actors])  # all stages up: start-up errors surface here
            overall.activity = "stages up"
            self.inputs: list[list | None] = [[ray.put(b) for b in self.batches]] + [None] * (len(self.actors) - 1)
            if job.resolved_schedule == "sequential":
                for k in range(len(self.actors)):
                    self._quantize_stage(k, progress, emit=k < len(self.actors) - 1)
            else:
                self._pipelined(progress)
            overall.activity = "writing shards"
            names = [shard_name(k, len(self.actors)) for k in range(len(self.actors))]
            for old in staging.list("model-"):  # shards of an earlier attempt with another split
                if old.endswith(".safetensors") and old not in names:
                    staging.remove(old)
            shards = self._on_every_stage(lambda k, a: a.write_shard.remote(staging.url, names[k]))
            stats = self._on_every_stage(lambda k, a: a.stats.remote())
        except ray.exceptions.RayError as exc:
            raise _unwrap(exc) from exc
        finally:
            for actor in self.actors:
                ray.kill(actor)
        return shards, stats

    def _recover(self, k: int, exc: BaseException) -> bool:
        """After stage k failed with `exc`: re-raise unless Ray lost an actor or objects and the stage has
        restarts left; wait for its actor. Returns whether the stage's inputs must be rebuilt."""
        if not recoverable(exc) or self._budget[k] == 0:
            raise exc
        self._budget[k] -= 1
        rebuild = inputs_lost(exc)
        self.recoveries.append(Recovery(k, type(exc).__name__, rebuild, time.time()))
        log.warning("stage %d lost %s (%s); %sresuming from its finished layers", k,
                    "input activations" if rebuild else "its actor", type(exc).__name__,
                    "rebuilding its inputs, " if rebuild else "waiting for Ray to restart it, ")
        wait_until_restarted(self.actors[k], k)
        return rebuild

    def _quantize_stage(self, k: int, progress: list[StageProgress], emit: bool) -> None:
        """Quantize stage k (finished layers on disk are replayed, not solved again); with `emit`, its
        outputs become stage k+1's inputs. Survives its actor's death and the loss of its inputs."""
        while True:
            try:
                if self.inputs[k] is None:
                    self._rebuild_inputs(k, progress)
                outputs = self._attempt(k, progress[k], emit)
                if emit:
                    self.inputs[k + 1] = outputs
                return
            except ray.exceptions.RayError as exc:
                if self._recover(k, exc):
                    self.inputs[k] = None if k > 0 else [ray.put(b) for b in self.batches]

    def _attempt(self, k: int, progress: StageProgress, emit: bool) -> list:
        for ref in self.actors[k].quantize.remote(self.inputs[k]):
            progress.update(ray.get(ref))
        if not emit:
            return []
        gen = self.actors[k].emit_outputs.options(
            _generator_backpressure_num_objects=self.job.resources.max_inflight_chunks).remote()
        return list(gen)

    def _rebuild_inputs(self, k: int, progress: list[StageProgress]) -> None:
        """Recompute stage k's input activations, lost with a node: sequential, stage k-1 replays its
        finished layers from disk; pipelined, the float layers of stages 0..k-1 run again."""
        if self.job.resolved_schedule == "sequential":
            self._quantize_stage(k - 1, progress, emit=True)
        else:
            self.inputs[k] = self._float_chain(k)

    def _float_chain(self, k: int) -> list:
        """Stage k's pipelined inputs: every token batch through the float layers of stages 0..k-1."""
        refs = []
        for ref in self.inputs[0]:
            for actor in self.actors[:k]:
                ref = actor.forward_float.remote(ref)
            refs.append(ref)
        return refs

    def _pipelined(self, progress: list[StageProgress]) -> None:
        """All stages at once: stage k calibrates on the float model's activations at its first layer."""
        inflight = self.job.resources.max_inflight_chunks
        pending: list = []
        for k in range(1, len(self.actors)):
            self.inputs[k] = []
        for ref in self.inputs[0]:
            for k, actor in enumerate(self.actors[:-1]):
                ref = actor.forward_float.remote(ref)
                self.inputs[k + 1].append(ref)
            pending.append(ref)
            if len(pending) >= inflight:  # backpressure: bounded batches in flight through the chain
                _, pending = ray.wait(pending, num_returns=len(pending) - inflight + 1)
        with ThreadPoolExecutor(len(self.actors)) as pool:
            futures = [pool.submit(self._quantize_stage, k, progress, False) for k in range(len(self.actors))]
            for f in futures:
                f.result()

    def _on_every_stage(self, call) -> list:
        """ray.get(call(k, actor)) for every stage; an actor lost after its layers were done is restarted
        (its layers are on disk) and asked again."""
        results = []
        for k, actor in enumerate(self.actors):
            while True:
                try:
                    results.append(ray.get(call(k, actor)))
                    break
                except ray.exceptions.RayError as exc:
                    self._recover(k, exc)
        return results

    def _report(self, started: float, progress: list[StageProgress], shards: list, stats: list,
                settings_hash: str) -> dict[str, Any]:
        stages = []
        if self.dp is not None:  # one "stage" covering every layer, run by all workers
            stats = [{"peak_rss_mb": max(s["peak_rss_mb"] for s in stats), "bytes_emitted": 0,
                      "workers": stats}]
            shards = [shards]
        for plan, prog, shard, stat in zip(self.plans, progress, shards, stats):
            reps = sorted(prog.reports, key=lambda r: r.layer)
            stages.append({
                "stage": plan.index, "layers": [plan.layers.start, plan.layers.stop],
                "planned_gb": round(plan.total_bytes / GB, 3),
                "started": min(r.started for r in reps), "finished": max(r.finished for r in reps),
                "seconds": sum(r.seconds for r in reps), **stat, "shard": shard,
                "layer_reports": [dataclasses.asdict(r) for r in reps],
            })
        return {
            "model": str(self.model), "model_identity": self.reader.source.identity(),
            "calibration_sha256": self.calibration_sha256, "settings_hash": settings_hash,
            "output_dir": self.target.final.url, "schedule": self.job.resolved_schedule,
            "quant": dataclasses.asdict(self.job.quant), "calibration": dataclasses.asdict(self.job.calibration),
            "calibration_tokens": self.calibration_tokens,
            "model_type": self.reader.arch.model_type,
            # layers past num_hidden_layers (multi-token prediction): not part of the causal LM, not written
            "skipped_tensors": self.reader.skipped_tensors(),
            "wall_seconds": time.time() - started, "driver_peak_rss_mb": peak_rss_mb(),
            "transfer_bytes": sum(s["bytes_emitted"] for s in stats), "stages": stages,
            "recoveries": [dataclasses.asdict(r) for r in self.recoveries],
            **({"data_parallel": self._dp_report()} if self.dp is not None else {}),
        }

    def _dp_report(self) -> dict[str, Any]:
        phases = self.dp.phases
        transport = self.job.resources.resolved_transport
        how = ("torch.distributed " + ("NCCL" if self.job.resources.gpus_per_stage > 0 else "gloo")
               if transport == "collective" else "Ray object store")
        return {"workers": self.dp.world, "transport": transport,
                "transport_detail": f"{how}: Hessian partials to their owners, results to every worker; "
                                    "activations never leave their worker",
                "sequences_per_worker": [sum(len(b.input_ids) for b in share) for share in self.shares],
                "per_layer": phases,
                "worker_time": busy_totals([p["timeline"] for p in phases]),
                "totals_s": {k: round(sum(p[k] for p in phases), 3) for k in
                             ("forward_s", "hessian_s", "reduce_s", "solve_s", "broadcast_s")},
                "bytes_per_layer": {"hessians": sum(p["hessian_bytes"] for p in phases) / max(1, len(phases)),
                                    "results": sum(p["result_bytes"] for p in phases) / max(1, len(phases))}}
