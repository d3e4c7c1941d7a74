"""A job started as the CLI starts it, with no Ray running: Ray starts beside the driver's checks, is sized
again when the plan needs more CPUs than it has, and stops with a refused job."""

import os

import pytest
import ray

from cluster import launch
from cluster.job import load_job
from quantizer.errors import ConfigError
from rayquant.cli import main


def test_a_refused_job_stops_the_ray_started_beside_its_checks(tmp_path, monkeypatch):
    started = []
    connect = launch.connect_ray

    def connect_and_note(*args, **kwargs) -> bool:
        started.append(connect(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(launch, "connect_ray", connect_and_note)
    job = load_job(None, {"model": str(tmp_path / "nope"), "output_dir": str(tmp_path / "out")})
    with pytest.raises(ConfigError, match="does not exist"):
        launch.run_job(job)
    assert started == [True]  # Ray did start meanwhile ...
    assert not ray.is_initialized()  # ... and is stopped with the refusal
    assert not (tmp_path / "out").exists()


class _PlannedDriver:
    """What run_job reads of a driver whose plan came out with `stages` stages; its run reports Ray's CPUs."""

    def __init__(self, job, stages: int) -> None:
        self.job, self.actor_count = job, stages

    def run(self) -> dict:
        return {"cpus": ray.cluster_resources()["CPU"]}


def test_a_plan_with_more_stages_than_cores_gets_a_ray_with_their_cpus(monkeypatch):
    stages = (os.cpu_count() or 1) + 2  # stages: auto — the early Ray has this machine's cores, the plan needs more
    monkeypatch.setattr(launch, "_build_driver", lambda job, restart: _PlannedDriver(job, stages))
    assert launch.run_job(load_job(None, {"resources.cpus_per_stage": 1}))["cpus"] >= stages
    assert not ray.is_initialized()


def test_unreachable_ray_address(tmp_path, tiny_llama, caplog):
    out = tmp_path / "out"
    assert main(["quantize", "--out", str(out), "--num-samples", "4", "--max-len", "32", "--model", str(tiny_llama),
                 "--group-size", "32", "--address", "127.0.0.1:9"]) == 2
    assert "Ray address 127.0.0.1:9 does not answer" in caplog.text
    assert not out.exists() and not ray.is_initialized()


def test_the_local_ray_stops_its_processes_side_by_side_and_leaves_none(monkeypatch):
    """Ray's own shutdown stops its processes one after another, each given up to 1 s after SIGTERM (the
    autoscaler's monitor never exits on it: ≥ 1.3 s per local Ray); rayquant's stops them side by side. Ray's
    one-at-a-time path is not taken, and every process the local Ray started is gone afterwards."""
    from ray._private.node import Node

    pids: list[int] = []

    class Driver(_PlannedDriver):
        def run(self) -> dict:
            node = ray._private.worker._global_node
            pids.extend(info.process.pid for infos in node.all_processes.values() for info in infos)
            return {}

    def one_at_a_time(*args, **kwargs):
        raise AssertionError("Ray's one-process-at-a-time stop was used")

    monkeypatch.setattr(launch, "_build_driver", lambda job, restart: Driver(job, 1))
    monkeypatch.setattr(Node, "_kill_process_type", one_at_a_time)
    launch.run_job(load_job(None, {}))
    assert len(pids) >= 3 and not ray.is_initialized()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
