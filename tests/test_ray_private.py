"""Private Ray APIs are used only through rayquant/ray_private.py (and the Serve proxy hooks), and only on
the Ray version they were tested on: elsewhere they refuse with the version to install."""

import os
import re
from pathlib import Path

import pytest
import ray

from rayquant import ray_private
from rayquant.ray_private import PrivateRayApiError, actor_process, actor_state, metrics_port_option

ROOT = Path(__file__).resolve().parents[1]
PRIVATE_USE = re.compile(r"ray\._private|ray\.serve\._private|\._actor_id|_metrics_export_port")
ALLOWED = {ROOT / "rayquant" / "ray_private.py", ROOT / "serving" / "proxy_hooks.py"}


def test_private_ray_apis_appear_only_behind_the_version_check():
    product = [p for d in ("rayquant", "cluster", "serving", "quantizer", "bench") for p in (ROOT / d).rglob("*.py")]
    users = {p for p in product if PRIVATE_USE.search(p.read_text())}
    assert users <= ALLOWED, f"private Ray API used outside ray_private.py: {sorted(map(str, users - ALLOWED))}"


@ray.remote(num_cpus=0)
class _Probe:
    def ping(self) -> int:
        return 1

    def pid(self) -> int:
        return os.getpid()


def test_actor_state_on_the_tested_ray_and_refused_on_another(ray_local, monkeypatch):
    actor = _Probe.remote()
    ray.get(actor.ping.remote())
    assert actor_state(actor) == "ALIVE"
    assert actor_process(actor) == ("ALIVE", ray.get(actor.pid.remote()))
    assert metrics_port_option(0) == {} and metrics_port_option(8080) == {"_metrics_export_port": 8080}
    monkeypatch.setattr(ray, "__version__", "2.61.0")
    assert "install ray[serve]==2.60.0" in ray_private.untested_ray("x")
    with pytest.raises(PrivateRayApiError, match=r"this is Ray 2\.61\.0: install ray\[serve\]==2\.60\.0"):
        actor_state(actor)
    with pytest.raises(PrivateRayApiError, match="metrics on port 8080"):
        metrics_port_option(8080)
    assert metrics_port_option(0) == {}  # no private keyword needed
    ray.kill(actor)
