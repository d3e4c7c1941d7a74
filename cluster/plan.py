"""Split decoder layers into contiguous stages that fit each stage's memory budget.

Pure function of sizes read from config.json and the safetensors headers: no weights, no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantizer.errors import ConfigError
from quantizer.model_io import CheckpointReader

GB = 1024**3


def human(nbytes: float) -> str:
    return f"{nbytes / GB:.2f} GB" if nbytes >= GB / 10 else f"{nbytes / 1024**2:.1f} MB"


@dataclass(frozen=True)
class StagePlan:
    index: int
    layers: range
    weight_bytes: int  # float bytes of the stage's layers (+ embeddings / head on the ends)
    workspace_bytes: int  # Hessians, Cholesky and activation buffers for one layer at a time

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.workspace_bytes


@dataclass(frozen=True)
class ModelSizes:
    layer_bytes: list[int]  # float bytes of each decoder layer, in checkpoint dtype
    first_extra: int  # embeddings, on stage 0
    last_extra: int  # final norm + lm_head, on the last stage
    workspace: int  # per-stage working memory independent of the layer count


def model_sizes(reader: CheckpointReader, tokens_per_batch: int, inflight: int, intermediate: int) -> ModelSizes:
    """Sizes for planning. Workspace: the largest Hessian ×3 (H, its Cholesky, H⁻¹ factor, fp32), plus
    `inflight` activation batches in and out and one MLP-wide intermediate in fp32."""
    cfg, arch = reader.config, reader.arch
    hidden = int(cfg.hidden_size)
    widest = max(hidden, intermediate)
    hessians = 3 * widest * widest * 4
    activations = 2 * inflight * tokens_per_batch * hidden * 4 + tokens_per_batch * intermediate * 4 * 3
    head = reader.tensor_bytes(arch.lm_head) or 0
    return ModelSizes(
        layer_bytes=[reader.layer_bytes(i) for i in range(reader.num_layers)],
        first_extra=reader.tensor_bytes(arch.embed),
        last_extra=reader.tensor_bytes(arch.final_norm) + head,
        workspace=hessians + activations,
    )


def _stage_cost(sizes: ModelSizes, start: int, stop: int, n_layers: int) -> int:
    cost = sum(sizes.layer_bytes[start:stop]) + sizes.workspace
    if start == 0:
        cost += sizes.first_extra
    if stop == n_layers:
        cost += sizes.last_extra
    return cost


def _balanced_split(sizes: ModelSizes, stages: int, by_memory: bool) -> list[range]:
    """Contiguous split into `stages` parts minimizing the largest stage (linear-partition DP): by layer
    bytes alone (compute time) or by memory (layers + embeddings/head on the end stages)."""
    n = len(sizes.layer_bytes)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]  # best[k][j]: first j layers in k stages
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                part = _stage_cost(sizes, i, j, n) if by_memory else sum(sizes.layer_bytes[i:j])
                cost = max(best[k - 1][i], part)
                if cost < best[k][j]:
                    best[k][j], cut[k][j] = cost, i
    bounds, j = [], n
    for k in range(stages, 0, -1):
        i = cut[k][j]
        bounds.append(range(i, j))
        j = i
    return bounds[::-1]


def plan_stages(sizes: ModelSizes, stages: int | str, budget_bytes: int) -> list[StagePlan]:
    """Contiguous layer ranges per stage; `stages="auto"` picks the fewest stages that fit `budget_bytes`.

    Stages get equal shares of layer bytes (equal work) when that fits; otherwise the split that
    minimizes the largest stage's memory."""
    n = len(sizes.layer_bytes)
    candidates = range(1, n + 1) if stages == "auto" else [int(stages)]
    if stages != "auto" and not 1 <= int(stages) <= n:
        raise ConfigError(f"stages={stages} is invalid: the model has {n} decoder layers")
    for count in candidates:
        for by_memory in (False, True):
            split = _balanced_split(sizes, count, by_memory)
            plans = [StagePlan(k, r, _stage_cost(sizes, r.start, r.stop, n) - sizes.workspace, sizes.workspace)
                     for k, r in enumerate(split)]
            if max(p.total_bytes for p in plans) <= budget_bytes:
                return plans
    worst = max(p.total_bytes for p in plans)
    if stages == "auto":
        raise ConfigError(
            f"no split fits {human(budget_bytes)} per stage: even one layer per stage needs "
            f"{human(worst)}; use devices with more memory"
        )
    smallest = _fewest_stages(sizes, worst, budget_bytes, n)
    raise ConfigError(
        f"{stages} stages do not fit: the largest stage needs {human(worst)} but each stage has "
        f"{human(budget_bytes)}; {smallest}"
    )


def _fewest_stages(sizes: ModelSizes, worst: int, budget: int, n: int) -> str:
    for count in range(1, n + 1):
        split = _balanced_split(sizes, count, by_memory=True)
        if max(_stage_cost(sizes, r.start, r.stop, n) for r in split) <= budget:
            return f"use at least {count} stages (GPUs) of this size"
    return "the model does not fit even with one layer per stage; use devices with more memory"


def describe(plans: list[StagePlan]) -> str:
    lines = [f"plan: {len(plans)} stage(s)"]
    for p in plans:
        lines.append(f"  stage {p.index}: layers {p.layers.start}-{p.layers.stop - 1} "
                     f"({len(p.layers)} layers), weights {human(p.weight_bytes)} + "
                     f"workspace {human(p.workspace_bytes)} = {human(p.total_bytes)}")
    return "\n".join(lines)
