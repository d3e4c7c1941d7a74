"""What the driver does when a node or a stage actor is lost: which Ray errors a stage recovers from,
waiting for Ray to restart an actor, and the record of each recovery for the job report."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import ray

from quantizer.errors import ConfigError
from rayquant.ray_private import actor_state

log = logging.getLogger(__name__)


_LOST = (ray.exceptions.ObjectLostError, ray.exceptions.NodeDiedError, ray.exceptions.RayActorError)


def inputs_lost(exc: BaseException) -> bool:
    """The stage could not read its input activations: lost with a node's object store, or never made
    because the upstream actor that computes them died. (Raised inside the stage's task, so it arrives
    as a RayTaskError whose cause says what happened.)"""
    if isinstance(exc, ray.exceptions.RayTaskError):
        return isinstance(exc.cause, _LOST)
    return isinstance(exc, (ray.exceptions.ObjectLostError, ray.exceptions.NodeDiedError))


def actor_lost(exc: BaseException) -> bool:
    """The stage's own actor died or is restarting (its process or its node went away)."""
    return not isinstance(exc, ray.exceptions.RayTaskError) and isinstance(exc, ray.exceptions.RayActorError)


def recoverable(exc: BaseException) -> bool:
    return actor_lost(exc) or inputs_lost(exc)


@dataclass
class Recovery:
    stage: int
    error: str  # the Ray error type
    inputs_rebuilt: bool  # the stage's input activations were lost and recomputed
    at: float  # wall-clock time (time.time())


def wait_until_restarted(actor, stage: int, timeout_s: float = 600, old_pid: int | None = None) -> None:
    """Block until Ray has restarted `actor` (possibly on another node); raises if it is dead for good.
    `old_pid`: the process a kill was just sent to — until the kill lands it may still answer, so wait for
    another."""
    deadline = time.time() + timeout_s
    while True:
        try:
            if ray.get(actor.pid.remote(), timeout=30) != old_pid:
                return
            exc: BaseException | None = None
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                ray.exceptions.GetTimeoutError) as err:
            exc = err
            if actor_state(actor) == "DEAD":
                raise ConfigError(f"stage {stage}'s actor died more than resources.max_restarts times; finished "
                                  "layers are kept: run the same command again to resume") from exc
        if time.time() > deadline:
            raise ConfigError(
                f"stage {stage}'s actor was not restarted within {timeout_s:.0f} s: no node has the resources "
                "it needs (add a node, or lower resources.cpus_per_stage / gpus_per_stage). Finished layers "
                "are kept: run the same command again to resume") from exc
        time.sleep(0.5)
