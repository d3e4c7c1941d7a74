"""The serve config (YAML): model, engine limits, batching, ports, autoscaling and replica resources."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantizer.errors import ConfigError
from quantizer.settings import build_settings, read_yaml_mapping
from serving.kv_cache import KV_CACHE_DTYPES

GRPC_SERVICER_FUNCTIONS = [
    "protos.rayquant.v1.generation_pb2_grpc.add_GenerationServicer_to_server",
    "protos.grpc.health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
AUTOSCALING_KEYS = {"min_replicas", "max_replicas", "initial_replicas", "target_ongoing_requests",
                    "upscale_delay_s", "downscale_delay_s", "metrics_interval_s", "look_back_period_s"}
ACTOR_OPTION_KEYS = {"num_cpus", "num_gpus", "memory", "resources"}


@dataclass(frozen=True)
class ServeConfig:
    model: str  # checkpoint dir (GPTQ from rayquant/GPTQModel, or float)
    kv_cache_dtype: str = "int8"  # "int8", "fp16" or "fp32"
    max_new_tokens_limit: int = 512  # requests asking for more are refused
    max_context: int = 0  # prompt + completion tokens at most; 0 = the model's max_position_embeddings
    max_batch_size: int = 8  # requests decoded together (@serve.batch)
    batch_wait_timeout_s: float = 0.01  # how long a batch waits to fill
    device: str = "auto"  # "cpu", "cuda" or "auto" (cuda when the replica has a GPU)
    cache_dequantized_weights: bool = True  # keep dequantized weights (fast, float-sized); False for big models
    grpc_port: int = 9000
    http_port: int = 8000  # GET /healthz answers here
    app_name: str = "rayquant"
    autoscaling: dict[str, Any] = field(default_factory=lambda: {"min_replicas": 1, "max_replicas": 2,
                                                                 "target_ongoing_requests": 8})
    ray_actor_options: dict[str, Any] = field(default_factory=lambda: {"num_cpus": 1, "num_gpus": 0})

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype {self.kv_cache_dtype!r} is unknown; use one of {KV_CACHE_DTYPES}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device {self.device!r} is unknown; use auto, cpu or cuda")
        if self.max_new_tokens_limit < 1 or self.max_batch_size < 1 or self.max_context < 0:
            raise ConfigError("max_new_tokens_limit and max_batch_size must be ≥ 1, max_context ≥ 0")
        unknown = set(self.autoscaling) - AUTOSCALING_KEYS
        if unknown:
            raise ConfigError(f"unknown autoscaling key(s) {sorted(unknown)}; valid: {sorted(AUTOSCALING_KEYS)}")
        unknown = set(self.ray_actor_options) - ACTOR_OPTION_KEYS
        if unknown:
            raise ConfigError(f"unknown ray_actor_options key(s) {sorted(unknown)}; valid: {sorted(ACTOR_OPTION_KEYS)}")

    def check_model(self) -> None:
        """The checkpoint must exist where the server runs (not where the config is written)."""
        if not (Path(self.model) / "config.json").is_file():
            raise ConfigError(f"model {self.model} has no config.json; point `model` at a checkpoint dir "
                              "(e.g. the output of `rayquant quantize`)")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ServeConfig":
        if isinstance(values, dict) and "model" not in values:
            raise ConfigError("the serve config needs `model: <checkpoint dir>`")
        return build_settings(cls, values, "the serve config")


def load_serve_config(path: Path, overrides: dict[str, Any] | None = None) -> ServeConfig:
    return ServeConfig.from_dict({**read_yaml_mapping(path, "serve config"), **(overrides or {})})
