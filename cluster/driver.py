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
from cluster.recovery import Recovery, inputs_lost, recoverable, wait_until_restarted
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


def connect_ray(address: str | None, cpus_needed: int, metrics_port: int = 0) -> bool:
    """Connect to `address` / RAY_ADDRESS, or start a local Ray (Prometheus metrics on `metrics_port`,
    0 = a port Ray picks). Returns True if this call started it."""
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
             logging_level=logging.WARNING, _metrics_export_port=metrics_port or None)
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


def job_sizes(reader: CheckpointReader, job: JobConfig, intermediate: int, tokens_per_batch: int):
    """The planner's sizes for this job: stages compute in fp32 on CPU, in the checkpoint dtype on GPU;
    pipelined stages keep their float layers."""
    return model_sizes(reader, tokens_per_batch, job.resources.max_inflight_chunks, intermediate,
                       compute_bytes=None if job.resources.gpus_per_stage else 4,
                       pipelined=job.schedule == "pipelined")


def few_tokens_warning(tokens: int, reader: CheckpointReader, intermediate: int) -> str | None:
    """A warning when the calibration has fewer tokens than the widest projection input: that Hessian is then
    rank-deficient, and GPTQ fits the calibration text at the expense of other text."""
    widest = max(int(reader.config.hidden_size), intermediate)
    if tokens >= widest:
        return None
    return (f"the calibration has {tokens} tokens, fewer than the widest layer input ({widest}): those Hessians are "
            f"rank-deficient and GPTQ will overfit the calibration text; use at least {widest} tokens "
            "(raise --num-samples or --max-len)")


def _unwrap(exc: BaseException) -> BaseException:
    """A ConfigError raised inside an actor reaches the driver wrapped; hand the user the original."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, ConfigError) else exc


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
        self.calibration_tokens = sum(b.tokens for b in self.batches)
        warning = few_tokens_warning(self.calibration_tokens, self.reader, self.intermediate)
        if warning:
            log.warning("%s", warning)
        tokens_per_batch = max(b.input_ids.numel() for b in self.batches)
        self.plans: list[StagePlan] = plan_stages(job_sizes(self.reader, job, self.intermediate, tokens_per_batch),
                                                  job.stages, default_budget(job))
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
        self.recoveries: list[Recovery] = []
        self._budget = [job.resources.max_restarts] * len(self.actors)
        try:
            ray.get([a.pid.remote() for a in self.actors])  # all stages up: start-up errors surface here
            self.inputs: list[list | None] = [[ray.put(b) for b in self.batches]] + [None] * (len(self.actors) - 1)
            if job.schedule == "sequential":
                for k in range(len(self.actors)):
                    self._quantize_stage(k, progress, emit=k < len(self.actors) - 1)
            else:
                self._pipelined(progress)
            for old in partial.glob("model-*.safetensors"):
                old.unlink()
            shards = self._on_every_stage(
                lambda k, a: a.write_shard.remote(str(partial), shard_name(k, len(self.actors))))
            stats = self._on_every_stage(lambda k, a: a.stats.remote())
        except ray.exceptions.RayError as exc:
            raise _unwrap(exc) from exc
        finally:
            for actor in self.actors:
                ray.kill(actor)
        return progress, shards, stats

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
        if self.job.schedule == "sequential":
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
            "calibration_tokens": self.calibration_tokens,
            "wall_seconds": time.time() - started, "driver_peak_rss_mb": peak_rss_mb(),
            "transfer_bytes": sum(s["bytes_emitted"] for s in stats), "stages": stages,
            "recoveries": [dataclasses.asdict(r) for r in self.recoveries],
        }
