"""The serve config (YAML): model, engine, limits, access, batching, ports, autoscaling and replica resources."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantizer.errors import ConfigError
from quantizer.settings import build_settings, read_yaml_mapping
from serving.engine import DTYPES
from serving.kv_cache import KV_CACHE_DTYPES
from serving.vllm_engine import VLLM_KV_CACHE_DTYPES, VLLMOptions
from serving.vllm_support import vllm_installed, vllm_refusal

log = logging.getLogger(__name__)
ENGINES = ("auto", "vllm", "transformers")
ALL_KV_CACHE_DTYPES = ("auto", *KV_CACHE_DTYPES, *(k for k in VLLM_KV_CACHE_DTYPES if k not in KV_CACHE_DTYPES))

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
    engine: str = "auto"  # "vllm", "transformers", or "auto" (vllm when installed and it takes the checkpoint)
    kv_cache_dtype: str = "auto"  # transformers: int8 (auto) / fp16 / fp32; vllm: fp16 (auto) / fp8 / fp8_e5m2
    max_new_tokens_limit: int = 512  # requests asking for more are refused
    max_context: int = 0  # prompt + completion tokens at most; 0 = the model's max_position_embeddings
    max_batch_size: int = 8  # requests decoded together (transformers: @serve.batch; vllm: max_num_seqs)
    batch_wait_timeout_s: float = 0.01  # how long a batch waits to fill
    device: str = "auto"  # "cpu", "cuda" or "auto" (cuda when the replica has a GPU)
    dtype: str = "auto"  # activations and float weights: auto = the checkpoint's bf16/fp16 in vLLM and on GPU,
    #                      float32 in ours on CPU; or float16 / bfloat16 / float32
    cache_dequantized_weights: bool = True  # keep dequantized weights (fast, float-sized); False for big models
    max_prompt_tokens: int = 0  # prompt tokens at most; 0 = whatever the context leaves for the completion
    max_request_bytes: int = 1 << 20  # serialized GenerateRequest size at most (1 MiB)
    api_key_env: str | None = None  # name of an env var holding the API key; set → `authorization: Bearer <key>`
    host: str = "127.0.0.1"  # address the gRPC and HTTP proxies bind; "0.0.0.0" exposes them (k8s)
    grpc_port: int = 9000
    http_port: int = 8000  # GET /healthz answers here
    metrics_port: int = 8080  # Prometheus port of the local Ray `rayquant serve` starts (a cluster: ray start's)
    app_name: str = "rayquant"
    served_model_name: str | None = None  # the `model` OpenAI clients send (default: `model` as written here)
    autoscaling: dict[str, Any] = field(default_factory=lambda: {"min_replicas": 1, "max_replicas": 2,
                                                                 "target_ongoing_requests": 8})
    ray_actor_options: dict[str, Any] = field(default_factory=lambda: {"num_cpus": 1, "num_gpus": 0})
    vllm: VLLMOptions = field(default_factory=VLLMOptions)  # options of the vllm engine

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"engine {self.engine!r} is unknown; use one of {ENGINES}")
        if self.kv_cache_dtype not in ALL_KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype {self.kv_cache_dtype!r} is unknown; use one of {ALL_KV_CACHE_DTYPES}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is unknown; use one of {DTYPES}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device {self.device!r} is unknown; use auto, cpu or cuda")
        if self.max_new_tokens_limit < 1 or self.max_batch_size < 1 or self.max_context < 0:
            raise ConfigError("max_new_tokens_limit and max_batch_size must be ≥ 1, max_context ≥ 0")
        if self.max_prompt_tokens < 0 or self.max_request_bytes < 1024:
            raise ConfigError("max_prompt_tokens must be ≥ 0 (0 = the context decides) and max_request_bytes "
                              "at least 1024")
        if self.api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            raise ConfigError(f"api_key_env must name an environment variable (e.g. RAYQUANT_API_KEY), not "
                              f"{self.api_key_env!r}: the key itself never goes into the config")
        if not self.host:
            raise ConfigError("host must be an address to bind: 127.0.0.1 (this machine only) or 0.0.0.0 (all)")
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

    def api_key(self) -> str | None:
        """The API key from the environment (None when the server is open); a named but unset or empty
        variable is an error, never an open server."""
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env, "")
        if not key:
            raise ConfigError(f"api_key_env is {self.api_key_env} but that variable is unset or empty here; "
                              f"export {self.api_key_env}=<key> on every node that runs replicas (k8s: from a "
                              "Secret), or drop api_key_env to serve without a key")
        return key

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ServeConfig":
        if isinstance(values, dict) and "model" not in values:
            raise ConfigError("the serve config needs `model: <checkpoint dir>`")
        if isinstance(values, dict) and isinstance(values.get("vllm"), dict):
            values = {**values, "vllm": build_settings(VLLMOptions, values["vllm"], "vllm")}
        return build_settings(cls, values, "the serve config")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolve_engine(self) -> tuple[str, str]:
        """(engine, kv_cache_dtype) this replica runs, "auto" settled. engine: vllm that cannot work is
        refused with the reason and the fix; engine: auto falls back to transformers and logs why."""
        why_not = self._why_not_vllm() if self.engine != "transformers" else "engine: transformers"
        if self.engine == "vllm" and why_not:
            raise ConfigError(f"engine: vllm cannot serve {self.model}: {why_not}")
        if why_not is None:
            return "vllm", "fp16" if self.kv_cache_dtype == "auto" else self.kv_cache_dtype
        if self.engine == "auto":
            log.info("engine auto → transformers: %s", why_not)
        if self.kv_cache_dtype not in ("auto", *KV_CACHE_DTYPES):
            raise ConfigError(f"kv_cache_dtype {self.kv_cache_dtype} is vLLM's; with engine transformers use one "
                              f"of {KV_CACHE_DTYPES}")
        return "transformers", "int8" if self.kv_cache_dtype == "auto" else self.kv_cache_dtype

    def on_gpu(self) -> bool:
        if self.device == "auto":
            import torch

            return torch.cuda.is_available()
        return self.device == "cuda"

    def _why_not_vllm(self) -> str | None:
        if not vllm_installed():
            return "vLLM is not installed (see the README's vLLM install recipe), or use engine: transformers"
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in VLLM_KV_CACHE_DTYPES:
            return (f"kv_cache_dtype {self.kv_cache_dtype} is the transformers engine's; vLLM takes "
                    f"{sorted(VLLM_KV_CACHE_DTYPES)}")
        refusal = vllm_refusal(Path(self.model), self.on_gpu())
        if refusal:
            return (f"vLLM cannot run the checkpoint here ({refusal}); re-quantize with the default settings "
                    "or use engine: transformers")
        return None


def load_serve_config(path: Path, overrides: dict[str, Any] | None = None) -> ServeConfig:
    return ServeConfig.from_dict({**read_yaml_mapping(path, "serve config"), **(overrides or {})})
