"""FP8 block-scaled source checkpoints, read directly (DeepSeek-V3/R1, Kimi-K2 are released so).

Such a checkpoint's config says `quantization_config: {quant_method: fp8, weight_block_size: [128, 128]}`; each
quantized projection stores `weight` in float8_e4m3fn ([out, in]) beside `weight_scale_inv` in float32
([⌈out/128⌉, ⌈in/128⌉]), and its real weight is `weight · weight_scale_inv` of the block each element lies in
(the last row and column of blocks may be partial). Everything else (norms, router, embeddings, head) is stored
in bf16. rayquant dequantizes tensor by tensor as a layer is loaded — no converted copy on disk — so calibration
and GPTQ see bf16 weights and the output is an ordinary GPTQ checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantizer.errors import ConfigError

FP8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}  # safetensors name → torch
SCALE_SUFFIX = "_scale_inv"  # `<module>.weight_scale_inv` beside `<module>.weight`
DEQUANTIZED = torch.bfloat16  # what an FP8 weight becomes


@dataclass(frozen=True)
class BlockFP8:
    """The FP8 scheme of a checkpoint: block shape and, per FP8 weight (disk name), its scale's disk name."""
    block: tuple[int, int]  # (rows, columns) of one scale's block
    scales: dict[str, str]


def block_size(qdict: dict, where: str) -> tuple[int, int]:
    """`weight_block_size` of an FP8 `quantization_config`; per-tensor FP8 (no blocks) is refused."""
    size = qdict.get("weight_block_size")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        raise ConfigError(f"{where} is FP8 without block scales (weight_block_size: {size!r}); rayquant reads "
                          "block-scaled FP8 (DeepSeek-V3/Kimi-K2 layout, weight_block_size [128, 128]). Use the "
                          "model's bf16 release, or save_pretrained a bf16 copy with transformers")
    return int(size[0]), int(size[1])


def scale_shape(weight_shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """[⌈out/b0⌉, ⌈in/b1⌉]: the scales a [out, in] weight needs."""
    out, inp = weight_shape
    return -(-out // block[0]), -(-inp // block[1])


def pair_scales(header: dict[str, tuple[tuple[int, ...], str]], block: tuple[int, int], where: str) -> BlockFP8:
    """Match every FP8 weight of `header` ({disk name: (shape, safetensors dtype)}) with its scale and check the
    shapes agree with the block size, before anything is loaded. A missing scale, a mismatched shape or a scale
    without its weight stops with the tensor's name."""
    scales: dict[str, str] = {}
    for name, (shape, dtype) in header.items():
        if dtype not in FP8_DTYPES:
            continue
        scale = name + SCALE_SUFFIX
        if scale not in header:
            raise ConfigError(f"{where}: FP8 tensor {name} has no {scale}; the checkpoint is incomplete "
                              "(re-download it)")
        if len(shape) != 2:
            raise ConfigError(f"{where}: FP8 tensor {name} has shape {list(shape)}; block-scaled FP8 weights are 2-D")
        want, have = scale_shape(shape, block), header[scale][0]
        if tuple(have) != want:
            raise ConfigError(f"{where}: {scale} has shape {list(have)}, but a {list(shape)} weight in "
                              f"{block[0]} × {block[1]} blocks needs {list(want)}: weight_block_size in config.json "
                              "does not match the checkpoint's scales")
        scales[name] = scale
    orphans = [n for n in header if n.endswith(SCALE_SUFFIX) and n.removesuffix(SCALE_SUFFIX) not in scales]
    if orphans:
        raise ConfigError(f"{where}: {orphans[0]} has no FP8 weight beside it ({orphans[0].removesuffix(SCALE_SUFFIX)}"
                          " is missing or not FP8); the checkpoint is inconsistent (re-download it)")
    return BlockFP8(block, scales)


def dequantize(name: str, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """weight: [out, in] FP8, scale_inv: [⌈out/b0⌉, ⌈in/b1⌉] → [out, in] bf16 (computed in fp32, one block-row
    band at a time: no full-size fp32 copy). Non-finite results stop with the tensor's name."""
    out, inp = weight.shape
    result = torch.empty(out, inp, dtype=DEQUANTIZED)
    scale = scale_inv.float().repeat_interleave(block[1], dim=1)[:, :inp]  # [⌈out/b0⌉, in]
    for band in range(scale.shape[0]):
        rows = slice(band * block[0], min(out, (band + 1) * block[0]))
        result[rows] = (weight[rows].float() * scale[band]).to(DEQUANTIZED)
    if not torch.isfinite(result).all():
        raise ConfigError(f"{name}: the dequantized FP8 weight holds NaN/Inf (weight × weight_scale_inv); the "
                          "checkpoint is corrupt (re-download it)")
    return result
