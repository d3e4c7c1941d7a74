"""Every family read from transformers' own layers: the named modern families (DeepSeek-V3 / Kimi-K2 with MLA,
GLM-4.5, MiniMax-M2, gpt-oss, Qwen3-Next, Llama 4, OLMoE, ERNIE-4.5-MoE, Gemma 3, Phi-3) compute what
transformers computes with their experts unfused, quantize through the pipeline and load as their dequantized
weights; the seven families of earlier releases give the tensors they gave before; refusals name the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from bench.tiny_families import dequantized_reference, write_tiny_family
from cluster.driver import Driver
from cluster.job import load_job
from quantizer.activations import MemoryStore, TokenBatch
from quantizer.config import QuantConfig
from quantizer.decoder import load_tokenizer
from quantizer.engine import StageEngine
from quantizer.errors import ConfigError
from quantizer.layer_builder import quantized_linear
from quantizer.loading import load_model
from quantizer.model_io import CheckpointReader
from quantizer.passes import layer_passes
from rayquant.cli import main
from tests.inline_job import SMALL, quantize_inline
from tests.test_pipeline import assert_same_tensors, checkpoint_tensors, layers_dir, run_job
from tests.tiny_models import write_tiny_model, write_tiny_moe

FAMILIES = ["deepseek_v3", "deepseek_v2", "glm4_moe", "minimax_m2", "gpt_oss", "qwen3_next", "llama4_text", "olmoe",
            "ernie4_5_moe", "gemma3_text", "phi3"]
BEFORE = Path(__file__).parent / "data" / "families_before"


def batch(seed: int = 0, rows: int = 3, length: int = 24) -> TokenBatch:
    ids = torch.randint(0, 1000, (rows, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(rows, length, dtype=torch.bool)
    mask[1, length // 2:] = False  # padding reaches no expert, no Hessian
    return TokenBatch(ids, mask)


@pytest.fixture(scope="module")
def float32_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families-fp32")
    return lambda family, **extra: write_tiny_family(root / f"{family}{len(extra)}", family, dtype=torch.float32,
                                                     **extra)


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_compute_what_transformers_computes(float32_models, family):
    """Each decoder layer as rayquant builds it (experts one module each, the model's own masks and rotary
    inputs) gives transformers' layer outputs on the real tokens, layer by layer."""
    path = float32_models(family)
    reader = CheckpointReader(path)
    eng = StageEngine(reader, range(reader.num_layers), QuantConfig(bits=4, group_size=32), MemoryStore())
    tokens = batch()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    theirs = {}
    for i, layer in enumerate(model.get_submodule(reader.arch.layers_prefix)):
        layer.register_forward_hook(lambda _m, _a, out, i=i: theirs.__setitem__(i, out[0] if isinstance(out, tuple)
                                                                                  else out))
    with torch.no_grad():
        model(input_ids=tokens.input_ids, attention_mask=tokens.mask.long(), use_cache=False)
    chunk = eng.embed(tokens)
    m = tokens.mask
    for i in range(reader.num_layers):
        chunk = eng.forward_layer(eng.float_layer(i), i, chunk)
        assert float((chunk.hidden[m] - theirs[i][m]).abs().max() / theirs[i][m].abs().max()) < 1e-5, i
    assert any(reader.arch.is_sparse(i) for i in range(reader.num_layers)) == (family not in ("gemma3_text", "phi3"))


def test_units_and_order_come_from_the_layer(float32_models):
    """MLA: q_a_proj and kv_a_proj_with_mqa read the same normed input (one Hessian), q_b_proj and kv_b_proj
    come next, then o_proj; the experts' gate/up (and the shared expert's) in one pass, their down_proj in the
    next; the router stays float. Phi-3's fused qkv_proj / gate_up_proj are single projections. Qwen3-Next's
    linear-attention projections are quantized too."""
    arch = CheckpointReader(float32_models("deepseek_v3")).arch
    groups = arch.layer_units(1)
    assert groups[:3] == ((("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),),
                          (("self_attn.q_b_proj",), ("self_attn.kv_b_proj",)), (("self_attn.o_proj",),))
    experts = arch.num_experts(1)
    assert len(groups[3]) == experts + 1 and ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj") in \
        groups[3] and ("mlp.experts.0.gate_proj", "mlp.experts.0.up_proj") in groups[3]
    assert len(groups[4]) == experts + 1 and ("mlp.experts.3.down_proj",) in groups[4]
    assert "mlp.gate.weight" in arch.tensor_shapes(1) and not any("mlp.gate." in n for n in arch.linear_names(1))
    assert arch.layer_units(0)[3:] == ((("mlp.gate_proj", "mlp.up_proj"),), (("mlp.down_proj",),))  # first dense
    phi3 = CheckpointReader(float32_models("phi3")).arch
    assert phi3.layer_units(0) == ((("self_attn.qkv_proj",),), (("self_attn.o_proj",),), (("mlp.gate_up_proj",),),
                                   (("mlp.down_proj",),))
    next_arch = CheckpointReader(float32_models("qwen3_next")).arch
    linear = [i for i in range(next_arch.num_layers) if "linear_attn.out_proj" in next_arch.linear_names(i)]
    assert linear and next_arch.layer_units(linear[0])[0] == (("linear_attn.in_proj_qkvz", "linear_attn.in_proj_ba"),)
    assert "mlp.shared_expert_gate" in next_arch.spec(linear[0]).floats  # a Linear in the experts' block: float


def test_mla_without_q_lora_rank(float32_models):
    """DeepSeek-V2-Lite has no query low-rank projection: q_proj shares kv_a_proj_with_mqa's input."""
    arch = CheckpointReader(float32_models("deepseek_v2", q_lora_rank=None)).arch
    assert arch.layer_units(0)[0] == (("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa"),)


# ---- through the pipeline --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """quantized(family) → (float dir, GPTQ dir): a tiny bf16 model quantized as a one-stage job (in this
    process: tests/inline_job.py)."""
    root = tmp_path_factory.mktemp("families")
    made: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in made:
            model = write_tiny_family(root / family, family)
            quantize_inline(model, root / f"{family}-gptq", **{"quant.desc_act": False})
            made[family] = model, root / f"{family}-gptq"
        return made[family]
    return get


def test_inline_job_writes_what_the_pipeline_writes(quantized, tmp_path, ray_local):
    """The in-process one-stage job these tests use gives the Ray pipeline's checkpoint bit for bit."""
    float_dir, inline = quantized("deepseek_v3")
    run_job(float_dir, tmp_path / "pipeline", stages=1, **{"quant.desc_act": False})
    assert_same_tensors(inline, tmp_path / "pipeline")


@pytest.mark.parametrize("family", FAMILIES)
def test_quantizes_and_loads_as_its_dequantized_weights(quantized, family):
    float_dir, out = quantized(family)
    tensors = checkpoint_tensors(out)
    reader = CheckpointReader(float_dir)
    for i in range(reader.num_layers):
        for name in reader.arch.linear_names(i):
            disk = reader.arch.names.disk_name(f"{reader.arch.layer_prefix(i)}.{name}.weight").rpartition(".")[0]
            assert tensors[f"{disk}.qweight"].dtype == torch.int32, disk
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ours = load_model(out)(ids).logits
        reference = dequantized_reference(float_dir, out)(ids).logits
    assert torch.isfinite(ours).all()
    assert float((ours - reference).norm() / reference.norm()) < 1e-4


def test_expert_names_on_disk_follow_each_family_hub_layout(quantized):
    """Names come from transformers' conversion mapping: MiniMax-M2 keeps Mixtral's block_sparse_moe / w1 w3 w2;
    DeepSeek and GLM per-expert gate/up/down under mlp; gpt-oss and Llama 4 (fused on the Hub) get per-expert
    gate_proj / up_proj / down_proj, the halves of gate_up_proj in stored order, as GPTQModel writes them."""
    expect = {"minimax_m2": "model.layers.1.block_sparse_moe.experts.2.w3",
              "deepseek_v3": "model.layers.1.mlp.experts.2.up_proj", "glm4_moe": "model.layers.1.mlp.experts.2.up_proj",
              "gpt_oss": "model.layers.1.mlp.experts.2.up_proj",
              "llama4_text": "model.layers.1.feed_forward.experts.2.up_proj"}
    for family, module in expect.items():
        index = json.loads((quantized(family)[1] / "model.safetensors.index.json").read_text())["weight_map"]
        assert {f"{module}.{k}" for k in ("qweight", "qzeros", "scales", "g_idx")} <= set(index), family
    gpt_oss = checkpoint_tensors(quantized("gpt_oss")[1])
    assert gpt_oss["model.layers.0.mlp.experts.1.gate_proj.bias"].shape == (128,)  # the biases split with them
    assert gpt_oss["model.layers.0.mlp.router.weight"].dtype == torch.bfloat16  # routers stay float


def test_data_parallel_and_resume_on_deepseek_v3(quantized, tmp_path, monkeypatch):
    """Both schedules give DeepSeek-V3 the same layout; two workers streaming the experts one at a time give the
    bits of two workers holding them all; a data-parallel run stopped inside its sparse layer (its attention
    part and two chunks checkpointed as parts) replays its first layer and continues the second at the third
    chunk, to the tensors and losses of a run that never stopped, leaving no part behind."""
    from cluster.data_parallel import DataParallelRun

    float_dir, sequential = quantized("deepseek_v3")
    dp = {"schedule": "data_parallel", "resources.workers": 2, "quant.desc_act": False}
    clean = tmp_path / "dp"
    run_job(float_dir, clean, **dp)
    assert sorted(checkpoint_tensors(clean)) == sorted(checkpoint_tensors(sequential))
    dp["quant.experts_per_chunk"] = 1  # experts streamed
    whole = run_job(float_dir, tmp_path / "dp-chunked", **dp)
    chunked = checkpoint_tensors(tmp_path / "dp-chunked")
    assert not [k for k, v in checkpoint_tensors(clean).items() if not torch.equal(v, chunked[k])]
    collect = DataParallelRun._collect

    def stop_in_chunk_two(self, report, phase, index, step, *rest):
        collect(self, report, phase, index, step, *rest)
        if index == 1 and step.chunk == 2:  # part 2 (chunks 0 and 1 done) is queued: let worker 0 write it
            ray.get(self.workers[0].flush.remote())
            raise RuntimeError("stopped inside layer 1")

    monkeypatch.setattr(DataParallelRun, "_collect", stop_in_chunk_two)
    with pytest.raises(RuntimeError, match="stopped inside layer 1"):
        run_job(float_dir, tmp_path / "resumed", **dp)
    monkeypatch.undo()
    assert [p.name for p in sorted(layers_dir(tmp_path / "resumed").glob("layer_00001.part_*"))] == [
        f"layer_00001.part_0000{k}.safetensors" for k in range(3)]
    report = run_job(float_dir, tmp_path / "resumed", **dp)
    layers = report["stages"][0]["layer_reports"]
    reader = CheckpointReader(float_dir)
    passes = layer_passes(reader.arch.spec(1), reader.arch.num_experts(1), 1, True)
    assert [r["resumed"] for r in layers] == [True, False]
    assert layers[1]["resumed_at_pass"] == min(k for k, p in enumerate(passes) if p.chunk == 2)
    assert layers[1]["losses"] == whole["stages"][0]["layer_reports"][1]["losses"]
    resumed = checkpoint_tensors(tmp_path / "resumed")
    assert not [k for k, v in checkpoint_tensors(clean).items() if not torch.equal(v, resumed[k])]


def test_multi_token_prediction_layers_are_skipped_and_said(tmp_path, ray_local):
    """DeepSeek-V3 and GLM-4.5 store a multi-token-prediction layer past num_hidden_layers: not part of the
    causal LM, not written, named in the report."""
    model = write_tiny_family(tmp_path / "float", "deepseek_v3")
    tensors = load_file(str(model / "model.safetensors"))
    tensors.update({k.replace("model.layers.1.", "model.layers.2."): v.clone() for k, v in tensors.items()
                    if k.startswith("model.layers.1.")})
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    report = run_job(model, tmp_path / "out", stages=1)
    assert report["skipped_tensors"] and all(n.startswith("model.layers.2.") for n in report["skipped_tensors"])
    assert not any(k.startswith("model.layers.2.") for k in checkpoint_tensors(tmp_path / "out"))


def test_kimi_k2_reads_as_deepseek_v3_without_remote_code(tmp_path):
    model = write_tiny_family(tmp_path / "kimi", "deepseek_v3")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="kimi_k2", auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                                                  "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"})
    (model / "config.json").write_text(json.dumps(config))
    reader = CheckpointReader(model)
    assert reader.config.model_type == "deepseek_v3" and reader.arch.model_type == "kimi_k2"
    assert reader.arch.layer_units(0)[0] == (("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),)


def test_kimi_k2_with_yarn_rope_quantizes_and_loads_with_its_tokenizer(tmp_path):
    """Kimi-K2's config names model_type kimi_k2 and YaRN rope scaling: transformers' tokenizer loader, left to
    itself, builds a generic config for the unknown type and fails on the YaRN fields. The driver, the inline
    job and the engines load the tokenizer with the config rayquant resolved."""
    model = write_tiny_family(tmp_path / "kimi", "deepseek_v3")
    config = json.loads((model / "config.json").read_text())
    del config["rope_parameters"]  # the release's config.json is written in the older style
    config.update(model_type="kimi_k2", rope_theta=50000.0, rope_scaling={
        "type": "yarn", "factor": 4.0, "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 128})
    (model / "config.json").write_text(json.dumps(config))
    driver = Driver(load_job(None, {**SMALL, "model": str(model), "output_dir": str(tmp_path / "driven")}))
    assert driver.calibration_tokens > 0 and driver.tokenizer("Kimi").input_ids
    out = tmp_path / "out"
    quantize_inline(model, out)
    assert json.loads((out / "config.json").read_text())["model_type"] == "kimi_k2"
    ids = load_tokenizer(out)("The quantized Kimi-K2 reads its own tokenizer", return_tensors="pt").input_ids
    assert torch.isfinite(load_model(out)(ids).logits).all()


@pytest.mark.parametrize("method,fix", [("gptq", "quantize the float"), ("awq", "quantize the float"),
                                        ("compressed-tensors", "quantize the float"), ("mxfp4", "BF16")])
def test_quantized_sources_are_refused_naming_the_fix(tmp_path, method, fix):
    model = tmp_path / method
    shutil.copytree(write_tiny_model(tmp_path / "float", "llama", layers=1), model)
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method}
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=f"already quantized \\(quant_method {method}\\).*{fix}"):
        CheckpointReader(model)


def test_a_projection_that_is_not_linear_nor_experts_is_refused_before_ray(tmp_path, caplog, monkeypatch):
    """JetMoE keeps its experts in its own ParallelExperts modules (not transformers' experts interface):
    refused, naming the module, before Ray starts and before anything is written."""
    import cluster.driver

    monkeypatch.setattr(cluster.driver, "connect_ray", lambda *a, **k: pytest.fail("Ray was started"))
    model = write_tiny_family(tmp_path / "jetmoe", "jetmoe")
    assert main(["quantize", "--model", str(model), "--out", str(tmp_path / "out"), "--group-size", "32"]) == 2
    assert "mlp.input_linear.weight (JetMoeParallelExperts" in caplog.text
    assert "neither an nn.Linear nor experts" in caplog.text
    assert not (tmp_path / "out").exists()


def test_overflowing_activations_are_refused_naming_the_layer(tmp_path):
    """A model whose own activations hold Inf on the calibration text stops with the layer and projections
    named, not with a Cholesky failure."""
    model = tmp_path / "inf"
    shutil.copytree(write_tiny_model(tmp_path / "float", "llama", layers=2), model)
    tensors = load_file(str(model / "model.safetensors"))
    tensors["model.layers.1.input_layernorm.weight"][5] = float("inf")
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"layer 1: the inputs of self_attn.q_proj\+self_attn.k_proj\+self_attn"
                                          r".v_proj hold NaN/Inf"):
        quantize_inline(model, tmp_path / "out")


# ---- the seven families of earlier releases -----------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "mixtral"])
def test_earlier_families_give_the_tensors_they_gave_before(family, tmp_path):
    """tests/data/families_before holds the layers the hand-written family tables wrote (commit 899e15a) for
    these tiny models, in act-order (desc_act). On the machine that made them, six families come out bit for bit;
    on another CPU the float rounding of its BLAS may swap columns whose Hessian diagonals nearly tie, which
    reorders act-order's solve, and on these tiny models (1536 calibration tokens) GPTQ then lands on another
    solution. So: the same tensor names and float tensors, and every projection at the same distance from its
    float weight as before (± 25 %)."""
    model = (write_tiny_moe(tmp_path / family, family) if family in ("qwen3_moe", "qwen2_moe", "mixtral")
             else write_tiny_model(tmp_path / family, family, layers=2))
    quantize_inline(model, tmp_path / "out")
    after = {k: v for k, v in checkpoint_tensors(tmp_path / "out").items() if k.startswith("model.layers.")}
    before = load_file(str(BEFORE / f"{family}.safetensors"))
    assert sorted(after) == sorted(before)
    qcfg = QuantConfig(bits=4, group_size=32, desc_act=True)
    float_weights = {k: v for k, v in load_file(str(model / "model.safetensors")).items()}
    for name in (k.removesuffix(".qweight") for k in before if k.endswith(".qweight")):
        old, new = (quantized_linear(t, name, qcfg, torch.float32, torch.device("cpu")).dequantized_weight(
            torch.float32) for t in (before, after))
        weight = float_weights[f"{name}.weight"].float()
        error = (old - weight).norm()
        assert 0.8 * error < (new - weight).norm() < 1.25 * error, name  # a solution of the same quality
    for name, old in before.items():
        if old.is_floating_point() and name.rpartition(".")[2] not in ("scales",):
            assert torch.allclose(after[name].float(), old.float(), rtol=2e-3, atol=1e-6), name


@pytest.mark.interop
@pytest.mark.parametrize("family", ["deepseek_v3"])
def test_gptqmodel_loads_our_checkpoints(quantized, family):
    """GPTQModel 7.6.0 (its own DeepSeek-V3 definition; in a child process, see tests/gptqmodel_child.py) loads
    our checkpoint and agrees with the dequantized reference. (GLM-4.5: GPTQModel 7.6.0's own unfused GLM4-MoE
    block fails on transformers 5.19's router, which returns a tuple; see docs/families.md.)"""
    pytest.importorskip("gptqmodel")
    from tests.gptqmodel_child import gptqmodel_logits

    float_dir, out = quantized(family)
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        reference = dequantized_reference(float_dir, out)(ids, use_cache=False).logits
    theirs = gptqmodel_logits(out, ids)
    assert float((theirs - reference).norm() / reference.norm()) < 0.03  # their CPU kernel computes in bfloat16
