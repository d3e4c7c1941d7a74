"""The README's main job on the real default model: GPTQ beats round-to-nearest in perplexity."""

import json

import pytest
import torch
from safetensors.torch import load_file

from rayquant.cli import main

pytestmark = pytest.mark.slow


def _ppl(model, capsys) -> float:
    assert main(["eval", "--model", str(model), "--max-windows", "6"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]


def test_default_job_gptq_beats_rtn(tmp_path, default_model, default_int4, capsys):
    """The session's default job (GPTQ, through the pipeline) against round-to-nearest on the same settings
    and calibration, run through the CLI."""
    assert main(["quantize", "--config", "configs/default.yaml", "--num-samples", "64", "--max-len", "256",
                 "--method", "rtn", "--out", str(tmp_path / "rtn")]) == 0
    capsys.readouterr()
    report = json.loads((default_int4 / "quantize_report.json").read_text())
    assert len(report["stages"][0]["layer_reports"]) == 30
    qcfg = json.loads((default_int4 / "config.json").read_text())["quantization_config"]
    # the default job solves in act-order with static groups: the plain layout vLLM takes (g_idx = col // 64)
    assert qcfg["bits"] == 4 and qcfg["desc_act"] is False and qcfg["static_groups"] is True and qcfg["sym"] is True
    assert qcfg["meta"]["solve_order"] == "act-order, static groups"
    g_idx = load_file(str(next(default_int4.glob("model-*.safetensors"))))["model.layers.0.mlp.down_proj.g_idx"]
    assert torch.equal(g_idx, (torch.arange(g_idx.numel()) // 64).to(torch.int32))
    ppl_float, ppl_gptq, ppl_rtn = (_ppl(m, capsys) for m in (default_model, default_int4, tmp_path / "rtn"))
    assert ppl_float < ppl_gptq < ppl_rtn
