"""The solves of one sequential group, and who runs them.

A group's units (projections that share an input) become `SolveJob`s: a stacked weight and either the
factorization of its inputs' Hessian (GPTQ) or none (round-to-nearest). Units whose Hessians are the same
matrix — every expert of a layer when each is calibrated on every token — share one factorization, so H is
inverted once per group rather than once per expert. `LocalSolver` runs the jobs in this process one
after another; cluster/ adds a solver that spreads them over other Ray workers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Protocol

import torch

from quantizer.config import QuantConfig
from quantizer.gptq import Factorization, gptq_solve
from quantizer.result import QuantResult
from quantizer.rtn import rtn_quantize


@dataclass
class SolveJob:
    names: tuple[str, ...]  # modules whose weights are stacked, rows in this order
    weight: torch.Tensor  # [rows, in] float32
    fact: Factorization | None  # GPTQ against this factorization; None = round-to-nearest
    hessian: torch.Tensor | None = None  # RTN only: H [in, in] to report the output error (else loss 0)
    cfg: QuantConfig | None = None  # settings for this job when they differ from the group's (a fallback)


def run_job(job: SolveJob, cfg: QuantConfig) -> QuantResult:
    """Solve one job (in any process: jobs and results are plain tensors)."""
    cfg = job.cfg or cfg
    if job.fact is None:
        return rtn_quantize(job.weight, cfg, job.hessian)
    start = time.perf_counter()
    result = gptq_solve(job.weight, job.fact, cfg)
    result.seconds = time.perf_counter() - start
    return result


class Solver(Protocol):
    def solve(self, jobs: Iterable[SolveJob], cfg: QuantConfig) -> Iterator[tuple[SolveJob, QuantResult]]:
        """Each job with its result, in the order the jobs came; jobs are drawn from the iterable as needed."""
        ...


class LocalSolver:
    """Every job in this process, one at a time."""

    def solve(self, jobs: Iterable[SolveJob], cfg: QuantConfig) -> Iterator[tuple[SolveJob, QuantResult]]:
        for job in jobs:
            yield job, run_job(job, cfg)


def split_rows(job: SolveJob, result: QuantResult, widths: list[int]) -> dict[str, QuantResult]:
    """The stacked result of `job` back into one result per module (`widths`: each module's rows)."""
    parts: dict[str, QuantResult] = {}
    row = 0
    for name, width in zip(job.names, widths):
        rows = slice(row, row + width)
        loss = float(result.row_losses[rows].sum()) if result.row_losses is not None else 0.0
        parts[name] = QuantResult(codes=result.codes[rows], scales=result.scales[:, rows],
                                  zeros=result.zeros[:, rows], g_idx=result.g_idx.clone(), loss=loss,
                                  seconds=result.seconds, cholesky_fallback=result.cholesky_fallback)
        row += width
    return parts
