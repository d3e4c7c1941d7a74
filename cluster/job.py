"""The quantization job file (YAML): typed sections, unknown keys rejected, CLI flags override."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantizer.config import CalibrationConfig, QuantConfig
from quantizer.errors import ConfigError
from quantizer.settings import build_settings, read_yaml_mapping

SCHEDULES = ("auto", "sequential", "pipelined", "data_parallel")
TRANSPORTS = ("auto", "object_store", "collective")


@dataclass(frozen=True)
class ResourceConfig:
    gpus_per_stage: float = 0  # 1 on GPU clusters: one stage actor per GPU
    cpus_per_stage: int = 0  # CPU cores (= torch threads) per stage actor; 0 = this machine's cores / stages
    memory_per_stage_gb: float = 0  # planning budget per stage; 0 = the GPU's memory, or host RAM / stages
    max_restarts: int = 2  # times Ray replaces a dead stage actor; the stage then resumes from its layers
    max_inflight_chunks: int = 4  # activation batches in flight between two stages (backpressure)
    workers: int = 1  # data-parallel workers (one per GPU, or per cpus_per_stage CPUs), each with 1/W of the data
    solve_workers: int = 1  # processes solving a layer's units (MoE experts): the stage + N-1 Ray tasks, each
    #                         with the stage's CPUs / GPUs
    transport: str = "auto"  # data_parallel exchanges: object_store (Ray's), collective (torch.distributed: NCCL
    #                          on GPUs, gloo on CPUs); auto = collective on GPUs, object_store on CPUs

    def __post_init__(self) -> None:
        if self.cpus_per_stage < 0:
            raise ConfigError("resources.cpus_per_stage must be ≥ 0 (0 = cores / stages)")
        if self.gpus_per_stage < 0 or self.memory_per_stage_gb < 0 or self.max_restarts < 0:
            raise ConfigError("resources.gpus_per_stage, memory_per_stage_gb and max_restarts must be ≥ 0")
        if self.max_inflight_chunks < 1:
            raise ConfigError("resources.max_inflight_chunks must be at least 1")
        if self.workers < 1:
            raise ConfigError("resources.workers must be at least 1")
        if self.solve_workers < 1:
            raise ConfigError("resources.solve_workers must be at least 1 (1 = the stage solves alone)")
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"resources.transport {self.transport!r} is unknown; use one of {TRANSPORTS}")

    @property
    def resolved_transport(self) -> str:
        if self.transport == "auto":
            return "collective" if self.gpus_per_stage > 0 else "object_store"
        return self.transport


@dataclass(frozen=True)
class JobConfig:
    model: str = "default"  # checkpoint dir, Hub id org/name[@revision], s3:// or gs:// URL, or "default"
    calibration_file: str = "default"  # .json (Qwen conversations), .jsonl or text, path or URL; "default" = shipped
    output_dir: str = "out/smollm2-135m-gptq"  # local dir, or s3:// / gs:// prefix
    overwrite: bool = False  # replace an existing output dir
    stages: int | str = "auto"  # number of stage actors, or "auto" (fewest that fit the memory budget)
    schedule: str = "auto"  # sequential (exact, one stage at a time), pipelined (all stages at once, float
    #                         inputs) or data_parallel (exact, every worker busy); auto = data_parallel when
    #                         resources.workers > 1, else sequential
    ray_address: str | None = None  # None: RAY_ADDRESS, else a local Ray started by this program
    quant: QuantConfig = field(default_factory=QuantConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    resources: ResourceConfig = field(default_factory=ResourceConfig)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule {self.schedule!r} is unknown; use one of {SCHEDULES}")
        if self.resources.workers > 1 and self.schedule in ("sequential", "pipelined"):
            raise ConfigError(f"resources.workers={self.resources.workers} is for the data_parallel schedule; the "
                              f"{self.schedule} schedule splits layers into stages (--stages)")
        if self.stages != "auto" and (not isinstance(self.stages, int) or self.stages < 1):
            raise ConfigError(f"stages must be a positive integer or 'auto', got {self.stages!r}")

    @property
    def resolved_schedule(self) -> str:
        if self.schedule == "auto":
            return "data_parallel" if self.resources.workers > 1 else "sequential"
        return self.schedule

    @property
    def actors(self) -> int | None:
        """Stage actors or data-parallel workers, when the job file fixes them (None: stages auto, the plan decides)."""
        if self.resolved_schedule == "data_parallel":
            return self.resources.workers
        return self.stages if isinstance(self.stages, int) else None

    def actor_cpus(self, actors: int) -> tuple[int, int]:
        """(CPUs = torch threads of each of `actors` stage actors or workers, CPUs the job takes in all with its
        extra solve workers): resources.cpus_per_stage each, else this machine's cores shared among the actors."""
        each = self.resources.cpus_per_stage or max(1, (os.cpu_count() or 1) // actors)
        return each, each * (actors + self.resources.solve_workers - 1)

    def settings_hash(self) -> str:
        """Hash of the settings that change the output. The model and calibration file count by their content
        (the driver adds their identities); a resumed run must match both."""
        relevant = {
            "quant": {k: v for k, v in dataclasses.asdict(self.quant).items() if k != "experts_per_chunk"},
            "calibration": dataclasses.asdict(self.calibration),
            "schedule": self.resolved_schedule,
            "workers": self.resources.workers if self.resolved_schedule == "data_parallel" else None,
        }
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


_SECTIONS = {"quant": QuantConfig, "calibration": CalibrationConfig, "resources": ResourceConfig}


def job_from_dict(values: dict[str, Any]) -> JobConfig:
    values = dict(values)
    for key, cls in _SECTIONS.items():
        if key in values:
            values[key] = build_settings(cls, values[key], key)
    return build_settings(JobConfig, values, "the job file")


def load_job(path: Path | None, overrides: dict[str, Any]) -> JobConfig:
    """YAML job file (optional) with flat CLI overrides such as {"quant.bits": 3, "output_dir": "x"}."""
    values = read_yaml_mapping(path, "job file") if path is not None else {}
    for dotted, value in overrides.items():
        section, _, key = dotted.rpartition(".")
        target = values.setdefault(section, {}) if section else values
        if not isinstance(target, dict):
            raise ConfigError(f"{section} must be a mapping")
        target[key] = value
    return job_from_dict(values)
