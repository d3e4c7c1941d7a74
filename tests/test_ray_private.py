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


QUICK_START = """
import sys

import ray
from ray._private import ray_constants, services
from ray._private.node import Node

from rayquant.ray_connect import connect_ray
from rayquant.ray_private import stop_local_ray

patched = (Node.start_api_server, services.get_node)
assert connect_ray(None, 1, preload=("email.mime.text",))
assert (Node.start_api_server, services.get_node) == patched, "Ray's functions are restored after the start"
processes = ray._private.worker._global_node.all_processes
assert processes[ray_constants.PROCESS_TYPE_DASHBOARD], "the API server still runs"


@ray.remote(num_cpus=1)
class Probe:
    def preloaded(self) -> bool:
        return "email.mime.text" in sys.modules


print("PRELOADED", ray.get(Probe.remote().preloaded.remote()))
stop_local_ray()
"""


def test_a_local_ray_starts_quickly_with_its_workers_preloaded(tmp_path):
    """The quick start of a local Ray gives a working Ray with its API server, puts Ray's functions back, and
    the workers an actor lands on have imported the preloaded modules before any work reached them."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", QUICK_START], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "PRELOADED True" in done.stdout
    assert ray_private.preload_option(()) == {}
    assert ray_private.preload_option(("torch",)) == {"_system_config": {"preload_python_modules": ["torch"]}}
