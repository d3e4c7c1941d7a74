"""Every private Ray API rayquant uses outside the Serve proxy hooks, each behind one version check.

Private functions change without notice between Ray releases, so they are called only on the versions
they were tested on (`TESTED_RAY_VERSIONS`, the version pyproject pins). On any other Ray they fail closed:
they raise `PrivateRayApiError`, naming the version to install, instead of guessing.
"""

from __future__ import annotations

import contextlib
import functools
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import ray

from quantizer.errors import ConfigError

TESTED_RAY_VERSIONS = ("2.60.0",)
GRACE_SECONDS = 0.3  # (stop_local_ray) how long Ray's processes after the raylet get to exit after SIGTERM
NODE_POLL_SECONDS = 0.05  # (quick_local_start) how often the starting Ray's node table is read


class PrivateRayApiError(ConfigError):
    """A private Ray API asked for on a Ray version it was not tested on."""


def untested_ray(what: str, version: str | None = None) -> str | None:
    """Why `what` (a private Ray API's use) cannot be trusted on this Ray, or None when it can."""
    version = version or ray.__version__
    if version in TESTED_RAY_VERSIONS:
        return None
    return (f"{what} uses a private Ray API tested only on Ray {', '.join(TESTED_RAY_VERSIONS)}, and this is Ray "
            f"{version}: install ray[serve]=={TESTED_RAY_VERSIONS[-1]}")


def _require(what: str) -> None:
    problem = untested_ray(what)
    if problem:
        raise PrivateRayApiError(problem)


def actor_state(actor) -> str:
    """ALIVE, RESTARTING, DEAD, … as Ray's control store records it (no public API gives it without the
    dashboard)."""
    return actor_process(actor)[0]


def actor_process(actor) -> tuple[str, int]:
    """(state, pid) of the actor's current process as Ray's control store records them: a busy actor's
    record answers while a call to it would wait behind its queue."""
    _require("telling a restarting actor from a dead one")
    record = ray._private.state.actors(actor._actor_id.hex())
    return record.get("State", "UNKNOWN"), int(record.get("Pid", 0))


def metrics_port_option(port: int) -> dict[str, int]:
    """ray.init's keyword for the Prometheus metrics port of a local Ray (0 = a port Ray picks: no keyword)."""
    if not port:
        return {}
    _require(f"serving metrics on port {port} of a local Ray")
    return {"_metrics_export_port": port}


@contextlib.contextmanager
def quick_local_start() -> Iterator[None]:
    """Around ray.init of a new local Ray: the same Ray, started without two of its waits (2.5–3.5 s → ≈ 2 s
    on 2 cores). Ray waits for its API server (the dashboard head, also started with include_dashboard=False)
    to publish its address before it starts the raylet; here the API server starts on a thread beside the
    raylet, and is waited for before ray.init goes on. Then Ray asks the control store for the new raylet
    with a call that retries once a second; here the node table is read every NODE_POLL_SECONDS first. On a
    Ray this was not tested on: plain ray.init."""
    if untested_ray("starting a local Ray quickly") is not None:
        yield
        return
    from ray._private import services
    from ray._private.node import Node
    from ray._private.state import GlobalState

    start_api_server, get_node = Node.start_api_server, services.get_node
    started: list[Future] = []  # the API server's start, raised from (if it fails) in node_registered

    def node_registered(gcs_address: str, node_id: str):
        state = GlobalState()
        state._initialize_global_state(services._get_gcs_client_options(gcs_address))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(n["NodeID"] == node_id for n in state.node_table()):
            time.sleep(NODE_POLL_SECONDS)
        for start in started:
            start.result()
        return get_node(gcs_address, node_id)  # (answers at once now; after 30 s it raises Ray's own error)

    with ThreadPoolExecutor(1, thread_name_prefix="ray-api-server") as beside:

        def api_server_beside(node, **kwargs) -> None:
            started.append(beside.submit(start_api_server, node, **kwargs))

        Node.start_api_server, services.get_node = api_server_beside, node_registered
        try:
            yield
        finally:
            Node.start_api_server, services.get_node = start_api_server, get_node


def preload_option(modules: tuple[str, ...]) -> dict[str, dict[str, list[str]]]:
    """ray.init's keywords for a new local Ray whose worker processes import `modules` as they start — before
    any work reaches them. Ray starts a worker per CPU with the raylet, and a job's actors take those, so the
    actors' imports (torch, transformers: ≈ 3.5 s of CPU each) run while the driver still imports and plans
    rather than after. No keywords on a Ray this was not tested on (a slower start, nothing else)."""
    if not modules or untested_ray("preloading modules in Ray's workers") is not None:
        return {}
    return {"_system_config": {"preload_python_modules": list(modules)}}


def stop_local_ray() -> None:
    """ray.shutdown() of the Ray this process started, without its waits: Ray stops its processes one after
    another, giving each up to 1 s to exit after SIGTERM — which the autoscaler's monitor never does, so every
    local Ray took ≥ 1.3 s to stop. Here the raylet goes first, as in Ray (it stops its workers; up to 1 s),
    then every other process gets SIGTERM at once and SIGKILL if still running 0.3 s later; Ray's own
    shutdown then finds them gone. On a Ray this was not tested on, or for a Ray this process joined: plain
    ray.shutdown()."""
    node = ray._private.worker._global_node if untested_ray("stopping a local Ray quickly") is None else None
    if node is not None and node.is_head():
        node.kill_all_processes = functools.partial(_stop_side_by_side, node)
    ray.shutdown()


def _stop_side_by_side(node, check_alive: bool = False, allow_graceful: bool = True, wait: bool = False) -> None:
    """Node.kill_all_processes with the processes after the raylet stopped at once (see `stop_local_ray`)."""
    from ray._private import ray_constants

    def stop(types: list[str], grace: float) -> None:
        processes = [info.process for t in types for info in node.all_processes.pop(t, [])]
        for process in processes:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + grace
        for process in processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)

    stop([ray_constants.PROCESS_TYPE_RAYLET], 1.0)  # Ray's own grace for it: it stops its workers (≈ 30 ms)
    stop([t for t in list(node.all_processes) if t != ray_constants.PROCESS_TYPE_REAPER], GRACE_SECONDS)
    stop([ray_constants.PROCESS_TYPE_REAPER], GRACE_SECONDS)
