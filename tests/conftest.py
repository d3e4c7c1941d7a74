"""Shared fixtures: the real default model, tiny seeded checkpoints, captured activations, a local Ray."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token written into the home dir
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
# Triton kernels run on CPU tensors in its interpreter. Triton reads this once, when first imported
# (GPTQModel imports it too), so it is set here, before any test module is collected.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from quantizer.assets import default_model_dir
from tests.tiny_models import write_tiny_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def default_model():
    return default_model_dir()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    """Qwen2 has biases on q/k/v: exercises bias handling."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", "qwen2", layers=3)


@pytest.fixture(scope="session")
def captured_layer(default_model):
    """Real inputs of SmolLM2 layer 3's attention and down projections on 16 calibration texts.

    Returns {"attn": (W_qkv [1 536... , 576], X [tokens, 576]), "down": (W_down, X_mlp)}.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantizer.calibration import CalibrationConfig, default_calibration_file, tokenize_samples

    tokenizer = AutoTokenizer.from_pretrained(default_model)
    model = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32).eval()
    samples = tokenize_samples(default_calibration_file(), tokenizer, CalibrationConfig(num_samples=16, max_len=256))
    layer = model.model.layers[3]
    seen: dict[str, list[torch.Tensor]] = {"attn": [], "down": []}
    hooks = [layer.self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen["attn"].append(a[0][0])),
             layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen["down"].append(a[0][0]))]
    with torch.inference_mode():
        for s in samples:
            model(s.unsqueeze(0))
    for h in hooks:
        h.remove()
    attn_w = torch.cat([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight])
    return {"attn": (attn_w.detach().clone(), torch.cat(seen["attn"])),
            "down": (layer.mlp.down_proj.weight.detach().clone(), torch.cat(seen["down"]))}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()
