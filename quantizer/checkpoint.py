"""The GPTQ checkpoint on disk: shard naming, atomic shard writes, index/config/tokenizer files, and a
verification of every tensor's presence, shape and dtype before the output dir is published."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quantizer.config import QuantConfig
from quantizer.errors import ConfigError
from quantizer.model_io import CheckpointReader

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)
_DTYPE_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int32: "I32"}
_CONFIG_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}


def shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write to a temp name, then rename: a reader never sees a half-written shard."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt", **(metadata or {})})
    os.replace(tmp, path)


def expected_tensors(reader: CheckpointReader, qcfg: QuantConfig, intermediate: int,
                     out_dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name → (shape, safetensors dtype) of every tensor the quantized checkpoint must hold."""
    arch, fdt = reader.arch, _DTYPE_NAMES[out_dtype]
    linears = set(arch.linear_names)
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, info in reader.tensors.items():
        if not name.startswith(arch.layers_prefix + "."):
            out[name] = (info.shape, fdt)
            continue
        module, _, kind = name.rpartition(".")
        local = module[len(arch.layers_prefix) + 1 :].partition(".")[2]  # "3.self_attn.q_proj" → "self_attn.q_proj"
        if local not in linears:
            out[name] = (info.shape, fdt)
            continue
        shape = list(info.shape)
        if local in arch.mlp_in:
            shape[0] = intermediate
        if local == arch.mlp_out and kind == "weight":
            shape[1] = intermediate
        if kind == "bias":
            out[name] = (tuple(shape), "F16")
            continue
        out_f, in_f = shape
        groups = qcfg.group_count(in_f)
        out[f"{module}.qweight"] = ((in_f * qcfg.bits // 32, out_f), "I32")
        out[f"{module}.qzeros"] = ((groups, out_f * qcfg.bits // 32), "I32")
        out[f"{module}.scales"] = ((groups, out_f), "F16")
        out[f"{module}.g_idx"] = ((in_f,), "I32")
    return out


def read_weight_map(directory: Path) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """Name → (shard file, shape, dtype) for every tensor in the shards of `directory`."""
    found: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for shard in sorted(directory.glob("model-*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                found[key] = (shard.name, tuple(sl.get_shape()), sl.get_dtype())
    return found


def verify_tensors(found: dict[str, tuple[str, tuple[int, ...], str]],
                   expected: dict[str, tuple[tuple[int, ...], str]]) -> None:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = [f"{n}: {found[n][1]} {found[n][2]} != {expected[n][0]} {expected[n][1]}"
             for n in expected if n in found and (found[n][1], found[n][2]) != expected[n]]
    if missing or extra or wrong:
        raise RuntimeError(f"output checkpoint is inconsistent: missing {missing[:5]}, unexpected {extra[:5]}, "
                           f"wrong shape/dtype {wrong[:5]}")


def write_metadata(directory: Path, reader: CheckpointReader, qcfg: QuantConfig, intermediate: int,
                   out_dtype: torch.dtype) -> None:
    """Index, config.json with quantization_config, quantize_config.json and the tokenizer files."""
    found = read_weight_map(directory)
    verify_tensors(found, expected_tensors(reader, qcfg, intermediate, out_dtype))
    total = sum((directory / f).stat().st_size for f in {v[0] for v in found.values()})
    index = {"metadata": {"total_size": total}, "weight_map": {k: v[0] for k, v in sorted(found.items())}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = json.loads((reader.model_dir / "config.json").read_text())
    config["quantization_config"] = qcfg.to_hf()
    config["intermediate_size"] = intermediate
    config["torch_dtype"] = config["dtype"] = _CONFIG_DTYPES[out_dtype]
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "quantize_config.json").write_text(json.dumps(qcfg.to_hf(), indent=2))
    for name in TOKENIZER_FILES:
        if (reader.model_dir / name).is_file():
            shutil.copy2(reader.model_dir / name, directory / name)


def prepare_output(out_dir: Path, overwrite: bool) -> Path:
    """Check the output path and return the temp dir that is renamed into place at the end."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ConfigError(f"output directory {out_dir} already exists; choose another --out or pass --overwrite")
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    tmp.mkdir(parents=True, exist_ok=True)
    return tmp


def publish(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
