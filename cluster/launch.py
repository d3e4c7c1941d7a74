"""Run a quantization job as the CLI does: Ray starts while the driver checks the job, not after it.

Building the driver (importing torch and transformers, reading the checkpoint's headers, checking every shape,
tokenizing the calibration, planning) and starting a local Ray (or connecting to a cluster) take about 3 s
each on 2 cores and need nothing from each other, so they run side by side: the driver on a thread, Ray on
this one (Ray installs its signal handlers from the main thread). A local Ray's worker processes import the
job's actor module (torch, transformers) as they start, so the actors that later take them are up ≈ 1 s
sooner. A job the driver refuses stops the Ray started for it and raises its own error; nothing is written
before the checks pass either way.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import ray

from cluster.job import JobConfig
from rayquant.ray_connect import connect_ray
from rayquant.ray_private import stop_local_ray

if TYPE_CHECKING:
    from cluster.driver import Driver

log = logging.getLogger(__name__)


def _build_driver(job: JobConfig, restart: bool) -> Driver:
    from cluster.driver import Driver  # imported here: torch and transformers load on the thread

    return Driver(job, restart)


def run_job(job: JobConfig, restart: bool = False) -> dict[str, Any]:
    """Quantize (or resume) `job` and return its report. Ray is sized from the job file (`JobConfig.actors`;
    with stages: auto, for one stage); a plan with more stages than that local Ray has CPUs for starts it again
    with enough (more stages than the machine has cores: rare)."""
    actors = job.actors or 1
    # what a local Ray's workers import as they start: the module of the job's actors
    preload = ("cluster.dp_worker" if job.resolved_schedule == "data_parallel" else "cluster.stage",)
    with ThreadPoolExecutor(1, thread_name_prefix="rayquant-checks") as pool:
        building = pool.submit(_build_driver, job, restart)
        try:
            started = connect_ray(job.ray_address, job.actor_cpus(actors)[1], preload=preload)
        except BaseException:
            building.result()  # a job the driver refuses: its own error comes first
            raise
    try:
        driver = building.result()
        needed = driver.job.actor_cpus(driver.actor_count)[1]
        if started and needed > ray.cluster_resources().get("CPU", 0):
            log.info("the plan needs %d CPUs: starting the local Ray again with them", needed)
            stop_local_ray()
            connect_ray(job.ray_address, needed, preload=preload)
        return driver.run()
    finally:
        if started and ray.is_initialized():
            stop_local_ray()
