"""Stage planning from sizes only: balance, fit, refusal with the needed GPU count."""

import pytest

from cluster.plan import GB, ModelSizes, layer_groups, model_sizes, plan_stages
from quantizer.errors import ConfigError
from quantizer.model_io import CheckpointReader


def test_sequential_stages_hold_one_layer_pipelined_stages_hold_all():
    one = ModelSizes(layer_bytes=[10] * 12, first_extra=20, last_extra=7, workspace=5, base=1)
    plans = plan_stages(one, 3, budget_bytes=1000)
    assert [(p.layers.start, p.layers.stop) for p in plans] == [(0, 4), (4, 8), (8, 12)]
    assert [p.total_bytes for p in plans] == [1 + 10 + 5 + 20, 1 + 10 + 5, 1 + 10 + 5]  # head only when writing
    fp32 = ModelSizes(layer_bytes=[10] * 12, first_extra=20, last_extra=0, workspace=5, compute_scale=2.0)
    assert [p.total_bytes for p in plan_stages(fp32, 3, budget_bytes=1000)] == [45, 25, 25]
    cached = ModelSizes(layer_bytes=[10] * 12, first_extra=20, last_extra=0, workspace=5, all_layers_resident=True)
    assert [p.total_bytes for p in plan_stages(cached, 3, budget_bytes=1000)] == [75, 55, 55]
    tight = plan_stages(cached, 3, budget_bytes=70)  # equal work would need 75 on stage 0: memory-balanced
    assert len(tight[0].layers) < len(tight[2].layers) and max(p.total_bytes for p in tight) <= 70


def test_the_last_stage_peaks_when_the_head_is_bigger_than_the_workspace():
    sizes = ModelSizes(layer_bytes=[10] * 4, first_extra=0, last_extra=100, workspace=5)
    assert [p.total_bytes for p in plan_stages(sizes, 2, budget_bytes=1000)] == [15, 100]


def test_auto_picks_fewest_stages_that_fit():
    sizes = ModelSizes(layer_bytes=[10] * 8, first_extra=0, last_extra=0, workspace=0, all_layers_resident=True)
    assert len(plan_stages(sizes, "auto", budget_bytes=50)) == 2
    assert len(plan_stages(sizes, "auto", budget_bytes=90)) == 1


def test_refuses_a_plan_that_cannot_fit_and_says_what_fits():
    sizes = ModelSizes(layer_bytes=[GB] * 8, first_extra=0, last_extra=0, workspace=0, all_layers_resident=True)
    with pytest.raises(ConfigError, match="use at least 4 stages"):
        plan_stages(sizes, 2, budget_bytes=3 * GB)
    with pytest.raises(ConfigError, match="even one layer per stage"):
        plan_stages(sizes, "auto", budget_bytes=GB)


def test_qwen2_72b_sizes_from_a_header_only_checkpoint(tmp_path):
    from tests.synthetic_checkpoint import QWEN2_72B, write_header_only_checkpoint

    reader = CheckpointReader(write_header_only_checkpoint(tmp_path / "qwen2-72b", QWEN2_72B))
    sizes = model_sizes(reader, tokens_per_batch=4 * 2048, inflight=4, intermediate=29696)
    assert sum(sizes.layer_bytes) / GB == pytest.approx(130.8, abs=0.1)  # 877.7M params × 2 B per layer
    # the first stage writes what lies outside the layers but the head (embeddings, final norm); the last the head
    assert sizes.first_extra - 8192 * 2 == sizes.last_extra == 152064 * 8192 * 2
    assert layer_groups(reader, 0, 29696) == [([(8192 + 2 * 1024, 8192)], 1), ([(8192, 8192)], 1),
                                              ([(2 * 29696, 8192)], 1), ([(8192, 29696)], 1)]
    # the down_proj solve dominates: 2.5 H-sized fp32 matrices (29696²) beside two copies of its weight
    assert sizes.workspace >= int(2.5 * 29696**2 * 4) + 2 * 8192 * 29696 * 4
    plans = plan_stages(sizes, 8, budget_bytes=80 * GB)  # sequential on 80 GB GPUs: one bf16 layer + workspace
    assert [len(p.layers) for p in plans] == [10] * 8
    assert max(p.total_bytes for p in plans) < 25 * GB
    assert len(plan_stages(sizes, "auto", budget_bytes=80 * GB)) == 1  # layers stream: one GPU holds the job
    pipelined = model_sizes(reader, 4 * 2048, 4, 29696, pipelined=True)
    with pytest.raises(ConfigError, match="needs 149.98 GB .*use at least 3 stages"):
        plan_stages(pipelined, 1, budget_bytes=80 * GB)  # pipelined stages keep their float layers


def test_model_sizes_from_headers(tiny_llama):
    reader = CheckpointReader(tiny_llama)
    sizes = model_sizes(reader, tokens_per_batch=1024, inflight=2, intermediate=256)
    assert sizes.layer_bytes == [reader.layer_bytes(0)] * 4
    assert sizes.layer_bytes[0] == (128 * 128 * 2 + 64 * 128 * 2 + 3 * 128 * 256 + 2 * 128) * 2
    assert sizes.first_extra == reader.config.vocab_size * 128 * 2 + 128 * 2  # embeddings + final norm, fp16
    assert sizes.last_extra == reader.config.vocab_size * 128 * 2  # untied lm_head


def test_qwen3_235b_a22b_plans_on_8_gpus(tmp_path, capsys):
    """An MoE layer holds all its experts, the Hessians of the groups it captures together (one per expert
    for down_proj; one shared gate/up Hessian when every expert sees every token, one per expert when
    routed) and the routed-token buffers."""
    from rayquant.cli import main
    from tests.synthetic_checkpoint import QWEN3_235B_A22B, write_header_only_checkpoint

    model = write_header_only_checkpoint(tmp_path / "qwen3-235b", QWEN3_235B_A22B)
    reader = CheckpointReader(model)
    layer = reader.layer_bytes(0)
    assert layer == 2 * (128 * 3 * 1536 * 4096 + 128 * 4096 + 4096 * (8192 + 2 * 512) + 8192 * 4096 + 2 * 4096
                         + 2 * 128)  # experts + router + q/k/v + o + norms + q/k norms, bf16
    all_experts = model_sizes(reader, 4 * 2048, 4, 12288)
    routed = model_sizes(reader, 4 * 2048, 4, 12288, all_experts=False)
    assert all_experts.workspace >= 128 * 1536**2 * 4  # the 128 down_proj Hessians, captured in one pass
    assert routed.workspace >= 127 * 4096**2 * 4 > all_experts.workspace  # one gate/up Hessian per expert
    plans = plan_stages(all_experts, 8, budget_bytes=80 * GB)
    assert sum(len(p.layers) for p in plans) == 94 and max(p.total_bytes for p in plans) < 80 * GB
    assert main(["plan", "--model", str(model), "--stages", "8", "--memory-per-stage-gb", "80",
                 "--gpus-per-stage", "1"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("plan: 8 stage(s)") and "stage 7: layers 82-93" in printed


@pytest.mark.parametrize("name,heads,experts,vocab", [("deepseek_v3", 128, 256, 129280), ("kimi_k2", 64, 384, 163840)])
def test_671b_and_1t_fp8_releases_plan_within_an_h100(tmp_path, capsys, name, heads, experts, vocab):
    """DeepSeek-V3 and Kimi-K2 in their FP8 release layout (header only, real shapes, the MTP layer past
    layer 60): 8 data-parallel workers of 76 GB each hold one chunk of experts at a time, within the GPU and
    within 64 GB of host RAM."""
    from rayquant.cli import main
    from tests.synthetic_checkpoint import DEEPSEEK_V3, KIMI_K2, write_family_checkpoint

    model = write_family_checkpoint(tmp_path / name, {"deepseek_v3": DEEPSEEK_V3, "kimi_k2": KIMI_K2}[name])
    reader = CheckpointReader(model)
    sparse = next(i for i in range(reader.num_layers) if reader.arch.is_sparse(i))
    shapes = reader.linear_shapes(sparse)
    assert reader.fp8 is not None and reader.fp8.block == (128, 128) and reader.num_layers == 61
    assert reader.arch.num_experts(sparse) == experts and reader.config.vocab_size == vocab
    assert shapes["mlp.experts.0.gate_proj"] == (2048, 7168) and shapes["mlp.shared_experts.down_proj"] == (7168, 2048)
    assert shapes["self_attn.q_b_proj"] == (heads * 192, 1536) and shapes["self_attn.kv_a_proj_with_mqa"] == (576, 7168)
    assert all(n.startswith("model.layers.61.") for n in reader.skipped_tensors())
    one_layer = reader.layer_bytes(sparse)  # as loaded: bf16, larger than any worker should hold in fp32
    assert one_layer > experts * 3 * 2048 * 7168 * 2
    assert main(["plan", "--model", str(model), "--schedule", "data_parallel", "--workers", "8", "--gpus-per-stage",
                 "1", "--memory-per-stage-gb", "76", "--num-samples", "128", "--max-len", "2048"]) == 0
    printed = capsys.readouterr().out
    total = float(printed.split(" = ")[1].split(" GB")[0])
    chunk = int(printed.split("experts: ")[1].split(" of ")[0])
    host = float(printed.split("host RAM per worker: about ")[1].split(" GB")[0])
    assert total <= 76 and host <= 64 and 1 <= chunk < experts, printed
    assert "61 layers: about" in printed


def test_phase_model_runs_pass_after_pass_and_splits_rows_only_where_it_pays(tmp_path):
    """The data-parallel phase model walks the passes as the schedule does: on CPU workers a dense layer's
    one-unit passes are solved in row shares (each worker: 2·rows·in²/W + in³), so two workers take less solve
    time than one; on GPUs the same units stay whole (their Hessians would cost more to move than the solve
    saves), the solve time of a pass is then its unit's whole cost, and only the owner receives partials."""
    from cluster.plan import GPU_FLOPS, LINK_BYTES_PER_S, estimate_phases, worker_flops
    from tests.synthetic_checkpoint import QWEN2_72B, write_header_only_checkpoint

    reader = CheckpointReader(write_header_only_checkpoint(tmp_path / "qwen2-72b", QWEN2_72B))
    hidden, mlp = QWEN2_72B["hidden_size"], QWEN2_72B["intermediate_size"]
    rows = [hidden + 2 * 1024, hidden, 2 * mlp, hidden]  # q/k/v (8 kv heads of 128), o, gate/up, down
    inputs = [hidden, hidden, hidden, mlp]

    def estimate(workers: int, flops: float):
        return estimate_phases(reader, 0, mlp, 128 * 2048, workers, 4, flops, LINK_BYTES_PER_S)

    gpu1, gpu8 = estimate(1, GPU_FLOPS), estimate(8, GPU_FLOPS)
    whole = sum(2 * r * i * i + i**3 for r, i in zip(rows, inputs)) / GPU_FLOPS
    assert gpu1.solve_s == pytest.approx(whole) and gpu8.solve_s == pytest.approx(whole)
    assert gpu8.hessian_bytes == sum(i * i * 4 * 7 for i in inputs) and gpu1.hessian_bytes == 0
    cpu = worker_flops(0, 1)
    cpu1, cpu2 = estimate(1, cpu), estimate(2, cpu)
    assert cpu2.solve_s == pytest.approx(sum(2 * r * i * i / 2 + i**3 for r, i in zip(rows, inputs)) / cpu)
    assert cpu2.solve_s < cpu1.solve_s
    assert cpu2.hessian_bytes == sum(i * i * 4 * 2 for i in inputs)  # each of the 2 workers sends to the other
