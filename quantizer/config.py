"""Quantization settings as a validated dataclass, with the GPTQ `quantization_config` it writes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from quantizer.errors import ConfigError

SUPPORTED_BITS = (2, 3, 4, 8)
MOE_CALIBRATIONS = ("auto", "all", "routed")
MOE_FALLBACKS = ("rtn", "damp")
FALLBACK_DAMP_PERCENT = 0.1  # the "damp" fallback's dampening
VLLM_BITS = (4, 8)  # vLLM's GPTQ kernels (Marlin, Machete, CPU WNA16): uint4b8 / uint8b128, symmetric only


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 4  # width of each integer code
    group_size: int = 128  # input columns sharing one scale/zero; -1 = one group per row
    desc_act: bool = False  # act-order: quantize columns by decreasing Hessian diagonal
    act_group_aware: bool = True  # without desc_act: solve whole groups by their largest diagonal entry
    sym: bool = True  # symmetric grid (zero fixed at 2^(bits-1)) or min-max asymmetric
    damp_percent: float = 0.01  # λ = damp_percent · mean(diag H) added to the diagonal
    static_groups: bool = False  # with desc_act: fix group scales from the unpermuted weight
    true_sequential: bool = True  # re-capture inputs after each sequential group is quantized
    block_size: int = 128  # columns per lazy-batch update
    method: str = "gptq"  # "gptq" or "rtn" (round-to-nearest baseline, same outputs)
    pad_intermediate_to: int = 0  # zero-pad the MLP width to a multiple of this (0 = off)
    moe_calibration: str = "auto"  # MoE: whose tokens form an expert's Hessian (outputs always follow the router):
    #   "all" every token; "routed" its routed tokens; "auto" its routed tokens when at least as many as its
    #   widest input (a full-rank Hessian), every token otherwise
    moe_min_token_fraction: float = 0.005  # MoE: an expert whose Hessian saw fewer of the layer's tokens falls back
    moe_fallback: str = "rtn"  # "rtn" (round-to-nearest) or "damp" (GPTQ with damp_percent 0.1)
    experts_per_chunk: int = 0  # MoE: experts whose float weights are held at once (memory only: the result is the
    #                             same bit for bit); 0 = the most that fit the memory budget (the planner's choice)

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"bits={self.bits} is not supported; use one of {SUPPORTED_BITS}")
        if self.group_size != -1 and (self.group_size <= 0 or self.group_size % 32 != 0):
            raise ConfigError(
                f"group_size={self.group_size} is invalid; use -1 (per row) or a positive multiple of 32 "
                "such as 32, 64 or 128"
            )
        if not 0.0 < self.damp_percent < 1.0:
            raise ConfigError(f"damp_percent={self.damp_percent} must lie in (0, 1); 0.01 is the usual value")
        if self.block_size <= 0:
            raise ConfigError(f"block_size={self.block_size} must be positive (128 is the usual value)")
        if self.method not in ("gptq", "rtn"):
            raise ConfigError(f"method={self.method!r} is unknown; use 'gptq' or 'rtn'")
        if self.moe_calibration not in MOE_CALIBRATIONS:
            raise ConfigError(f"moe_calibration={self.moe_calibration!r} is unknown; use one of {MOE_CALIBRATIONS}")
        if self.moe_fallback not in MOE_FALLBACKS:
            raise ConfigError(f"moe_fallback={self.moe_fallback!r} is unknown; use one of {MOE_FALLBACKS}")
        if not 0 <= self.moe_min_token_fraction < 1:
            raise ConfigError(f"moe_min_token_fraction={self.moe_min_token_fraction} must lie in [0, 1)")
        if self.experts_per_chunk < 0:
            raise ConfigError("experts_per_chunk must be 0 (sized from the memory budget) or a positive number")
        if self.pad_intermediate_to < 0:
            raise ConfigError("pad_intermediate_to must be 0 (off) or a positive multiple such as 1024")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def group_count(self, in_features: int) -> int:
        """Number of quantization groups along the input dimension."""
        return 1 if self.group_size == -1 else in_features // self.group_size

    def check_in_features(self, name: str, in_features: int) -> None:
        if self.group_size != -1 and in_features % self.group_size != 0:
            raise ConfigError(
                f"group_size={self.group_size} does not divide in_features={in_features} of {name}; "
                f"pick a group size that divides it (e.g. {_largest_dividing_group(in_features)}) or -1"
            )
        if in_features % 32 != 0:
            raise ConfigError(f"{name} has in_features={in_features}, not a multiple of 32: GPTQ packing needs it")

    def check_out_features(self, name: str, out_features: int) -> None:
        """The zeros of a row group are packed along the outputs, 32 // bits to a word (3 bits: 32 outputs)."""
        if out_features * self.bits % 32 != 0:
            step = 32 // math.gcd(32, self.bits)
            raise ConfigError(f"{name} has out_features={out_features}, not a multiple of {step}: GPTQ packs its "
                              f"{self.bits}-bit zeros {step} outputs to a 32-bit word; use other bits or leave "
                              "this model unquantized")

    @property
    def scattered_groups(self) -> bool:
        """True when the checkpoint's g_idx is not `column // group_size`: act-order with groups formed in
        solve order. Static groups (or one group per row) keep the plain layout whatever the solve order,
        and round-to-nearest has no solve order."""
        return self.method == "gptq" and self.desc_act and not self.static_groups and self.group_size != -1

    @property
    def solve_order(self) -> str:
        if self.method != "gptq":
            return "none (round-to-nearest)"
        if self.desc_act:
            return "act-order, static groups" if self.static_groups else "act-order"
        return "group-aware" if self.act_group_aware else "natural"

    def vllm_problems(self) -> list[str]:
        """Why vLLM would refuse a checkpoint written with these settings (empty: it loads it)."""
        problems = []
        if self.bits not in VLLM_BITS:
            problems.append(f"bits={self.bits} (vLLM's GPTQ kernels take 4 or 8)")
        if not self.sym:
            problems.append("sym=False (vLLM's GPTQ kernels take symmetric grids only)")
        if self.scattered_groups:
            problems.append("desc_act without static_groups (vLLM no longer takes scattered act-order groups)")
        return problems

    @classmethod
    def from_hf(cls, qdict: dict[str, Any]) -> "QuantConfig":
        """The layout a checkpoint's `quantization_config` describes (bits, groups, g_idx kind, grid)."""
        return cls(bits=qdict["bits"], group_size=qdict["group_size"], desc_act=bool(qdict.get("desc_act", False)),
                   sym=bool(qdict.get("sym", True)))

    def to_hf(self) -> dict[str, Any]:
        """The `quantization_config` written to config.json and quantize_config.json. `desc_act` describes
        the layout loaders must handle (a g_idx that scatters groups), so act-order with static groups
        writes False; the solve order itself is recorded in `meta`."""
        return {
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.scattered_groups,
            "sym": self.sym,
            "damp_percent": self.damp_percent,
            "static_groups": self.static_groups,
            "true_sequential": self.true_sequential,
            "lm_head": False,
            "meta": {"quantizer": ["rayquant:0.1.0"], "act_group_aware": self.act_group_aware and not self.desc_act,
                     "solve_order": self.solve_order},
            "checkpoint_format": "gptq",
            "method": "gptq",
            "format": "gptq",
        }



def _largest_dividing_group(in_features: int) -> int:
    for g in (128, 64, 32):
        if in_features % g == 0:
            return g
    return -1


@dataclass(frozen=True)
class CalibrationConfig:
    num_samples: int = 128  # sequences drawn from the file
    max_len: int = 512  # tokens per sequence at most (longer ones are truncated)
    batch_size: int = 8  # sequences per activation batch travelling between layers
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_samples", "max_len", "batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"calibration {name} must be a positive integer, got {getattr(self, name)}")
