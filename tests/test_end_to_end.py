"""The README's main job on the real default model: GPTQ beats round-to-nearest in perplexity."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from quantizer.calibration import default_eval_file
from quantizer.config import QuantConfig
from quantizer.evaluation import perplexity
from quantizer.loading import load_model
from quantizer.rtn import rtn_quantize
from rayquant.cli import main

pytestmark = pytest.mark.slow


def _ppl(model, capsys) -> float:
    assert main(["eval", "--model", str(model), "--max-windows", "6"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]


def rtn_model(float_dir, gptq_dir, qcfg: QuantConfig) -> torch.nn.Module:
    """The float model with every projection the GPTQ checkpoint quantized rounded to nearest on the same grid
    (bits, groups, sym): the baseline GPTQ must beat, made in-process (a second job would cost a minute)."""
    model = load_model(float_dir)
    quantized = {name.removesuffix(".qweight") for name in json.loads(
        (gptq_dir / "model.safetensors.index.json").read_text())["weight_map"] if name.endswith(".qweight")}
    with torch.no_grad():
        for name in quantized:
            linear = model.get_submodule(name)
            linear.weight.copy_(rtn_quantize(linear.weight, qcfg).dequantize().to(linear.weight.dtype))
    return model


def test_default_job_gptq_beats_rtn(default_model, default_int4, capsys):
    """The session's default job (GPTQ, through the pipeline) against round-to-nearest on the same settings."""
    report = json.loads((default_int4 / "quantize_report.json").read_text())
    assert len(report["stages"][0]["layer_reports"]) == 30
    qcfg = json.loads((default_int4 / "config.json").read_text())["quantization_config"]
    # the default job solves in act-order with static groups: the plain layout vLLM takes (g_idx = col // 64)
    assert qcfg["bits"] == 4 and qcfg["desc_act"] is False and qcfg["static_groups"] is True and qcfg["sym"] is True
    assert qcfg["meta"]["solve_order"] == "act-order, static groups"
    g_idx = load_file(str(next(default_int4.glob("model-*.safetensors"))))["model.layers.0.mlp.down_proj.g_idx"]
    assert torch.equal(g_idx, (torch.arange(g_idx.numel()) // 64).to(torch.int32))
    ppl_float, ppl_gptq = (_ppl(m, capsys) for m in (default_model, default_int4))
    torch.manual_seed(0)
    rtn = rtn_model(default_model, default_int4, QuantConfig.from_hf(qcfg))
    ppl_rtn = perplexity(rtn, AutoTokenizer.from_pretrained(default_model), default_eval_file(), 512, 6)
    assert ppl_float < ppl_gptq < ppl_rtn
