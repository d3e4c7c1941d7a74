"""Read a Hugging Face causal-LM checkpoint lazily: config and safetensors headers up front, tensors
only when asked for (one layer at a time), so no process ever holds the whole model."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from transformers import PretrainedConfig

from quantizer.decoder import Architecture, load_config
from quantizer.errors import ConfigError
from quantizer.fp8 import DEQUANTIZED, FP8_DTYPES, BlockFP8, block_size, dequantize, pair_scales
from quantizer.passes import expert_of
from quantizer.sources import LocalSource, ModelSource

log = logging.getLogger(__name__)

_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 2, "F8_E5M2": 2}  # FP8 weights are loaded dequantized to bf16


@dataclass(frozen=True)
class TensorInfo:
    file: str  # shard file name inside the model dir
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name, e.g. "BF16"

    @property
    def dtype_torch(self) -> torch.dtype:
        """The dtype the tensor has once loaded (an FP8 weight: bf16, dequantized)."""
        return DEQUANTIZED if self.dtype in FP8_DTYPES else _TORCH_DTYPES.get(self.dtype, torch.float32)

    @property
    def nbytes(self) -> int:
        """Bytes once loaded (an FP8 weight: its bf16 size)."""
        n = 1
        for d in self.shape:
            n *= d
        return n * _DTYPE_BYTES.get(self.dtype, 4)


# What to do with a checkpoint someone already quantized, by its quantization_config's quant_method
QUANTIZED_SOURCES = {
    "gptq": "it is already a GPTQ checkpoint; quantize the float (bf16/fp16) release of the model instead",
    "awq": "it is an AWQ checkpoint; quantize the float (bf16/fp16) release of the model instead",
    "compressed-tensors": "it is a compressed-tensors checkpoint; quantize the float (bf16/fp16) release instead",
    "mxfp4": "its experts are MXFP4; use the bf16 release (e.g. unsloth/gpt-oss-*-BF16), or load it in transformers "
             "with Mxfp4Config(dequantize=True) and save_pretrained a bf16 copy",
}
BLOCK_FP8 = "fp8"  # read directly: weights dequantized as they are loaded (quantizer/fp8.py)


@dataclass
class CheckpointReader:
    """A causal-LM checkpoint: config.json and safetensors headers up front, tensors when asked for.
    `source` is a ModelSource, or a local checkpoint dir (model.safetensors or an index + shards)."""

    source: ModelSource | Path | str
    config: PretrainedConfig = field(init=False)
    arch: Architecture = field(init=False)
    tensors: dict[str, TensorInfo] = field(init=False)
    fp8: BlockFP8 | None = field(init=False, default=None)  # an FP8 block-scaled source: weight → scale names

    def __post_init__(self) -> None:
        if not isinstance(self.source, ModelSource):
            self.source = LocalSource(Path(self.source))
        where = self.source.description
        self.config = load_config(self.model_dir)
        archs = getattr(self.config, "architectures", None) or []
        if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
            raise ConfigError(
                f"{where} holds a {archs[0]}, not a causal language model (…ForCausalLM); "
                "rayquant quantizes decoder-only causal LMs"
            )
        quantized = getattr(self.config, "quantization_config", None)
        qdict = (quantized if isinstance(quantized, dict) else quantized.to_dict()) if quantized else {}
        method = qdict.get("quant_method", "?") if quantized else None
        if quantized and method != BLOCK_FP8:
            why = QUANTIZED_SOURCES.get(str(method), "quantize the float (bf16/fp16) release of the model instead")
            raise ConfigError(f"{where} is already quantized (quant_method {method}): {why}")
        header = {key: (shape, dtype, shard) for shard in self.source.shard_files()
                  for key, (shape, dtype) in self.source.header(shard).items()}
        if method == BLOCK_FP8:  # the model is built as the bf16 model it stands for
            self.fp8 = pair_scales({k: v[:2] for k, v in header.items()}, block_size(qdict, where), where)
            del self.config.quantization_config
            self._scale_info = {s: TensorInfo(header[s][2], header[s][0], header[s][1])
                                for s in self.fp8.scales.values()}
            header = {k: v for k, v in header.items() if k not in self._scale_info}
        self.tensors = {key: TensorInfo(shard, shape, dtype) for key, (shape, dtype, shard) in header.items()}
        self.arch = Architecture(self.config, self.tensors)
        self._by_layer: dict[int, list[str]] = {}  # layer index → disk names (layers past the model's too)
        prefix = self.arch.layers_prefix + "."
        for disk, module in self.arch.names.to_module.items():
            index = module[len(prefix):].partition(".")[0] if module.startswith(prefix) else ""
            if index.isdigit():
                self._by_layer.setdefault(int(index), []).append(disk)

    @property
    def model_dir(self) -> Path:
        """The local folder with config.json and the tokenizer files."""
        return self.source.meta_dir()

    @property
    def num_layers(self) -> int:
        return self.arch.num_layers

    def layer_tensor_names(self, index: int) -> list[str]:
        """Disk names of layer `index`'s tensors."""
        return self._by_layer.get(index, [])

    def skipped_tensors(self) -> list[str]:
        """Disk names of tensors under the decoder layers that the causal LM does not use: layers past
        num_hidden_layers (DeepSeek-V3's and GLM-4.5's multi-token-prediction layer)."""
        return [n for index, names in sorted(self._by_layer.items()) if index >= self.num_layers for n in names]

    def linear_shapes(self, index: int) -> dict[str, tuple[int, int]]:
        """Module name (relative to the layer) → (out, in) of each projection quantized in layer `index`."""
        return self.arch.linear_shapes(index)

    def check_complete(self) -> None:
        """Every tensor of every layer (every expert's, in a sparse layer) is in the headers: a missing tensor is
        refused before any work starts."""
        for index in range(self.num_layers):
            prefix = self.arch.layer_prefix(index) + "."
            have = {self.arch.names.to_module[n][len(prefix):] for n in self.layer_tensor_names(index)}
            missing = self.arch.missing_tensors(index, have)
            if missing:
                raise ConfigError(f"tensor {prefix}{missing[0]} is missing from {self.source.description}"
                                  f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: the checkpoint "
                                  "is incomplete (re-download or re-convert it)")

    def layer_bytes(self, index: int) -> int:
        return sum(self.tensors[n].nbytes for n in self.layer_tensor_names(index))

    def outside_layers(self) -> list[str]:
        """Disk names of the tensors outside the decoder layers (embeddings, final norm, head, …)."""
        inside = {n for names in self._by_layer.values() for n in names}
        return [n for n in self.tensors if n not in inside]

    def head_names(self) -> list[str]:
        """Disk names of the output head's tensors (none with tied embeddings)."""
        if self.arch.lm_head is None:
            return []
        prefix = self.arch.lm_head + "."
        return [n for n in self.outside_layers() if self.arch.names.to_module[n].startswith(prefix)]

    def tensor_bytes(self, names: list[str]) -> int:
        return sum(self.tensors[n].nbytes for n in names)

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Load only the named tensors (disk names), opening each shard once; FP8 weights come dequantized."""
        by_file: dict[str, list[str]] = {}
        scales = {}
        for n in names:
            if n not in self.tensors:
                raise ConfigError(f"tensor {n} is missing from {self.source.description}; the checkpoint is incomplete")
            by_file.setdefault(self.tensors[n].file, []).append(n)
            if self.fp8 is not None and n in self.fp8.scales:
                scales[n] = self.fp8.scales[n]
                by_file.setdefault(self._scale_info[scales[n]].file, []).append(scales[n])
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
        for weight, scale in scales.items():
            out[weight] = dequantize(weight, out[weight], out.pop(scale), self.fp8.block)
        return out

    def load_modules(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Tensors by disk name → by module name (tensors transformers concatenates on load, concatenated)."""
        loaded = self.load(names)
        out: dict[str, torch.Tensor] = {}
        for name, tensor in loaded.items():
            module = self.arch.names.to_module[name]
            if module in self.arch.names.merged:
                parts, dim = self.arch.names.merged[module]
                if module not in out:
                    out[module] = torch.cat([loaded[p] for p in parts], dim=dim)
            else:
                out[module] = tensor
        return out

    def load_rows(self, name: str, rows: range) -> torch.Tensor:
        """Rows `rows` (along the first dimension) of one tensor, read without the others: a chunk of the experts
        of a tensor that stores them all ([experts, …])."""
        file = self.tensors[name].file
        try:
            with safe_open(self.source.fetch(file), framework="pt") as f:
                return f.get_slice(name)[rows.start:rows.stop]
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"could not read {name} from {self.source.description}/{file}: {exc}") from exc

    def layer_state(self, index: int, wanted: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
        """Layer `index`'s float tensors, named as in its modules (relative to the layer; experts per expert).
        `wanted`: only the tensors whose relative name it accepts; the others are not read from disk — of
        experts stored fused (one tensor for all of a block's experts), only the rows of the wanted experts."""
        prefix = self.arch.layer_prefix(index) + "."
        names = self.layer_tensor_names(index)
        if wanted is None:
            return self.arch.split_fused(index, {k[len(prefix):]: v for k, v in self.load_modules(names).items()})
        blocks = set(self.arch.spec(index).experts)
        relative = {n: self.arch.names.to_module[n][len(prefix):] for n in names}
        fused = [n for n in names if relative[n].rpartition(".")[0] in blocks]
        plain = [n for n in names if n not in fused and wanted(relative[n])]
        state = self.arch.split_fused(index, {k[len(prefix):]: v for k, v in self.load_modules(plain).items()})
        state.update(self._fused_experts(index, fused, relative, wanted))
        return {k: v for k, v in state.items() if wanted(k)}

    def _fused_experts(self, index: int, names: list[str], relative: dict[str, str], wanted: Callable[[str], bool]
                       ) -> dict[str, torch.Tensor]:
        """The wanted experts of tensors stored fused ([experts, …]), per expert: rows first…last of the wanted
        experts read alone, then cut. Tensors transformers concatenates on load, or FP8 ones (their scales are
        blocked by 128 rows), are read whole and cut."""
        if not names:
            return {}
        spec = self.arch.spec(index)
        per_expert = self.arch.split_fused(index, dict.fromkeys((relative[n] for n in names), None))
        need = sorted({expert_of(k, spec) for k in per_expert if wanted(k)})
        if not need:
            return {}
        prefix = self.arch.layer_prefix(index) + "."
        whole = [n for n in names if self.arch.names.to_module[n] in self.arch.names.merged
                 or (self.fp8 is not None and n in self.fp8.scales)]
        if whole:
            return self.arch.split_fused(index, {k[len(prefix):]: v for k, v in self.load_modules(names).items()})
        rows = range(need[0], need[-1] + 1)
        split = self.arch.split_fused(index, {relative[n]: self.load_rows(n, rows) for n in names})
        return {_renumbered(k, spec.experts, rows.start): v for k, v in split.items()}

    def embedding_info(self) -> TensorInfo:
        return self.tensors[self.arch.names.disk_name(self.arch.embed + ".weight")]

    def embedding_weight(self) -> torch.Tensor:
        return self.load_modules([self.arch.names.disk_name(self.arch.embed + ".weight")])[self.arch.embed + ".weight"]

    def lm_head_weight(self) -> torch.Tensor:
        head = self.head_names()
        weight = next((n for n in head if n.endswith(".weight")), None)
        return self.load([weight])[weight] if weight else self.embedding_weight()  # tied embeddings


def _renumbered(name: str, blocks: list[str], first: int) -> str:
    """A per-expert name cut from rows first… of a fused tensor, numbered as in the whole block."""
    block = next(b for b in blocks if name.startswith(b + "."))
    number, _, rest = name[len(block) + 1:].partition(".")
    return f"{block}.{int(number) + first}.{rest}"
