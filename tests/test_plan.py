"""Stage planning from sizes only: balance, fit, refusal with the needed GPU count."""

import pytest

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


def test_qwen2_72b_sizes_from_a_header_only_checkpoint(tmp_path):
    from tests.synthetic_checkpoint import QWEN2_72B, write_header_only_checkpoint

    reader = CheckpointReader(write_header_only_checkpoint(tmp_path / "qwen2-72b", QWEN2_72B))
    sizes = model_sizes(reader, tokens_per_batch=4 * 2048, inflight=4, intermediate=29696)
    assert sum(sizes.layer_bytes) / GB == pytest.approx(130.8, abs=0.1)  # 877.7M params × 2 B per layer
    assert sizes.first_extra == sizes.last_extra - 8192 * 2 == 152064 * 8192 * 2
    plans = plan_stages(sizes, 8, budget_bytes=80 * GB)
    assert [len(p.layers) for p in plans] == [10] * 8
    assert max(p.total_bytes for p in plans) < 40 * GB
    with pytest.raises(ConfigError, match="needs 150.00 GB .* use at least 3 stages"):
        plan_stages(sizes, 1, budget_bytes=80 * GB)


def test_model_sizes_from_headers(tiny_llama):
    reader = CheckpointReader(tiny_llama)
    sizes = model_sizes(reader, tokens_per_batch=1024, inflight=2, intermediate=256)
    per_layer = (4 * 128 * 128 // 2 + 3 * 128 * 256 + 2 * 128 // 2) * 2  # q,o + k,v (half width) + mlp + norms
    assert sizes.layer_bytes == [reader.layer_bytes(0)] * 4
    assert sizes.layer_bytes[0] == (128 * 128 * 2 + 64 * 128 * 2 + 3 * 128 * 256 + 2 * 128) * 2
    assert per_layer > 0 and sizes.first_extra == reader.config.vocab_size * 128 * 2
