"""The data-parallel schedule: W workers each hold the current layer and 1/W of the calibration sequences;
partial Hessians are summed in worker order by each unit's owner, results go to every worker. One worker
is the sequential schedule bit for bit; two workers agree with one within float rounding and with
themselves bit for bit, through Ray's object store or a torch.distributed group alike; MoE auto calibration
decides on the whole calibration's counts; the report has per-phase times and the bytes moved; impossible
worker counts are refused before any layer starts."""

import json
import os
import time
from types import SimpleNamespace

import pytest
import ray

from cluster import data_parallel
from cluster.data_parallel import DataParallelRun, assign_units
from cluster.plan import GPU_FLOPS, LINK_BYTES_PER_S, row_split_pays, worker_flops
from quantizer.errors import ConfigError
from quantizer.model_io import CheckpointReader
from tests.test_pipeline import assert_same_tensors, run_job
from tests.tiny_models import write_tiny_moe

DP = {"schedule": "data_parallel"}


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("dp")
    reports = {}
    for name, workers in (("w1", 1), ("w2", 2), ("w2-again", 2)):
        reports[name] = run_job(tiny_llama, root / name, **DP, **{"resources.workers": workers})
    reports["w2-collective"] = run_job(tiny_llama, root / "w2-collective", **DP, **{
        "resources.workers": 2, "resources.transport": "collective"})
    with pytest.MonkeyPatch.context() as patch:  # the driver assigns units in this process: rank 0 solves all
        patch.setattr("cluster.data_parallel.assign_units",
                      lambda reader, index, groups, *_: {u: (0,) for group in groups for u in group})
        reports["w2-whole"] = run_job(tiny_llama, root / "w2-whole", **DP, **{"resources.workers": 2})
    return root, reports


def test_one_worker_is_the_sequential_schedule_bit_for_bit(runs, tiny_llama_gptq):
    root, _ = runs
    assert_same_tensors(tiny_llama_gptq, root / "w1")  # the one-stage job


def test_two_workers_rerun_bit_identical_and_match_one_worker(runs):
    """Two workers sum the same Hessians in another order and batch the sequences differently: the solves
    reach the same objective (the output error GPTQ minimizes) though individual codes may flip, which a
    4-layer random model amplifies — so the objective is what is compared."""
    root, reports = runs
    assert_same_tensors(root / "w2", root / "w2-again")  # partials summed in a fixed order

    def losses(report):
        return {(r["layer"], k): v for s in report["stages"] for r in s["layer_reports"]
                for k, v in r["losses"].items()}

    one, two = losses(reports["w1"]), losses(reports["w2"])
    assert one.keys() == two.keys()
    for key in (k for k in one if k[0] == 0):  # layer 0 sees the same inputs on both runs
        assert two[key] == pytest.approx(one[key], rel=0.02), key
    assert sum(two.values()) == pytest.approx(sum(one.values()), rel=0.05)
    assert reports["w2"]["calibration_tokens"] == reports["w1"]["calibration_tokens"]


def test_report_has_per_phase_times_and_bytes_moved(runs):
    _, reports = runs
    dp = reports["w2"]["data_parallel"]
    assert dp["workers"] == 2 and sum(dp["sequences_per_worker"]) == 24
    assert len(dp["per_layer"]) == 4
    for layer in dp["per_layer"]:
        assert all(layer[k] > 0 for k in ("forward_s", "hessian_s", "solve_s", "broadcast_s"))
    # each layer: 4 units' Hessians (q/k/v, o, gate/up: 128 inputs; down: 256); o and down (128 rows) go from
    # worker 1 to their owner, q/k/v and gate/up (256 and 512 rows, solved in row shares) both ways
    assert dp["bytes_per_layer"]["hessians"] == (2 * 128 * 128 + 128 * 128 + 2 * 128 * 128 + 256 * 256) * 4
    assert dp["bytes_per_layer"]["results"] > 0
    assert len({w["pid"] for w in reports["w2"]["stages"][0]["workers"]}) == 2


def test_units_solved_in_row_shares_are_the_bits_of_one_worker_solving_them(runs):
    """A dense layer's passes hold one unit each: every worker solves a share of its rows (q/k/v: 256 rows,
    gate/up: 512), against the Hessian each summed in worker order — the tensors of one worker solving every
    unit whole, bit for bit."""
    root, reports = runs
    assert_same_tensors(root / "w2", root / "w2-whole")
    assert reports["w2"]["data_parallel"]["bytes_per_layer"]["hessians"] > \
        reports["w2-whole"]["data_parallel"]["bytes_per_layer"]["hessians"]  # the shared units' partials go both ways


def test_report_has_every_workers_busy_and_idle_time(runs):
    """Per layer each worker's busy spans (phase, start, end from the layer's start) and busy/idle seconds;
    over the run each worker's seconds per phase and its busy fraction."""
    _, reports = runs
    dp = reports["w2"]["data_parallel"]
    for layer in dp["per_layer"]:
        timeline = layer["timeline"]
        assert len(timeline["workers"]) == 2
        for worker in timeline["workers"]:
            phases = [span[0] for span in worker["spans"]]
            assert phases[0] == "load" and phases[-1] == "forward" and "solve" in phases and "capture" in phases
            assert all(0 <= t0 <= t1 <= timeline["wall_s"] + 0.5 for _, t0, t1 in worker["spans"])
            busy = sum(worker["busy_s"].values())
            assert busy > 0 and worker["idle_s"] == pytest.approx(max(0.0, timeline["wall_s"] - busy), abs=1e-3)
        # rank 0 checkpoints the layer in the background during the next one: each layer ends with its forward
        assert all(worker["spans"][-1][0] == "forward" for worker in timeline["workers"])
    totals = dp["worker_time"]
    assert [t["rank"] for t in totals] == [0, 1]
    assert all(0 < t["busy_fraction"] <= 1.01 and t["busy_s"]["solve"] > 0 for t in totals)


def test_collective_transport_gives_the_object_store_bits(runs):
    """torch.distributed (gloo here, NCCL on GPUs): partials sent point to point and summed by their owner
    in worker order, results broadcast owner by owner — the same additions as through the object store."""
    root, reports = runs
    assert_same_tensors(root / "w2", root / "w2-collective")
    store, group = reports["w2"]["data_parallel"], reports["w2-collective"]["data_parallel"]
    assert (store["transport"], group["transport"]) == ("object_store", "collective")
    assert group["transport_detail"].startswith("torch.distributed gloo")
    assert group["bytes_per_layer"]["hessians"] == store["bytes_per_layer"]["hessians"]
    assert group["bytes_per_layer"]["results"] > 0
    for layer in group["per_layer"]:
        assert all(layer[k] > 0 for k in ("forward_s", "hessian_s", "reduce_s", "solve_s", "broadcast_s"))


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory, ray_local):
    """A tiny Qwen3-MoE (8 experts top-2, gate/up 128 inputs, down 64) on ~576 calibration tokens: about 144
    routed to each expert in all, so about 72 on each of two workers — the regime where an auto decision
    made on one worker's share would differ from the whole calibration's."""
    root = tmp_path_factory.mktemp("dp-moe")
    model = write_tiny_moe(root / "qwen3-moe", "qwen3_moe")
    common = {"calibration.max_len": 24, "quant.moe_calibration": "auto"}
    reports = {"sequential": run_job(model, root / "sequential", stages=1, **common)}
    for name, extra in (("w1", {"resources.workers": 1}), ("w2", {"resources.workers": 2}),
                        ("w2-collective", {"resources.workers": 2, "resources.transport": "collective"})):
        reports[name] = run_job(model, root / name, **DP, **common, **extra)
    return root, reports


def test_moe_auto_calibration_decides_on_the_whole_calibration(moe_runs):
    root, reports = moe_runs
    assert_same_tensors(root / "sequential", root / "w1")
    assert_same_tensors(root / "w2", root / "w2-collective")

    every = reports["w2"]["calibration_tokens"]
    for layer in (r for s in reports["w2"]["stages"] for r in s["layer_reports"]):
        routed, held = layer["expert_tokens"], layer["hessian_tokens"]
        assert sum(routed) == 2 * every  # top-2, counted over both workers' sequences
        assert any(128 <= n < 256 for n in routed), routed  # experts whose half share falls below 128 inputs
        for e, n in enumerate(routed):  # routed tokens when the whole calibration gives a full-rank Hessian
            assert held[f"mlp.experts.{e}.gate_proj"] == (n if n >= 128 else every), (e, n)
            assert held[f"mlp.experts.{e}.down_proj"] == (n if n >= 64 else every), (e, n)


def test_units_are_owned_by_solve_cost(tiny_llama):
    reader = CheckpointReader(tiny_llama)
    groups = list(reader.arch.layer_units(0))
    cpu = (worker_flops(0, 1), LINK_BYTES_PER_S)
    owners = assign_units(reader, 0, groups, 2, *cpu)  # solve costs rows·in²: 8.4M, 8.4M, 4.2M, 2.1M
    assert owners == {("mlp.gate_proj", "mlp.up_proj"): (0,), ("mlp.down_proj",): (1,),
                      ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"): (0,), ("self_attn.o_proj",): (1,)}
    assert owners == assign_units(reader, 0, groups, 2, *cpu)
    # a pass of one unit (true-sequential): on CPUs every worker solves a share of its rows, when it has two
    # shares; on GPUs the Hessians every worker would then send to every other cost more than the solve saves
    gate_up, o_proj = ("mlp.gate_proj", "mlp.up_proj"), ("self_attn.o_proj",)
    assert assign_units(reader, 0, [(gate_up,)], 2, *cpu) == {gate_up: (0, 1)}
    assert assign_units(reader, 0, [(o_proj,)], 2, *cpu) == {o_proj: (0,)}  # 128 rows: one share
    assert assign_units(reader, 0, [(gate_up,)], 1, *cpu) == {gate_up: (0,)}
    assert assign_units(reader, 0, [(gate_up,)], 8, worker_flops(1, 1), LINK_BYTES_PER_S) == {gate_up: (0,)}
    assert not row_split_pays(29568, 8192, 8, GPU_FLOPS, LINK_BYTES_PER_S)  # Qwen2-72B's down_proj on GPUs
    assert row_split_pays(3072, 576, 2, worker_flops(0, 1), LINK_BYTES_PER_S)  # SmolLM2's gate/up on CPUs


def test_more_workers_than_sequences_or_cluster_resources_are_refused(tiny_llama, tmp_path, ray_local):
    with pytest.raises(ConfigError, match="30 data-parallel workers need at least 30 calibration sequences"):
        run_job(tiny_llama, tmp_path / "many", **DP, **{"resources.workers": 30})
    with pytest.raises(ConfigError, match=r"needs 6 CPUs \(6 workers × 1\), the cluster has 4"):
        run_job(tiny_llama, tmp_path / "big", **DP, **{"resources.workers": 6})
    assert not (tmp_path / "many").exists() and not (tmp_path / "big").exists()


@ray.remote(num_cpus=0)
class _Worker:
    def pid(self) -> int:
        return os.getpid()

    def busy(self, seconds: float) -> None:
        time.sleep(seconds)


def test_a_busy_worker_is_not_taken_for_a_lost_one(ray_local, monkeypatch):
    """When a worker dies, the others' queues hold calls waiting on its results: they answer late. Ray's
    record says they are still the same process, so only the dead worker is restarted and reported; a worker
    whose record shows another process is lost even when it is busy."""
    monkeypatch.setattr(data_parallel, "ANSWER_TIMEOUT_S", 0.5)
    busy, dead = _Worker.remote(), _Worker.remote()
    pids = ray.get([busy.pid.remote(), dead.pid.remote()])
    for _ in range(2):
        busy.busy.remote(3)
    ray.kill(dead)
    assert DataParallelRun._lost_ranks(SimpleNamespace(workers=[busy, dead], pids=pids)) == [1]
    assert DataParallelRun._lost_ranks(SimpleNamespace(workers=[busy], pids=[pids[0] + 1])) == [0]
    ray.kill(busy)


def test_data_parallel_settings_are_validated():
    from cluster.job import load_job

    assert load_job(None, {"resources.workers": 4}).resolved_schedule == "data_parallel"
    assert load_job(None, {}).resolved_schedule == "sequential"
    with pytest.raises(ConfigError, match="resources.workers=2 is for the data_parallel schedule"):
        load_job(None, {"resources.workers": 2, "schedule": "pipelined"})
    assert json.dumps(load_job(None, {"resources.workers": 2}).settings_hash()) != json.dumps(
        load_job(None, {"resources.workers": 3}).settings_hash())


def test_sequences_are_split_by_padded_tokens_and_one_worker_gets_the_single_run_batches():
    import torch

    from cluster.data_parallel import split_sequences
    from quantizer.calibration import make_batches

    lengths = [5, 300, 17, 256, 128, 64, 250, 9, 90, 200, 31, 77]
    samples = [torch.arange(n) for n in lengths]
    (alone,) = split_sequences(samples, 1, 4, 0)
    assert [b.input_ids.tolist() for b in alone] == [b.input_ids.tolist() for b in make_batches(samples, 4, 0)]
    shares = split_sequences(samples, 2, 4, 0)
    assert sorted(int(n) for share in shares for b in share for n in b.mask.sum(1)) == sorted(lengths)  # each once
    padded = [sum(b.input_ids.numel() for b in share) for share in shares]
    assert padded == [1209, 1216]  # what the workers' forwards cost (dealt by real tokens: 1234 and 1086)
    assert split_sequences(samples, 2, 4, 0)[1][0].input_ids.tolist() == shares[1][0].input_ids.tolist()


def test_partials_and_results_cross_as_arrays_and_arrive_whole_and_writable():
    import pickle

    import torch

    from quantizer.hessian import HessianAccumulator
    from quantizer.result import QuantResult

    acc = HessianAccumulator(8)
    acc.add(torch.randn(20, 8))
    result = QuantResult(torch.randint(0, 16, (4, 8), dtype=torch.uint8), torch.rand(1, 4).half(),
                         torch.full((1, 4), 8, dtype=torch.int32), torch.zeros(8, dtype=torch.int32), 0.25,
                         cholesky_fallback="float64", row_losses=torch.rand(4))
    buffers: list = []  # pickled out of band, as Ray does, and handed back read-only, as its object store does
    pickled = pickle.dumps((acc, result), protocol=5, buffer_callback=buffers.append)
    assert len(buffers) >= 5  # the Hessian and the result's tensors, each outside the pickle
    acc2, result2 = pickle.loads(pickled, buffers=[bytes(buffer.raw()) for buffer in buffers])
    assert acc2.count == acc.count and acc2.xtx.equal(acc.xtx)
    acc2.merge(acc2)  # in place: the received sum is the worker's own to add to
    for name in ("codes", "scales", "zeros", "g_idx", "row_losses"):
        assert getattr(result2, name).equal(getattr(result, name))
    assert (result2.loss, result2.cholesky_fallback) == (0.25, "float64")
