"""Connect to a Ray cluster, or start a local one owned by this process."""

from __future__ import annotations

import logging
import os
import socket

import ray

from quantizer.errors import ConfigError
from rayquant.ray_private import metrics_port_option, preload_option, quick_local_start


def connect_ray(address: str | None, cpus_needed: int, metrics_port: int = 0, preload: tuple[str, ...] = ()) -> bool:
    """Connect to `address` / RAY_ADDRESS, or start a local Ray (Prometheus metrics on `metrics_port`,
    0 = a port Ray picks; its worker processes import the modules in `preload` as they start). Returns True
    if this call started it."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        if address != "auto":
            host, _, port = address.removeprefix("ray://").removeprefix("http://").rpartition(":")
            try:
                socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"Ray address {address} does not answer ({exc}); start a cluster with `ray start --head` "
                    "or leave out --address to run on a local Ray"
                ) from exc
        ray.init(address=address, logging_level=logging.WARNING)
        return False
    # address="local": always a new Ray owned by this process, never a cluster that happens to run here
    with quick_local_start():
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cpus_needed), include_dashboard=False,
                 logging_level=logging.WARNING, **metrics_port_option(metrics_port), **preload_option(preload))
    return True
