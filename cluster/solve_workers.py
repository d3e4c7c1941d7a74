"""A layer's solves spread over Ray workers: the stage solves some itself while Ray tasks solve others.

Used for groups with many units (the experts of a sparse layer: hundreds at 235B scale). Each task gets
the same CPU/GPU budget and torch thread count as the stage, so a solve gives the same bits wherever it
runs. A factorization shared by many units (every expert's gate/up when all experts see every token) is
put into the object store once, not sent with every task.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections import deque
from typing import Iterable, Iterator

import ray
import torch

from quantizer.config import QuantConfig
from quantizer.result import QuantResult
from quantizer.solvers import SolveJob, run_job


def _solve(job: SolveJob, fact, cfg: QuantConfig, threads: int) -> QuantResult:
    torch.set_num_threads(threads)
    return run_job(dataclasses.replace(job, fact=fact), cfg)


class RaySolver:
    """Solves jobs here and on up to `workers - 1` Ray tasks at once; yields results in job order."""

    def __init__(self, workers: int, threads: int, num_gpus: float = 0) -> None:
        self.remote_slots = workers - 1
        self.threads = threads
        self.task = ray.remote(_solve).options(num_cpus=threads, num_gpus=num_gpus, max_retries=2)
        self.remote_jobs = 0  # jobs solved elsewhere (for the report)

    def solve(self, jobs: Iterable[SolveJob], cfg: QuantConfig) -> Iterator[tuple[SolveJob, QuantResult]]:
        """A job goes to a free Ray slot, or else is solved here at once; finished results are handed back
        in job order as soon as every earlier one is done."""
        # id(factorization) → (a weak reference to it, its object ref). A freed factorization's id can be
        # reused by a new one, which must not find the old ref: entries of freed ones are dropped (which also
        # unpins their copies in the object store).
        facts: dict[int, tuple[weakref.ref, ray.ObjectRef]] = {}
        pending: deque[list] = deque()  # [job, ref (remote) or None, result (solved here) or None]
        for job in jobs:
            facts = {key: entry for key, entry in facts.items() if entry[0]() is not None}
            if sum(entry[1] is not None for entry in pending) < self.remote_slots:
                if job.fact is not None and id(job.fact) not in facts:
                    facts[id(job.fact)] = (weakref.ref(job.fact), ray.put(job.fact))
                fact = facts[id(job.fact)][1] if job.fact is not None else None
                pending.append([job, self.task.remote(dataclasses.replace(job, fact=None), fact, cfg, self.threads),
                                None])
                self.remote_jobs += 1
            else:
                pending.append([job, None, run_job(job, cfg)])
            while pending and (pending[0][1] is None or ray.wait([pending[0][1]], timeout=0)[0]):
                head, ref, result = pending.popleft()
                yield head, result if ref is None else ray.get(ref)
        while pending:
            head, ref, result = pending.popleft()
            yield head, result if ref is None else ray.get(ref)
