"""Every private Ray API rayquant uses outside the Serve proxy hooks, each behind one version check.

Private functions change without notice between Ray releases, so they are called only on the versions
they were tested on (`TESTED_RAY_VERSIONS`, the version pyproject pins). On any other Ray they fail closed:
they raise `PrivateRayApiError`, naming the version to install, instead of guessing.
"""

from __future__ import annotations

import ray

from quantizer.errors import ConfigError

TESTED_RAY_VERSIONS = ("2.60.0",)


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
    _require("telling a restarting actor from a dead one")
    return ray._private.state.actors(actor._actor_id.hex()).get("State", "UNKNOWN")


def metrics_port_option(port: int) -> dict[str, int]:
    """ray.init's keyword for the Prometheus metrics port of a local Ray (0 = a port Ray picks: no keyword)."""
    if not port:
        return {}
    _require(f"serving metrics on port {port} of a local Ray")
    return {"_metrics_export_port": port}
