"""The solves of one sequential group, and who runs them.

A group's units (projections that share an input) become `SolveJob`s: a stacked weight and either the
factorization of its inputs' Hessian (GPTQ) or none (round-to-nearest). Units whose Hessians are the same
matrix — every expert of a layer when each is calibrated on every token — share one factorization, so H is
inverted once per group rather than once per expert. `LocalSolver` runs the jobs in this process one
after another; cluster/ adds a solver that spreads them over other Ray workers, and data-parallel workers
each solve a share of a job's rows (`solve_share`, `merge_rows`).
"""

from __future__ import annotations

import dataclasses
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


SHARE_ALIGN = 128  # rows: row shares start at multiples of this and are never shorter, so the GEMMs of the
# column loop run the same kernels on every row whichever share it is in (checked bit for bit on CPU BLAS)


def row_shares(rows: int, parts: int) -> list[slice]:
    """Up to `parts` contiguous, balanced shares of a stacked weight's `rows` rows, each starting at a multiple
    of SHARE_ALIGN and at least that long (fewer shares when the rows are too few; one share = all rows)."""
    blocks = rows // SHARE_ALIGN
    n = max(1, min(parts, blocks))
    bounds = [round(k * blocks / n) * SHARE_ALIGN for k in range(n)] + [rows]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def solve_share(job: SolveJob, cfg: QuantConfig, part: int, parts: int) -> QuantResult | None:
    """Rows `row_shares(rows, parts)[part]` of a job, solved against the job's whole factorization (rows are
    independent given H⁻¹); None when the job has fewer shares than `part + 1`."""
    shares = row_shares(job.weight.shape[0], parts)
    if part >= len(shares):
        return None
    return run_job(dataclasses.replace(job, weight=job.weight[shares[part]]), cfg)


def merge_rows(shares: list[QuantResult]) -> QuantResult:
    """The row shares of one stacked solve, in row order, as the result of solving all its rows at once."""
    first = shares[0]
    row_losses = None if first.row_losses is None else torch.cat([r.row_losses for r in shares])
    return QuantResult(codes=torch.cat([r.codes for r in shares]), scales=torch.cat([r.scales for r in shares], 1),
                       zeros=torch.cat([r.zeros for r in shares], 1), g_idx=first.g_idx,
                       loss=sum(r.loss for r in shares), seconds=max(r.seconds for r in shares),
                       cholesky_fallback=first.cholesky_fallback, row_losses=row_losses)


def split_rows(names: tuple[str, ...], result: QuantResult, widths: list[int]) -> dict[str, QuantResult]:
    """The stacked result of modules `names` back into one result per module (`widths`: each module's rows)."""
    parts: dict[str, QuantResult] = {}
    row = 0
    for name, width in zip(names, widths):
        rows = slice(row, row + width)
        loss = float(result.row_losses[rows].sum()) if result.row_losses is not None else 0.0
        parts[name] = QuantResult(codes=result.codes[rows], scales=result.scales[:, rows],
                                  zeros=result.zeros[:, rows], g_idx=result.g_idx.clone(), loss=loss,
                                  seconds=result.seconds, cholesky_fallback=result.cholesky_fallback)
        row += width
    return parts
