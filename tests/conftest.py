"""Shared fixtures: the real default model, tiny seeded checkpoints, captured activations, a local Ray."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token written into the home dir
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
# Idle OpenMP threads sleep instead of spinning: tests run torch in several processes at once (pytest-xdist
# workers, Ray actors, servers) on 2 cores, where spinning threads take the cores the others wait for (two
# concurrent evaluations: 29 s spinning, 17 s passive, 12 s for one alone). Set before torch is imported;
# Ray's workers inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Triton kernels run on CPU tensors in its interpreter. Triton reads this once, when first imported
# (GPTQModel imports it too), so it is set here, before any test module is collected.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from quantizer.assets import default_model_dir
from tests.local_ray import actors_left, start_ray, stop_ray
from tests.tiny_models import write_tiny_model

DEFAULT_JOB = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
torch.set_num_threads(2)
RAY_MODULES: set[Path] = set()  # test files of which some test uses ray_local (set at collection)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files holding slow or multi-node tests run first, so that pytest-xdist's two workers finish together
    (they take whole files in this order: `--dist loadfile --no-loadscope-reorder`, pyproject.toml); among
    the rest, the files that use a local Ray run one after another, so that they share it (module_ray)."""
    heavy = {item.path for item in items if item.get_closest_marker("slow") or item.get_closest_marker("multinode")}
    RAY_MODULES.update(item.path for item in items if "ray_local" in item.fixturenames)
    items.sort(key=lambda item: (item.path not in heavy, item.path not in RAY_MODULES))


def shared_root(tmp_path_factory) -> Path:
    """The temp directory every pytest-xdist worker of this run shares (the session's own without xdist)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


@pytest.fixture(scope="session")
def default_model():
    return default_model_dir()


@pytest.fixture(scope="session")
def default_int4(default_model, tmp_path_factory):
    """The README's main job (configs/default.yaml: SmolLM2, int4 g64 sym, act-order with static groups) on
    16 calibration samples of ≤ 256 tokens (GPTQ still clearly beats round-to-nearest: perplexity 25.5 vs 27.6
    on 6 windows), made once per test run through the pipeline and shared read-only by the tests that need the
    real model quantized (quality, vLLM, serving) — across pytest-xdist's workers too: the first to need it
    makes it, under a lock, in the directory the workers share."""
    from filelock import FileLock

    from cluster.driver import Driver
    from cluster.job import load_job

    root = shared_root(tmp_path_factory)
    out = root / "default-job" / "smollm2-int4"
    with FileLock(str(root / "default-job.lock")):
        if not (out / "quantize_report.json").is_file():
            Driver(load_job(DEFAULT_JOB, {"output_dir": str(out), "calibration.num_samples": 16,
                                          "calibration.max_len": 256, "resources.cpus_per_stage": 2})).run()
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def tiny_llama_gptq(tmp_path_factory):
    """tiny_llama quantized by a one-stage pipeline job with the tests' SMALL settings, made once per test run and
    shared read-only across pytest-xdist's workers (the model is seeded: every worker's tiny_llama is the same):
    the reference of the pipeline tests, the data-parallel tests' sequential run and the servers' model."""
    import ray
    from filelock import FileLock

    from tests.test_pipeline import run_job

    root = shared_root(tmp_path_factory) / "tiny-llama-gptq"
    out = root / "tiny-gptq"
    with FileLock(str(root) + ".lock"):
        if not (out / "quantize_report.json").is_file():
            if not ray.is_initialized():  # the module's Ray (module_ray) when it runs one
                start_ray()
            run_job(write_tiny_model(root / "tiny-llama", "llama"), out, stages=1)
    return out


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    """Qwen2 has biases on q/k/v: exercises bias handling."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", "qwen2", layers=3)


@pytest.fixture(scope="session")
def captured_layer(default_model):
    """Real inputs of SmolLM2 layer 3's attention and down projections on 16 calibration texts."""
    from tests.layer_inputs import capture_layer_inputs

    return capture_layer_inputs(default_model)


@pytest.fixture(scope="module", autouse=True)
def module_ray(request):
    """One local Ray (4 logical CPUs) per pytest worker, shared by consecutive modules that use ray_local: a
    start and stop costs ~4.5 s of the 2 cores. A module that uses it finds it up before its first test; one
    that does not finds no Ray (its drivers start their own; `--address` is checked); a module that leaves an
    actor alive (a Serve left by a failed test) has it stopped after its last test."""
    import ray

    wanted = request.path in RAY_MODULES
    if wanted and not ray.is_initialized():
        start_ray()
    elif not wanted and ray.is_initialized():
        stop_ray()
    yield
    if wanted and ray.is_initialized() and actors_left():
        stop_ray()


@pytest.fixture(scope="module")
def ray_local(module_ray):
    import ray

    return ray


def pytest_sessionfinish(session, exitstatus) -> None:
    import ray

    if ray.is_initialized():
        stop_ray()
