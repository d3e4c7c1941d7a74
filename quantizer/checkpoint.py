"""The GPTQ checkpoint in its output folder (local or object storage): shard naming, atomic shard writes,
index/config/tokenizer files, and a check of every tensor's presence, shape and dtype before the
checkpoint is published."""

from __future__ import annotations

import json

import torch

from quantizer.config import QuantConfig
from quantizer.decoder import Architecture
from quantizer.layer_builder import compute_architecture
from quantizer.model_io import CheckpointReader
from quantizer.safetensors_stream import NAMES, LazyTensor, write_streamed
from quantizer.sources import INDEX_FILE, TOKENIZER_FILES, parse_header
from quantizer.storage import Location

_FLOAT_NAMES = ("F16", "BF16", "F32", "F64")
_CONFIG_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}


def shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """No NaN or Inf is ever written: every float tensor is checked before it is."""
    if tensor.is_floating_point() and not torch.isfinite(tensor if tensor.element_size() > 1 else tensor.float()).all():
        raise RuntimeError(f"refusing to write non-finite values (NaN/Inf) in {name}; the float model or the solve "
                           "produced them (check the model files, or raise damp_percent)")


def write_shard(folder: Location, name: str, tensors: dict[str, LazyTensor]) -> None:
    """Write a safetensors shard a tensor at a time (quantizer.safetensors_stream), no NaN or Inf in it; a
    reader never sees it half-written."""
    write_streamed(folder, name, tensors, {"format": "pt"}, check=check_finite)


def expected_tensors(reader: CheckpointReader, arch: Architecture, qcfg: QuantConfig,
                     out_dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name → (shape, safetensors dtype) of every tensor the quantized checkpoint must hold. `arch`: the model as
    the stages built it (its dense MLP padded, if so)."""
    fdt = NAMES[out_dtype]
    out = {name: (reader.tensors[name].shape, fdt if reader.tensors[name].dtype in _FLOAT_NAMES
                  else reader.tensors[name].dtype) for name in reader.outside_layers()}
    for index in range(arch.num_layers):
        prefix = arch.layer_prefix(index)
        linears = set(arch.linear_names(index))
        buffers = arch.buffer_names(index)
        for name, shape in arch.tensor_shapes(index).items():
            module, _, kind = name.rpartition(".")
            disk = arch.names.disk_name(f"{prefix}.{name}")
            if module not in linears:
                out[disk] = (shape, reader.tensors[disk].dtype if name in buffers else fdt)
            elif kind == "bias":
                out[disk] = (shape, "F16")
            else:
                out_f, in_f = shape
                groups = qcfg.group_count(in_f)
                base = disk.rpartition(".")[0]
                out[f"{base}.qweight"] = ((in_f * qcfg.bits // 32, out_f), "I32")
                out[f"{base}.qzeros"] = ((groups, out_f * qcfg.bits // 32), "I32")
                out[f"{base}.scales"] = ((groups, out_f), "F16")
                out[f"{base}.g_idx"] = ((in_f,), "I32")
    return out


def read_weight_map(folder: Location) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """Name → (shard file, shape, dtype) for every tensor in the shards of `folder` (headers only)."""
    found: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for shard in folder.list("model-"):
        if not shard.endswith(".safetensors"):
            continue
        header, _ = parse_header(lambda start, length: folder.read_range(shard, start, length), f"{folder}/{shard}")
        for key, (shape, dtype) in header.items():
            found[key] = (shard, shape, dtype)
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


def write_metadata(folder: Location, reader: CheckpointReader, qcfg: QuantConfig, intermediate: int,
                   out_dtype: torch.dtype) -> list[str]:
    """Check the shards, then write the index, config.json with quantization_config, quantize_config.json
    and the tokenizer files. Returns the names of every file of the checkpoint."""
    found = read_weight_map(folder)
    verify_tensors(found, expected_tensors(reader, compute_architecture(reader, qcfg), qcfg, out_dtype))
    shards = sorted({v[0] for v in found.values()})
    index = {"metadata": {"total_size": sum(folder.size(f) for f in shards)},
             "weight_map": {k: v[0] for k, v in sorted(found.items())}}
    folder.write_text(INDEX_FILE, json.dumps(index, indent=2))
    config = json.loads((reader.model_dir / "config.json").read_text())
    config["quantization_config"] = qcfg.to_hf()
    if qcfg.pad_intermediate_to:
        config["intermediate_size"] = intermediate
    config["torch_dtype"] = config["dtype"] = _CONFIG_DTYPES[out_dtype]
    folder.write_text("config.json", json.dumps(config, indent=2))
    folder.write_text("quantize_config.json", json.dumps(qcfg.to_hf(), indent=2))
    copied = [name for name in TOKENIZER_FILES if (reader.model_dir / name).is_file()]
    for name in copied:
        folder.upload(reader.model_dir / name, name)
    return [*shards, INDEX_FILE, "config.json", "quantize_config.json", *copied]
