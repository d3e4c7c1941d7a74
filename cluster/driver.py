"""The Ray driver: plans stages, starts one StageWorker per stage, streams calibration activations
between them, and assembles the checkpoint. It reads configs, headers and token ids, never weights."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ray
from transformers import AutoTokenizer

from cluster.job import JobConfig
from cluster.plan import GB, StagePlan, describe, model_sizes, plan_stages
from cluster.progress import StageProgress
from cluster.resume import open_work_dir
from cluster.stage import StageWorker
from quantizer.assets import default_model_dir
from quantizer.calibration import default_calibration_file, make_batches, tokenize_samples
from quantizer.checkpoint import prepare_output, publish, shard_name, write_metadata
from quantizer.engine import output_dtype, peak_rss_mb
from quantizer.errors import ConfigError
from quantizer.layer_builder import padded_intermediate
from quantizer.model_io import CheckpointReader

log = logging.getLogger(__name__)


def resolve_model(model: str) -> Path:
    return default_model_dir() if model == "default" else Path(model)


def resolve_calibration(path: str) -> Path:
    return default_calibration_file() if path == "default" else Path(path)


def check_shapes(reader: CheckpointReader, job: JobConfig, intermediate: int) -> None:
    """Fail before any work if the group size cannot split a layer's inputs."""
    hidden = int(reader.config.hidden_size)
    for name in reader.arch.linear_names:
        in_features = intermediate if name == reader.arch.mlp_out else hidden
        job.quant.check_in_features(name, in_features)


def warn_if_not_vllm_loadable(job: JobConfig) -> None:
    """One line when vLLM would refuse the checkpoint these settings write, saying which settings it takes."""
    problems = job.quant.vllm_problems()
    if problems:
        log.warning("vLLM will not load this checkpoint: %s. For vLLM use --bits 4 or 8 with --sym and "
                    "--no-desc-act (group-aware order) or --desc-act --static-groups", "; ".join(problems))


def connect_ray(address: str | None, cpus_needed: int) -> bool:
    """Connect to `address` / RAY_ADDRESS, or start a local Ray. Returns True if this call started it."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        if address != "auto":
            host, _, port = address.removeprefix("ray://").removeprefix("http://").rpartition(":")
            try:
                socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"Ray address {address} does not answer ({exc}); start a cluster with `ray start --head` "
                    "or leave out --address to run on a local Ray"
                ) from exc
        ray.init(address=address, logging_level=logging.WARNING)
        return False
    # address="local": always a new Ray owned by this process, never a cluster that happens to run here
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cpus_needed), include_dashboard=False,
             logging_level=logging.WARNING)
    return True


def default_budget(job: JobConfig) -> int:
    if job.resources.memory_per_stage_gb:
        return int(job.resources.memory_per_stage_gb * GB)
    if job.resources.gpus_per_stage:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory
        return 80 * GB
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.8)


def _unwrap(exc: BaseException) -> BaseException:
    """A ConfigError raised inside an actor reaches the driver wrapped; hand the user the original."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, ConfigError) else exc


def _wait_until_restarted(actor, timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    while True:
        try:
            ray.get(actor.pid.remote(), timeout=60)
            return
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
            if time.time() > deadline:
                raise
            time.sleep(0.5)


class Driver:
    def __init__(self, job: JobConfig, restart: bool = False) -> None:
        self.job, self.restart = job, restart
        warn_if_not_vllm_loadable(job)
        self.model_dir = resolve_model(job.model)
        self.reader = CheckpointReader(self.model_dir)
        self.intermediate = padded_intermediate(self.reader.config, job.quant.pad_intermediate_to)
        check_shapes(self.reader, job, self.intermediate)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        samples = tokenize_samples(resolve_calibration(job.calibration_file), self.tokenizer, job.calibration)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.batches = make_batches(samples, job.calibration.batch_size, pad)
        tokens_per_batch = max(b.input_ids.numel() for b in self.batches)
        sizes = model_sizes(self.reader, tokens_per_batch, job.resources.max_inflight_chunks, self.intermediate)
        self.plans: list[StagePlan] = plan_stages(sizes, job.stages, default_budget(job))
        self.actors: list = []
        log.info("%s", describe(self.plans))

    def run(self) -> dict[str, Any]:
        job, started = self.job, time.time()
        cpus = job.resources.cpus_per_stage or max(1, (os.cpu_count() or 1) // len(self.plans))
        owns_ray = connect_ray(job.ray_address, cpus * len(self.plans))
        try:
            out_dir = Path(job.output_dir)
            partial = prepare_output(out_dir, job.overwrite)
            split = [[p.layers.start, p.layers.stop] for p in self.plans] if job.schedule == "pipelined" else None
            settings = job.settings_hash() if split is None else f"{job.settings_hash()}-{split}"
            work, done = open_work_dir(partial, settings, self.restart)
            if done:
                log.info("resuming: %d of %d layers already quantized in %s", len(done), self.reader.num_layers,
                         work)
            progress, shards, stats = self._quantize_all(partial, work, cpus)
        finally:
            if owns_ray:
                ray.shutdown()
        out_dtype = output_dtype(self.reader.tensors[self.reader.arch.embed + ".weight"].dtype_torch)
        write_metadata(partial, self.reader, job.quant, self.intermediate, out_dtype)
        report = self._report(started, progress, shards, stats)
        (partial / "quantize_report.json").write_text(json.dumps(report, indent=2))
        shutil.rmtree(work)
        publish(partial, out_dir)
        log.info("wrote %s in %.1f s", out_dir, report["wall_seconds"])
        return report

    def _quantize_all(self, partial: Path, work: Path, cpus: int) -> tuple[list[StageProgress], list, list]:
        """Start the stage actors, run the schedule, and have each stage write its shard."""
        job = self.job
        self.actors = [
            StageWorker.options(num_cpus=cpus, num_gpus=job.resources.gpus_per_stage,
                                max_restarts=job.resources.max_restarts, max_task_retries=0).remote(
                p.index, str(self.model_dir.resolve()), p.layers, job.quant, str(work),
                p.index == 0, p.index == len(self.plans) - 1, cpus)
            for p in self.plans
        ]
        progress = [StageProgress(p.index, len(p.layers)) for p in self.plans]
        token_refs = [ray.put(b) for b in self.batches]
        try:
            ray.get([a.pid.remote() for a in self.actors])  # all stages up: start-up errors surface here
            if job.schedule == "sequential":
                self._sequential(self.actors, token_refs, progress)
            else:
                self._pipelined(self.actors, token_refs, progress)
            for old in partial.glob("model-*.safetensors"):
                old.unlink()
            shards = ray.get([a.write_shard.remote(str(partial), shard_name(k, len(self.actors)))
                              for k, a in enumerate(self.actors)])
            stats = ray.get([a.stats.remote() for a in self.actors])
        except ray.exceptions.RayError as exc:
            raise _unwrap(exc) from exc
        finally:
            for actor in self.actors:
                ray.kill(actor)
        return progress, shards, stats

    def _run_stage(self, actor, inputs: list, progress: StageProgress, emit: bool) -> list:
        """Quantize one stage (and fetch its outputs); if its actor dies, Ray restarts it and it resumes."""
        restarts = self.job.resources.max_restarts
        while True:
            try:
                progress.reports.clear()
                for ref in actor.quantize.remote(inputs):
                    progress.update(ray.get(ref))
                if not emit:
                    return []
                gen = actor.emit_outputs.options(
                    _generator_backpressure_num_objects=self.job.resources.max_inflight_chunks).remote()
                return list(gen)
            except ray.exceptions.RayActorError:
                if restarts == 0:
                    raise
                restarts -= 1
                log.warning("stage %d actor died; waiting for Ray to restart it, then resuming", progress.stage)
                _wait_until_restarted(actor)

    def _sequential(self, actors: list, token_refs: list, progress: list[StageProgress]) -> None:
        """Exact GPTQ: stage k+1 calibrates on the outputs of stage k's quantized layers."""
        inputs = token_refs
        for k, actor in enumerate(actors):
            inputs = self._run_stage(actor, inputs, progress[k], emit=k < len(actors) - 1)

    def _pipelined(self, actors: list, token_refs: list, progress: list[StageProgress]) -> None:
        """All stages at once: stage k calibrates on the float model's activations at its first layer."""
        inflight = self.job.resources.max_inflight_chunks
        stage_inputs: list[list] = [list(token_refs)] + [[] for _ in actors[1:]]
        pending: list = []
        for ref in token_refs:
            for k, actor in enumerate(actors[:-1]):
                ref = actor.forward_float.remote(ref)
                stage_inputs[k + 1].append(ref)
            pending.append(ref)
            if len(pending) >= inflight:  # backpressure: bounded batches in flight through the chain
                _, pending = ray.wait(pending, num_returns=len(pending) - inflight + 1)
        with ThreadPoolExecutor(len(actors)) as pool:
            futures = [pool.submit(self._run_stage, a, stage_inputs[k], progress[k], False)
                       for k, a in enumerate(actors)]
            for f in futures:
                f.result()

    def _report(self, started: float, progress: list[StageProgress], shards: list, stats: list) -> dict[str, Any]:
        stages = []
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
            "model": str(self.model_dir), "output_dir": self.job.output_dir, "schedule": self.job.schedule,
            "quant": dataclasses.asdict(self.job.quant), "calibration": dataclasses.asdict(self.job.calibration),
            "calibration_tokens": sum(b.tokens for b in self.batches),
            "wall_seconds": time.time() - started, "driver_peak_rss_mb": peak_rss_mb(),
            "transfer_bytes": sum(s["bytes_emitted"] for s in stats), "stages": stages,
        }
