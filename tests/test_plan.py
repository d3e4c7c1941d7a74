"""Stage planning from sizes only: balance, fit, refusal with the needed GPU count."""

import json

import pytest
from safetensors.torch import save_file

from cluster.plan import GB, ModelSizes, model_sizes, plan_stages
from quantizer.errors import ConfigError
from quantizer.model_io import CheckpointReader


def test_equal_work_when_memory_allows_else_memory_balanced():
    sizes = ModelSizes(layer_bytes=[10] * 12, first_extra=20, last_extra=0, workspace=5)
    plans = plan_stages(sizes, 3, budget_bytes=1000)
    assert [(p.layers.start, p.layers.stop) for p in plans] == [(0, 4), (4, 8), (8, 12)]
    assert [p.total_bytes for p in plans] == [65, 45, 45]
    tight = plan_stages(sizes, 3, budget_bytes=60)  # equal work would need 65 on stage 0
    assert [(p.layers.start, p.layers.stop) for p in tight] == [(0, 3), (3, 7), (7, 12)] or \
        len(tight[0].layers) < len(tight[2].layers)
    assert max(p.total_bytes for p in tight) <= 60


def test_auto_picks_fewest_stages_that_fit():
    sizes = ModelSizes(layer_bytes=[10] * 8, first_extra=0, last_extra=0, workspace=0)
    assert len(plan_stages(sizes, "auto", budget_bytes=40)) == 2
    assert len(plan_stages(sizes, "auto", budget_bytes=80)) == 1


def test_refuses_a_plan_that_cannot_fit_and_says_what_fits():
    sizes = ModelSizes(layer_bytes=[GB] * 8, first_extra=0, last_extra=0, workspace=0)
    with pytest.raises(ConfigError, match="use at least 4 stages"):
        plan_stages(sizes, 2, budget_bytes=2 * GB)
    with pytest.raises(ConfigError, match="even one layer per stage"):
        plan_stages(sizes, "auto", budget_bytes=GB // 2)


def write_synthetic_qwen2_72b(path):
    """config.json + a header-only index for Qwen2-72B: shapes and dtypes, tiny placeholder shards."""
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 8192,
              "intermediate_size": 29568, "num_hidden_layers": 80, "num_attention_heads": 64,
              "num_key_value_heads": 8, "vocab_size": 152064, "max_position_embeddings": 32768,
              "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path, config


def test_model_sizes_from_headers(tiny_llama):
    reader = CheckpointReader(tiny_llama)
    sizes = model_sizes(reader, tokens_per_batch=1024, inflight=2, intermediate=256)
    per_layer = (4 * 128 * 128 // 2 + 3 * 128 * 256 + 2 * 128 // 2) * 2  # q,o + k,v (half width) + mlp + norms
    assert sizes.layer_bytes == [reader.layer_bytes(0)] * 4
    assert sizes.layer_bytes[0] == (128 * 128 * 2 + 64 * 128 * 2 + 3 * 128 * 256 + 2 * 128) * 2
    assert per_layer > 0 and sizes.first_extra == reader.config.vocab_size * 128 * 2
