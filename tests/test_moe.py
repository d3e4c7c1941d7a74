"""Mixture-of-experts models (Qwen3-MoE, Qwen2-MoE with its shared expert, Mixtral): routing as transformers
routes, every expert calibrated on every token while outputs follow the router, rare experts falling back,
the pipeline writing per-expert GPTQ tensors in the Hub layout that our loader, transformers and GPTQModel
read, parallel solves, and the bad inputs an MoE job can bring."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from quantizer.activations import TokenBatch
from quantizer.config import QuantConfig
from quantizer.engine import LayerReport, StageEngine
from quantizer.loading import load_model
from quantizer.model_io import CheckpointReader
from quantizer.experts import ExpertList
from rayquant.cli import main
from bench.tiny_families import dequantized_reference
from tests.gptqmodel_child import gptqmodel_logits
from tests.test_pipeline import assert_same_tensors, checkpoint_tensors, run_job
from tests.tiny_models import write_tiny_moe

FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral"]


class MemoryStore:
    def put(self, chunk):
        return chunk

    def get(self, handle):
        return handle


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {family: write_tiny_moe(root / family, family) for family in FAMILIES}


def batch(seed: int = 0, rows: int = 4, length: int = 32) -> TokenBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.bool)
    mask[1, length // 2:] = False  # a padded row: padding must not reach the experts' Hessians
    return TokenBatch(ids, mask)


class KeptLayers:
    """A layer store that keeps what the engine saves (and never resumes)."""

    def __init__(self) -> None:
        self.tensors: dict[int, dict[str, torch.Tensor]] = {}
        self.reports: dict = {}
        self.parts: dict[int, list[int]] = {}  # layer → numbers of the part checkpoints saved

    def has(self, index) -> bool:
        return False

    def load(self, index):
        return None

    def save(self, index, tensors, report) -> None:
        self.tensors[index], self.reports[index] = tensors, report

    def save_part(self, index, part, tensors, report, state) -> None:
        self.parts.setdefault(index, []).append(part)

    def load_parts(self, index):
        return None

    def remove_parts(self, index) -> None:
        self.parts.pop(index, None)


def engine(model: Path, **quant) -> StageEngine:
    cfg = QuantConfig(**{"bits": 4, "group_size": 32, **quant})
    return StageEngine(CheckpointReader(model), range(1), cfg, MemoryStore(), KeptLayers())


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_block_routes_like_transformers(moe_models, family):
    """Our layer (one module per expert) gives transformers' outputs (fused experts) on the real tokens."""
    eng = engine(moe_models[family])
    tokens = batch()
    ours = eng.forward_layer(eng.float_layer(0), 0, eng.embed(tokens)).hidden
    model = AutoModelForCausalLM.from_pretrained(moe_models[family], dtype=torch.float32)
    with torch.no_grad():
        theirs = model.model(input_ids=tokens.input_ids, attention_mask=tokens.mask.long(),
                             output_hidden_states=True).hidden_states[1]
    m = tokens.mask
    assert float((ours[m] - theirs[m]).norm() / theirs[m].norm()) < 1e-5


def test_expert_count_under_either_config_key(moe_models, tmp_path):
    """Qwen's Hub configs say num_experts, transformers 5 writes num_local_experts: both are read."""
    for key in ("num_experts", "num_local_experts"):
        model = tmp_path / key
        shutil.copytree(moe_models["qwen3_moe"], model)
        config = json.loads((model / "config.json").read_text())
        count = config.pop("num_experts", None) or config.pop("num_local_experts")
        config[key] = count
        (model / "config.json").write_text(json.dumps(config))
        reader = CheckpointReader(model)
        assert reader.arch.num_experts(0) == 8
        assert len(reader.linear_shapes(0)) == 4 + 8 * 3


def test_every_expert_sees_every_token_while_outputs_follow_the_router(moe_models):
    eng = engine(moe_models["qwen3_moe"], moe_calibration="all")
    tokens = batch()
    chunk = eng.embed(tokens)
    real = int(tokens.mask.sum())
    layer = eng.float_layer(0)
    routed = eng.forward_layer(layer, 0, chunk).hidden
    layer.mlp.experts.every_token = frozenset(range(8))
    all_experts = eng.forward_layer(layer, 0, chunk).hidden
    assert torch.allclose(routed, all_experts, rtol=1e-5, atol=1e-6)  # the block's output is the routed one
    (report,) = [e for e in eng.quantize([chunk]) if isinstance(e, LayerReport)]
    assert sum(report.expert_tokens) == 2 * real  # top-2 of the real tokens, padding excluded
    expert_units = {k: v for k, v in report.hessian_tokens.items()}
    assert len(expert_units) == 16 and set(expert_units.values()) == {real}  # gate/up and down of 8 experts
    assert not report.expert_fallbacks


@pytest.mark.parametrize("rows,length", [(4, 32), (16, 64)])
def test_auto_calibration_gives_short_experts_every_token(moe_models, rows, length):
    """auto: an expert's own routed tokens when they are at least as many as the projection's inputs (hidden
    128 for gate/up, width 64 for down), every token otherwise."""
    eng = engine(moe_models["qwen3_moe"])
    tokens = batch(rows=rows, length=length)
    real = int(tokens.mask.sum())
    (report,) = [e for e in eng.quantize([eng.embed(tokens)]) if isinstance(e, LayerReport)]
    for e, routed in enumerate(report.expert_tokens):
        assert report.hessian_tokens[f"mlp.experts.{e}.gate_proj"] == (routed if routed >= 128 else real)
        assert report.hessian_tokens[f"mlp.experts.{e}.down_proj"] == (routed if routed >= 64 else real)
    if rows == 4:  # ~28 routed tokens each: every expert falls short
        assert set(report.hessian_tokens.values()) == {real}


def test_routed_only_calibration_and_rare_experts_fall_back(moe_models, caplog):
    """Routed-only: each expert's Hessian holds its routed tokens; one below moe_min_token_fraction of the
    layer's tokens is rounded to nearest, named in the report and the log."""
    from quantizer.packing import pack_result
    from quantizer.rtn import rtn_quantize

    eng = engine(moe_models["qwen3_moe"], moe_calibration="routed", moe_min_token_fraction=0.1)
    tokens = batch()
    with caplog.at_level(logging.WARNING, logger="quantizer.engine"):
        (report,) = [e for e in eng.quantize([eng.embed(tokens)]) if isinstance(e, LayerReport)]
    for e, routed in enumerate(report.expert_tokens):
        assert report.hessian_tokens[f"mlp.experts.{e}.gate_proj"] == routed  # its own tokens only
    real = int(tokens.mask.sum())
    rare = [e for e, n in enumerate(report.expert_tokens) if n < 0.1 * real]
    assert rare, "the test needs an expert below the threshold"
    for e in rare:
        assert report.expert_fallbacks[f"mlp.experts.{e}.gate_proj"].startswith("rtn:")
        assert f"mlp.experts.{e}.gate_proj saw {report.expert_tokens[e]} calibration tokens" in caplog.text
    e = rare[0]
    name = f"model.layers.0.mlp.experts.{e}.up_proj.weight"
    weight = CheckpointReader(moe_models["qwen3_moe"]).load([name])[name].float()
    rtn = pack_result(rtn_quantize(weight, eng.qcfg), 4).tensors("w")
    written = eng.layer_store.tensors[0]
    assert torch.equal(written[f"mlp.experts.{e}.up_proj.qweight"], rtn["w.qweight"])


@pytest.fixture(scope="module")
def quantized_moe(moe_models, tmp_path_factory, ray_local):
    """Every family through the pipeline (qwen2_moe: a shared expert and its gate; mixtral: block_sparse_moe
    with w1/w2/w3 on disk)."""
    root = tmp_path_factory.mktemp("moe-out")
    outs = {}
    for family in FAMILIES:
        outs[family] = root / family
        run_job(moe_models[family], outs[family], stages=2, **{"quant.desc_act": False})
    return outs


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_writes_hub_layout_that_loads_as_the_dequantized_model(moe_models, quantized_moe, family):
    out = quantized_moe[family]
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    block = "block_sparse_moe" if family == "mixtral" else "mlp"
    gate, up, down = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    for e in range(8):
        for proj in (gate, up, down):
            for kind in ("qweight", "qzeros", "scales", "g_idx"):
                assert f"model.layers.1.{block}.experts.{e}.{proj}.{kind}" in weight_map
    tensors = checkpoint_tensors(out)
    assert tensors[f"model.layers.0.{block}.gate.weight"].dtype == torch.float16  # the router stays float
    if family == "qwen2_moe":
        assert tensors["model.layers.0.mlp.shared_expert_gate.weight"].dtype == torch.float16
        assert "model.layers.0.mlp.shared_expert.down_proj.qweight" in tensors
    report = json.loads((out / "quantize_report.json").read_text())
    layer = report["stages"][0]["layer_reports"][0]
    assert len(layer["expert_tokens"]) == 8 and sum(layer["expert_tokens"]) == 2 * report["calibration_tokens"]
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ours = load_model(out)(ids).logits
        reference = dequantized_reference(moe_models[family], out)(ids).logits
    assert float((ours - reference).norm() / reference.norm()) < 1e-4


@pytest.mark.interop
@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_gptqmodel_loads_our_moe_checkpoint(moe_models, quantized_moe, family):
    """GPTQModel 7.6.0's loader (a transformers model with its kernels; the router and shared-expert gate
    float, as its own MoE definitions keep them) agrees with our dequantized reference. (Mixtral: GPTQModel
    7.6.0 looks for its own renamed experts, mlp.experts.E.gate_proj, and refuses the Hub layout
    block_sparse_moe.experts.E.w1 that transformers writes and vLLM reads; see the README.)"""
    pytest.importorskip("gptqmodel")
    out = quantized_moe[family]
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        reference = dequantized_reference(moe_models[family], out)(ids).logits
    theirs = gptqmodel_logits(out, ids)
    assert float((theirs - reference).norm() / reference.norm()) < 0.03  # their CPU kernel computes in bfloat16


def test_solves_spread_over_two_workers_give_the_same_tensors(moe_models, quantized_moe, tmp_path):
    out = tmp_path / "two-workers"
    report = run_job(moe_models["mixtral"], out, stages=2, **{"quant.desc_act": False, "resources.solve_workers": 2})
    assert_same_tensors(quantized_moe["mixtral"], out)
    assert all(stage["solves_elsewhere"] > 0 for stage in report["stages"])


def test_missing_expert_tensor_is_refused_and_nothing_published(moe_models, tmp_path, caplog):
    model = tmp_path / "incomplete"
    shutil.copytree(moe_models["qwen3_moe"], model)
    tensors = load_file(str(model / "model.safetensors"))
    del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    assert main(["quantize", "--model", str(model), "--out", str(tmp_path / "out"), "--group-size", "32"]) == 2
    assert "model.layers.1.mlp.experts.5.up_proj.weight is missing" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["incomplete"]


def test_no_nan_is_ever_written(moe_models, tmp_path, ray_local):
    model = tmp_path / "nan"
    shutil.copytree(moe_models["qwen3_moe"], model)
    tensors = load_file(str(model / "model.safetensors"))
    tensors["model.norm.weight"][3] = float("nan")  # never used in calibration: caught when the shard is written
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(Exception, match="refusing to write non-finite values .*model.norm.weight"):
        run_job(model, tmp_path / "out", stages=1)
    assert not (tmp_path / "out").exists()


def test_sparse_block_built_for_each_layer(moe_models):
    reader = CheckpointReader(moe_models["mixtral"])
    eng = StageEngine(reader, range(2), QuantConfig(group_size=32), MemoryStore())
    assert all(isinstance(eng.float_layer(i).mlp.experts, ExpertList) for i in range(2))
