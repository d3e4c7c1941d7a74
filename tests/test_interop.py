"""Our checkpoints load in transformers' own GPTQ integration (optimum + GPTQModel on CPU) and give
the logits of our QuantLinear model."""

import importlib.util
import shutil

import pytest
import torch

# found without importing them (GPTQModel's import is heavy): only the worker that runs these tests pays it
if importlib.util.find_spec("gptqmodel") is None or importlib.util.find_spec("optimum") is None:
    pytest.skip("the interop extra (gptqmodel, optimum) is not installed", allow_module_level=True)

from transformers import AutoModelForCausalLM  # noqa: E402

from quantizer.loading import load_model  # noqa: E402
from tests.inline_job import quantize_inline  # noqa: E402

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module", params=[{"quant.sym": True, "quant.desc_act": False},
                                        {"quant.sym": False, "quant.desc_act": True, "quant.bits": 8}],
                ids=["4bit-sym", "8bit-asym-act-order"])
def quantized(request, tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("interop") / "model"
    quantize_inline(tiny_llama, out, **request.param)
    yield out
    shutil.rmtree(out)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def test_transformers_gptq_loader_matches_quantlinear(quantized):
    ids = torch.randint(0, 4000, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = _logits(load_model(quantized), ids)
    hf = AutoModelForCausalLM.from_pretrained(quantized, device_map="cpu", dtype=torch.float32)
    assert "gptqmodel" in type(hf.model.layers[0].self_attn.q_proj).__module__
    # Training mode takes GPTQModel's own unpack + dequantize path (v1 zeros → v2, g_idx), in fp16.
    hf.train()
    exact = _logits(hf, ids)
    assert float((exact - ours).norm() / ours.norm()) < 2e-3
    # Inference mode takes its CPU int4/int8 kernel, which computes in bfloat16.
    hf.eval()
    fast = _logits(hf, ids)
    assert float((fast - ours).norm() / ours.norm()) < 3e-2
    assert (fast.argmax(-1) == ours.argmax(-1)).float().mean() > 0.9
