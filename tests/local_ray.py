"""The local Ray that tests share (tests/conftest.py: module_ray), and how to stop or renew it."""

from __future__ import annotations

LOCAL_RAY = {"address": "local", "num_cpus": 4, "include_dashboard": False, "logging_level": "WARNING"}


def start_ray() -> None:
    """This process's local Ray for the tests, started as the CLI starts one (rayquant.ray_private's quick start)."""
    import ray

    from rayquant.ray_private import quick_local_start

    with quick_local_start():
        ray.init(**LOCAL_RAY)


def stop_ray() -> None:
    """Shut this process's Ray down and forget any Serve client of it (a client left by a failed test would send
    the next cluster's calls to this one's dead controller)."""
    from ray.serve.context import _set_global_client

    from rayquant.ray_private import stop_local_ray

    _set_global_client(None)
    stop_local_ray()


def fresh_local_ray() -> None:
    """A new local Ray, for a module whose Ray workers must inherit an environment it has just set."""
    import ray

    if ray.is_initialized():
        stop_ray()
    start_ray()


def actors_left() -> list[str]:
    """Actors of this process's Ray still alive, the proxy hooks' registry aside (detached, and cleared by
    every server start)."""
    import ray

    from serving.proxy_hooks import REGISTRY_NAME

    return [a.get("Name") or a.get("ActorClassName", "?") for a in ray._private.state.actors().values()
            if a.get("State") != "DEAD" and a.get("Name") != REGISTRY_NAME]
