"""Multi-node faults on Ray's own multi-node simulator (`ray.cluster_utils.Cluster`: a head and worker
nodes on this machine, each with its own raylet and object store). Stages land on different nodes; a
node is killed mid-job and the job still writes the checkpoint of an uninterrupted run, bit for bit."""

import threading
import time
from pathlib import Path

import pytest

from cluster.driver import Driver
from cluster.job import load_job
from tests.test_pipeline import SMALL, assert_same_tensors, layers_dir
from tests.tiny_models import write_tiny_model

pytestmark = pytest.mark.multinode

# Each layer takes about a second, so a node can be killed between two layers of one stage.
WORK = {**SMALL, "calibration.num_samples": 32, "calibration.max_len": 128, "stages": 3,
        "resources.cpus_per_stage": 1, "resources.max_restarts": 3}


@pytest.fixture(scope="module")
def cluster():
    """A head that runs only the driver (0 CPUs) and three 1-CPU worker nodes: one stage per node."""
    import ray
    from ray.cluster_utils import Cluster

    # a killed node is declared dead after 4 failed health checks 0.5 s apart (Ray's defaults: 5 × 3 s)
    fast_death = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}
    sim = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 80 * 2**20,
                                                        "_system_config": fast_death})
    for _ in range(3):
        sim.add_node(num_cpus=1, object_store_memory=80 * 2**20)
    sim.wait_for_nodes()
    ray.init(address=sim.address, logging_level="WARNING")
    yield sim
    ray.shutdown()
    sim.shutdown()


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("models") / "six-layers", "llama", layers=6, hidden=256,
                            intermediate=768)


def run(model: Path, out: Path, **overrides) -> tuple[Driver, dict]:
    driver = Driver(load_job(None, {**WORK, "model": str(model), "output_dir": str(out), **overrides}))
    return driver, driver.run()


def node_of(cluster, node_id: str):
    return next(n for n in cluster.worker_nodes if n.node_id == node_id)


def run_losing_nodes(cluster, six_layers: Path, out: Path, layer: int, stages: list[int], **overrides
                     ) -> tuple[dict, dict]:
    """Run a job on a background thread; once `layer` is checkpointed, kill the nodes running `stages`
    and add as many fresh 1-CPU nodes (Ray adds nodes from the main thread only). Returns the job's
    report and {"killed": node ids, "added": node ids}."""
    import ray

    driver = Driver(load_job(None, {**WORK, "model": str(six_layers), "output_dir": str(out), **overrides}))
    layers = layers_dir(out)
    result: dict = {}

    def job():
        try:
            result["report"] = driver.run()
        except BaseException as exc:  # handed to the test below
            result["error"] = exc

    thread = threading.Thread(target=job)
    thread.start()
    record: dict = {}
    deadline = time.time() + 300
    while thread.is_alive() and time.time() < deadline:
        if (layers / f"layer_{layer:05d}.safetensors").is_file():
            actors = driver.dp.workers if driver.dp is not None else driver.actors
            record["killed"] = [ray._private.state.actors(actors[k]._actor_id.hex())["Address"]["NodeID"]
                                for k in stages]
            for node_id in record["killed"]:
                cluster.remove_node(node_of(cluster, node_id), allow_graceful=False)
            record["added"] = [cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20).node_id
                               for _ in stages]
            break
        time.sleep(0.01)
    thread.join()
    if "error" in result:
        raise result["error"]
    assert record.get("killed"), "the job finished before the node could be killed"
    return result["report"], record


@pytest.fixture(scope="module")
def reference(cluster, six_layers, tmp_path_factory):
    out = tmp_path_factory.mktemp("multinode") / "reference"
    _, report = run(six_layers, out)
    return out, report


def test_three_stages_run_on_three_nodes(reference):
    _, report = reference
    assert [s["layers"] for s in report["stages"]] == [[0, 2], [2, 4], [4, 6]]
    assert len({s["node_id"] for s in report["stages"]}) == 3
    assert report["recoveries"] == []


def test_killing_a_stage_node_after_its_first_layer_gives_the_same_checkpoint(cluster, six_layers, reference,
                                                                             tmp_path):
    """Stage 1's node dies after its first layer (layer 2): with it go the stage's actor and the
    activations in that node's object store. Ray restarts the actor on the added node; the stage replays
    layer 2 from its checkpoint to rebuild those activations and solves layer 3."""
    out = tmp_path / "killed-node"
    report, record = run_losing_nodes(cluster, six_layers, out, layer=2, stages=[1])
    assert_same_tensors(reference[0], out)
    assert [r["stage"] for r in report["recoveries"]] == [1]
    assert report["stages"][1]["node_id"] == record["added"][0] != record["killed"][0]
    reports = {r["layer"]: r for r in report["stages"][1]["layer_reports"]}
    assert sorted(reports) == [2, 3] and not reports[3]["resumed"]
    # layer 2's report is its solve's: received before the node died, or replayed from the checkpoint written
    # with it (the kill can land in layer 2's output forward, which runs after the checkpoint is written)
    solved = {r["layer"]: r["losses"] for r in reference[1]["stages"][1]["layer_reports"]}
    assert reports[2]["losses"] == solved[2]


def test_losing_producer_and_consumer_nodes_rebuilds_the_lost_inputs(cluster, six_layers, reference, tmp_path):
    """Stages 0 and 1 die together after layer 2 (stage 1's first): stage 1's inputs lived only in those
    two nodes' object stores. The driver has stage 0 replay its layers from disk to make them again."""
    out = tmp_path / "two-nodes"
    report, _ = run_losing_nodes(cluster, six_layers, out, layer=2, stages=[0, 1])
    assert_same_tensors(reference[0], out)
    assert any(r["stage"] == 1 and r["inputs_rebuilt"] for r in report["recoveries"]), report["recoveries"]


def test_pipelined_job_survives_a_worker_node_loss(cluster, six_layers, tmp_path):
    """The driver's node keeps the job while a worker node dies under the pipelined schedule."""
    _, clean = run(six_layers, tmp_path / "pipelined-clean", schedule="pipelined")
    out = tmp_path / "pipelined-killed"
    report, _ = run_losing_nodes(cluster, six_layers, out, layer=0, stages=[0], schedule="pipelined")
    assert_same_tensors(tmp_path / "pipelined-clean", out)
    assert 0 in {r["stage"] for r in report["recoveries"]}
    assert clean["recoveries"] == []


DATA_PARALLEL = {"schedule": "data_parallel", "resources.workers": 2}


@pytest.fixture(scope="module")
def data_parallel_clean(cluster, six_layers, tmp_path_factory):
    out = tmp_path_factory.mktemp("multinode") / "dp-clean"
    _, report = run(six_layers, out, **DATA_PARALLEL)
    return out, report


@pytest.mark.parametrize("transport", ["object_store", "collective"])
def test_data_parallel_job_survives_losing_a_worker_node(cluster, six_layers, data_parallel_clean, tmp_path,
                                                         transport):
    """Worker 1's node dies after layer 2: its sequences' activations go with it. Ray restarts the worker on
    another node, which replays layers 0-2 on its sequences; layer 3 is redone by both workers and the
    checkpoint equals a clean run with the same two workers, bit for bit. Under the collective transport the
    group dies with worker 1: worker 0 is restarted too, the group formed anew, and both replay."""
    clean_out, clean = data_parallel_clean
    assert len({w["node_id"] for w in clean["stages"][0]["workers"]}) == 2 and clean["recoveries"] == []
    out = tmp_path / f"dp-killed-{transport}"
    report, record = run_losing_nodes(cluster, six_layers, out, layer=2, stages=[1], **DATA_PARALLEL,
                                      **{"resources.transport": transport})
    assert_same_tensors(clean_out, out)
    assert [r["stage"] for r in report["recoveries"]] == [1]
    assert report["data_parallel"]["transport"] == transport
    assert report["stages"][0]["workers"][1]["node_id"] != record["killed"][0]
    assert [r["layer"] for r in report["stages"][0]["layer_reports"]] == list(range(6))
