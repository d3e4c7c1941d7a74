"""Autoscaling shown on a live server: load raises the replicas from 1 to 2 and they fall back to 1 after
it; a replica killed under load costs only the calls in flight on it (UNAVAILABLE), the rest succeed,
and Serve replaces it."""

import threading
import time
from pathlib import Path

import grpc
import pytest

from bench.common import free_port
from serving.client import GenerationClient
from serving import deployment
from serving.config import ServeConfig
from tests.test_serving import running_server

APP = "autoscaled"


@pytest.fixture(scope="module")
def quantized(tiny_llama_gptq, ray_local):
    return tiny_llama_gptq


def replica_actor_names() -> list[str]:
    """Named actors of the app's live replicas."""
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{APP}#")]


def running_count() -> int:
    from ray import serve

    return serve.status().applications[APP].deployments["GenerationService"].replica_states.get("RUNNING", 0)


def busiest_replica(minimum: int, timeout_s: float = 30) -> str:
    """The live replica with the most calls in flight (Serve's own count: what its router asks each replica),
    once one has at least `minimum`."""
    import ray

    start = time.time()
    while True:
        counts = {name: ray.get(ray.get_actor(name, namespace="serve").get_num_ongoing_requests.remote())
                  for name in replica_actor_names()}
        busiest = max(counts, key=counts.get)
        if counts[busiest] >= minimum:
            return busiest
        assert time.time() - start < timeout_s, f"no replica had {minimum} calls in flight within {timeout_s} s"
        time.sleep(0.05)


def wait_for(condition, timeout_s: float, what: str) -> float:
    """Poll until condition() is true; returns the seconds it took."""
    start = time.time()
    while not condition():
        assert time.time() - start < timeout_s, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.25)
    return time.time() - start


class Load:
    """`clients` threads, each sending streamed greedy calls back to back until stopped. Records every
    call as (started, ended, status code name)."""

    def __init__(self, port: int, clients: int, max_new_tokens: int) -> None:
        self.calls: list[tuple[float, float, str]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(port, max_new_tokens)) for _ in range(clients)]

    def _run(self, port: int, max_new_tokens: int) -> None:
        client = GenerationClient(f"127.0.0.1:{port}")
        try:
            while not self._stop.is_set():
                started = time.time()
                try:
                    list(client.stream("Autoscaling under load", max_new_tokens=max_new_tokens, temperature=0))
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                with self._lock:
                    self.calls.append((started, time.time(), code))
        finally:
            client.close()

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def config(model: Path, autoscaling: dict) -> ServeConfig:
    return ServeConfig(model=str(model), engine="transformers", app_name=APP, max_new_tokens_limit=128,
                       max_batch_size=2, grpc_port=free_port(), http_port=free_port(), autoscaling=autoscaling,
                       ray_actor_options={"num_cpus": 0.5})


def test_load_scales_up_a_killed_replica_costs_only_its_calls_and_the_replicas_fall_back(quantized, monkeypatch):
    """One server through its whole life: load raises it from 1 replica to 2; a replica killed under that load
    costs only the calls in flight on it (UNAVAILABLE), the other keeps answering and Serve replaces it; once
    the load stops it falls back to 1. Every other call succeeds."""
    import ray

    # Serve finds a dead replica at its next health check (every 10 s by default): every second here
    monkeypatch.setattr(deployment, "GenerationService", deployment.GenerationService.options(health_check_period_s=1))
    fast = {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 1, "target_ongoing_requests": 2,
            "upscale_delay_s": 1, "downscale_delay_s": 3, "metrics_interval_s": 0.5, "look_back_period_s": 2}
    cfg = config(quantized, fast)
    clients = 8
    with running_server(cfg):
        assert running_count() == 1
        with Load(cfg.grpc_port, clients=clients, max_new_tokens=64) as load:
            up_s = wait_for(lambda: running_count() == 2, 120, "a second replica under load")
            time.sleep(2)  # both replicas take calls
            victim = busiest_replica(minimum=2)  # killed between two calls, a replica would cost nothing
            killed_at = time.time()
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            wait_for(lambda: running_count() == 2 and len(set(replica_actor_names()) - {victim}) == 2, 120,
                     "Serve to replace the killed replica")
            replaced_at = time.time()
            time.sleep(2)
            replaced = replica_actor_names()
        down_s = wait_for(lambda: running_count() == 1, 120, "scale-down after the load")
    failed = [(s, e, code) for s, e, code in load.calls if code != "OK"]
    assert up_s < 120 and down_s < 120 and replaced_at - killed_at < 120
    assert failed, "no call was in flight on the killed replica"
    assert {code for _, _, code in failed} == {"UNAVAILABLE"}, failed
    assert all(started < killed_at for started, _, _ in failed)  # only calls already in flight at the kill
    assert len(failed) <= clients
    assert all(code == "OK" for _, ended, code in load.calls if ended < killed_at)  # scaling up cost no call
    ok_after = [c for c in load.calls if c[0] > killed_at and c[2] == "OK"]
    assert len(ok_after) >= 6  # the other replica kept answering, then the replacement too
    assert victim not in replaced and len(replaced) == 2
