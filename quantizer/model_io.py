"""Read a Hugging Face causal-LM checkpoint lazily: config and safetensors headers up front, tensors
only when asked for (one layer at a time), so no process ever holds the whole model."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from quantizer.architectures import Architecture, get_architecture
from quantizer.errors import ConfigError
from quantizer.sources import LocalSource, ModelSource

log = logging.getLogger(__name__)

_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class TensorInfo:
    file: str  # shard file name inside the model dir
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name, e.g. "BF16"

    @property
    def dtype_torch(self) -> torch.dtype:
        return _TORCH_DTYPES.get(self.dtype, torch.float32)

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * _DTYPE_BYTES.get(self.dtype, 4)


@dataclass
class CheckpointReader:
    """A causal-LM checkpoint: config.json and safetensors headers up front, tensors when asked for.
    `source` is a ModelSource, or a local checkpoint dir (model.safetensors or an index + shards)."""

    source: ModelSource | Path | str
    config: PretrainedConfig = field(init=False)
    arch: Architecture = field(init=False)
    tensors: dict[str, TensorInfo] = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.source, ModelSource):
            self.source = LocalSource(Path(self.source))
        where = self.source.description
        self.config = AutoConfig.from_pretrained(self.model_dir)
        archs = getattr(self.config, "architectures", None) or []
        if archs and not any(a.endswith("ForCausalLM") for a in archs):
            raise ConfigError(
                f"{where} holds a {archs[0]}, not a causal language model (…ForCausalLM); "
                "rayquant quantizes decoder-only causal LMs"
            )
        self.arch = get_architecture(self.config.model_type)
        if getattr(self.config, "quantization_config", None):
            raise ConfigError(f"{where} is already quantized; quantize the float checkpoint instead")
        self.tensors = {key: TensorInfo(shard, shape, dtype) for shard in self.source.shard_files()
                        for key, (shape, dtype) in self.source.header(shard).items()}

    @property
    def model_dir(self) -> Path:
        """The local folder with config.json and the tokenizer files."""
        return self.source.meta_dir()

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    def layer_tensor_names(self, index: int) -> list[str]:
        prefix = self.arch.layer_prefix(index) + "."
        return [n for n in self.tensors if n.startswith(prefix)]

    def linear_shapes(self, index: int) -> dict[str, tuple[int, int]]:
        """Module name (relative to the layer) → (out, in) of each projection quantized in layer `index`."""
        prefix = self.arch.layer_prefix(index)
        shapes = {}
        for name in self.arch.linear_names(self.config, index):
            key = f"{prefix}.{self.arch.to_disk(name)}.weight"
            if key not in self.tensors:
                raise ConfigError(f"tensor {key} is missing from {self.source.description}: the checkpoint is "
                                  "incomplete (re-download or re-convert it)")
            shapes[name] = tuple(self.tensors[key].shape)
        return shapes

    def check_complete(self) -> None:
        """Every layer's projections (every expert's, in a sparse layer) and its float router weights are in
        the headers: a missing tensor is refused before any work starts."""
        for index in range(self.num_layers):
            self.linear_shapes(index)
            prefix = self.arch.layer_prefix(index)
            for name in self.arch.float_names(self.config, index):
                key = f"{prefix}.{self.arch.to_disk(name)}.weight"
                if key not in self.tensors:
                    raise ConfigError(f"tensor {key} is missing from {self.source.description}: the checkpoint is "
                                      "incomplete (re-download or re-convert it)")

    def layer_bytes(self, index: int) -> int:
        return sum(self.tensors[n].nbytes for n in self.layer_tensor_names(index))

    def tensor_bytes(self, prefix: str) -> int:
        return sum(t.nbytes for n, t in self.tensors.items() if n.startswith(prefix + "."))

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Load only the named tensors, opening each shard once."""
        by_file: dict[str, list[str]] = {}
        for n in names:
            if n not in self.tensors:
                raise ConfigError(f"tensor {n} is missing from {self.source.description}; the checkpoint is incomplete")
            by_file.setdefault(self.tensors[n].file, []).append(n)
        out: dict[str, torch.Tensor] = {}
        for file, keys in by_file.items():
            try:
                with safe_open(self.source.fetch(file), framework="pt") as f:
                    for k in keys:
                        out[k] = f.get_tensor(k)
            except ConfigError:
                raise
            except Exception as exc:
                raise ConfigError(f"could not read {keys[0]} from {self.source.description}/{file}: {exc}") from exc
        return out

    def load_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors under `prefix.`, with the prefix stripped."""
        names = [n for n in self.tensors if n.startswith(prefix + ".")]
        return {n[len(prefix) + 1 :]: t for n, t in self.load(names).items()}

    def lm_head_weight(self) -> torch.Tensor:
        if self.arch.lm_head + ".weight" in self.tensors:
            return self.load([self.arch.lm_head + ".weight"])[self.arch.lm_head + ".weight"]
        return self.load([self.arch.embed + ".weight"])[self.arch.embed + ".weight"]  # tied embeddings
