"""Split decoder layers into contiguous stages that fit each stage's memory budget.

Pure function of sizes read from config.json and the safetensors headers: no weights, no Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from quantizer.errors import ConfigError
from quantizer.layer_builder import mlp_width
from quantizer.model_io import CheckpointReader
from quantizer.solvers import SHARE_ALIGN

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


BASE_BYTES = GB // 2  # a stage process before it loads anything: torch, the Ray worker (or a CUDA context)


@dataclass(frozen=True)
class ModelSizes:
    """What one stage holds at its peak, by part. A stage quantizes one layer at a time: it holds that
    layer in its compute dtype and one GPTQ solve's workspace; under the pipelined schedule it also keeps
    all its float layers (they make the next stages' inputs)."""
    layer_bytes: list[int]  # float bytes of each decoder layer, in checkpoint dtype (also balances the work)
    first_extra: int  # embeddings (checkpoint dtype), held by stage 0 throughout
    last_extra: int  # final norm + lm_head, loaded by the last stage only to write its shard
    workspace: int  # one layer's solve (Hessian inversion or column loop) + activation buffers
    compute_scale: float = 1.0  # compute bytes / checkpoint bytes of a weight: 2 for bf16 computed in fp32 (CPU)
    all_layers_resident: bool = False  # pipelined schedule: the stage's float layers stay loaded
    base: int = 0  # the process itself
    held_bytes: list[int] = field(default_factory=list)  # float bytes of each layer held at once (a sparse layer:
    #                                                      one chunk of its experts); empty = layer_bytes

    @property
    def held(self) -> list[int]:
        return self.held_bytes or self.layer_bytes


def solve_workspace(groups: list[tuple[int, int]]) -> int:
    """Peak bytes of the GPTQ solves of one layer, for its units as (stacked rows, in_features): inverting H
    holds ~2.5 [in, in] fp32 matrices beside 2 copies of the stacked weight; the column loop holds H⁻¹
    beside 4 weight-sized fp32 buffers and the uint8 codes."""
    return max(max(int(2.5 * i * i * 4) + 2 * r * i * 4, i * i * 4 + 4 * r * i * 4 + r * i) for r, i in groups)


def layer_groups(reader: CheckpointReader, index: int, intermediate: int, all_experts: bool = True,
                 chunk: int = 0) -> list[tuple[list[tuple[int, int]], int]]:
    """Each sequential group of layer `index` as ([(stacked rows, in_features) per unit], Hessians held at
    once). The MLP of a dense layer is padded to `intermediate`. A sparse layer's expert groups hold one
    Hessian per expert of a chunk (`chunk` experts streamed at a time; 0: all) while their inputs are captured
    — except the gate/up group when every expert is calibrated on every token, which shares one."""
    arch = reader.arch
    width = mlp_width(reader.config)
    spec = arch.spec(index)
    dense = not spec.sparse
    shapes = arch.linear_shapes(index)
    groups = []
    for group in spec.groups:
        units = []
        for unit in group:
            rows = sum(intermediate if dense and shapes[n][0] == width else shapes[n][0] for n in unit)
            in_features = intermediate if dense and shapes[unit[0]][1] == width else shapes[unit[0]][1]
            units.append((rows, in_features))
        experts_input = [u for u in group if any(u[0].startswith(e + ".") for e in spec.experts)
                         and u[0].rpartition(".")[2] in ("gate_proj", "up_proj")]
        in_experts = [u for u in group if any(u[0].startswith(e + ".") for e in spec.experts)]
        per_expert = len(in_experts) // max(arch.num_experts(index), 1)
        held = min(len(in_experts), per_expert * chunk) if chunk > 0 else len(in_experts)
        hessians = len(group) - len(in_experts) + held
        if all_experts and experts_input:  # the routed experts' gate/up share one
            hessians = 1 + len(group) - len(experts_input)
        groups.append((units, hessians))
    return groups


def layer_workspace(groups: list[tuple[list[tuple[int, int]], int]]) -> int:
    """Peak bytes of a layer's capture and solves: the Hessians a group holds while its inputs are captured,
    then one unit's solve at a time (the others' Hessians still waiting)."""
    peak = 0
    for units, hessians in groups:
        widest = max(i for _, i in units)
        peak = max(peak, (hessians - 1) * widest * widest * 4 + solve_workspace(units))
    return peak


def experts_see_every_token(reader: CheckpointReader, moe_calibration: str, tokens: int) -> bool:
    """Whether the experts will mostly be calibrated on every token (for the phase estimate: each then runs on
    every token for its down_proj Hessian): always under "all"; under "auto" when even twice an even share of the
    routed tokens (2 · tokens · top-k / E: routers load experts unevenly) is fewer than the experts' inputs. (Not
    for memory: under "auto" each expert's own gate/up Hessian is captured beside the shared one until the
    routed counts decide.)"""
    if moe_calibration != "auto":
        return moe_calibration == "all"
    sparse = [i for i in range(reader.num_layers) if reader.arch.is_sparse(i)]
    if not sparse:
        return False
    top_k = int(getattr(reader.config, "num_experts_per_tok", None) or getattr(reader.config, "moe_k", 1))
    return 2 * tokens * top_k / reader.arch.num_experts(sparse[0]) < reader.arch.hidden_size


def expert_bytes(reader: CheckpointReader, index: int) -> tuple[int, int]:
    """(float bytes of one expert as loaded, weights of all experts) of layer `index` ((0, 0) when dense), from
    the headers of the tensors under the layer's experts."""
    spec = reader.arch.spec(index)
    if not spec.sparse:
        return 0, 0
    prefix = reader.arch.layer_prefix(index) + "."
    blocks = tuple(prefix + e + "." for e in spec.experts)
    to_module = reader.arch.names.to_module
    inside = [reader.tensors[n] for n in reader.layer_tensor_names(index) if to_module[n].startswith(blocks)]
    weights = sum(math.prod(t.shape) for t in inside if len(t.shape) >= 2)
    return sum(t.nbytes for t in inside) // reader.arch.num_experts(index), weights


def model_sizes(reader: CheckpointReader, tokens_per_batch: int, inflight: int, intermediate: int,
                compute_bytes: int | None = None, pipelined: bool = False, all_experts: bool = True,
                chunk: int = 0, bits: int = 4, held_tokens: int = 0) -> ModelSizes:
    """Sizes for planning. compute_bytes: bytes per weight in the stage's compute dtype (4 on CPU; None =
    the checkpoint's); pipelined: stages keep their float layers; chunk: experts of a sparse layer held in
    float at once (0: all) — the finished ones are held packed (`bits` per weight and an fp16 scale per 128) —
    and, while its experts are streamed, the experts block's inputs for the `held_tokens` calibration tokens the
    stage holds.
    Activations: `inflight` batches in and out and one MLP-wide intermediate, fp32; a sparse layer adds the
    routed-token buffers (the block's input and output, one expert's intermediate)."""
    arch = reader.arch
    hidden = arch.hidden_size
    activations = 2 * inflight * tokens_per_batch * hidden * 4 + tokens_per_batch * intermediate * 4 * 3
    sparse_layers = [i for i in range(reader.num_layers) if arch.is_sparse(i)]
    if sparse_layers:
        expert = arch.expert_width(sparse_layers[0])
        activations += tokens_per_batch * (2 * hidden + 3 * expert) * 4
    kinds = {0} | ({sparse_layers[0]} if sparse_layers else set())  # one dense and one sparse layer
    workspace = max(layer_workspace(layer_groups(reader, i, intermediate, all_experts, chunk)) for i in kinds)
    held = []
    for i in range(reader.num_layers):  # a sparse layer's float part: all but its streamed experts
        one, _ = expert_bytes(reader, i)
        experts = reader.arch.num_experts(i)
        held.append(reader.layer_bytes(i) - one * (experts - (min(chunk, experts) if chunk > 0 else experts)))
    if sparse_layers:  # the experts already solved, packed; the recorded inputs of the experts block
        workspace += int(expert_bytes(reader, sparse_layers[0])[1] * (bits / 8 + 2 / 128))
        workspace += held_tokens * hidden * (compute_bytes or reader.embedding_info().dtype_torch.itemsize)
    head = reader.head_names()
    checkpoint_bytes = reader.embedding_info().dtype_torch.itemsize
    return ModelSizes(
        layer_bytes=[reader.layer_bytes(i) for i in range(reader.num_layers)],
        held_bytes=held,
        first_extra=reader.tensor_bytes([n for n in reader.outside_layers() if n not in head]),
        last_extra=reader.tensor_bytes(head),
        workspace=workspace + activations,
        compute_scale=(compute_bytes or checkpoint_bytes) / checkpoint_bytes,
        all_layers_resident=pipelined,
        base=BASE_BYTES,
    )


def host_bytes(sizes: ModelSizes) -> int:
    """Host memory of a GPU stage at its peak: the process, the embeddings and the largest part of a layer held
    at once, each read from disk into host memory (checkpoint dtype) before it moves to the GPU."""
    return sizes.base + sizes.first_extra + max(sizes.held)


def _stage_cost(sizes: ModelSizes, start: int, stop: int, n_layers: int) -> int:
    """Peak bytes of the stage with layers [start, stop): the quantizing phase, or writing the shard."""
    layers = sizes.layer_bytes[start:stop]
    held = (sum(layers) if sizes.all_layers_resident else 0) + max(sizes.held[start:stop])
    cost = sizes.base + int(held * sizes.compute_scale) + sizes.workspace
    ends = sizes.first_extra if start == 0 else 0
    if stop == n_layers:
        return max(cost + ends, sizes.base + ends + sizes.last_extra)
    return cost + ends


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


def fitting_plans(sizes: ModelSizes, stages: int | str, budget_bytes: int) -> tuple[list[StagePlan], bool]:
    """The plans for `stages` (or the fewest that fit, "auto") and whether they fit `budget_bytes`.

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
                return plans, True
    return plans, False


def plan_stages(sizes: ModelSizes, stages: int | str, budget_bytes: int) -> list[StagePlan]:
    """Contiguous layer ranges per stage (`fitting_plans`), or a refusal that says what would fit."""
    plans, fits = fitting_plans(sizes, stages, budget_bytes)
    if fits:
        return plans
    n = len(sizes.layer_bytes)
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


@dataclass(frozen=True)
class PhaseEstimate:
    """Expected seconds per layer of each data-parallel phase, for an average layer, and the bytes moved."""
    forward_s: float
    hessian_s: float
    reduce_s: float
    solve_s: float
    broadcast_s: float
    hessian_bytes: int
    result_bytes: int

    @property
    def total_s(self) -> float:
        return self.forward_s + self.hessian_s + self.reduce_s + self.solve_s + self.broadcast_s


GPU_FLOPS = 200e12  # FLOP/s a GPU worker sustains on the solves' matmuls (an H100 in bf16/fp32 mixes)
CPU_FLOPS_PER_THREAD = 0.1e12  # a CPU thread on the same (0.22 TFLOP/s measured on 2 threads of this CPU)
LINK_BYTES_PER_S = 10e9  # between workers: Ray's object store, or one link of a torch.distributed group


def worker_flops(gpus: float, threads: int) -> float:
    """FLOP/s assumed for one worker: a GPU's, or its CPU threads'."""
    return GPU_FLOPS if gpus else CPU_FLOPS_PER_THREAD * max(1, threads)


def row_split_pays(rows: int, in_features: int, workers: int, flops: float, link_bytes_per_s: float) -> bool:
    """Whether solving a unit (stacked `rows` × `in_features`) in row shares on all `workers` beats one worker
    solving it: it saves (1 − 1/W) of the column loop, 2·rows·in²·(1 − 1/W) FLOPs, and moves every worker's
    partial Hessian to every other — (W − 1)² more [in, in] fp32 matrices than to one owner. On CPUs the solve
    dominates (split); on GPUs the Hessians do (a 72B layer's are GBs: whole)."""
    if workers < 2 or rows < 2 * SHARE_ALIGN:
        return False
    saved = 2 * rows * in_features**2 * (1 - 1 / workers) / flops
    extra = (workers - 1) ** 2 * in_features**2 * 4 / link_bytes_per_s
    return saved > extra


def solving_ranks(units: list[tuple[int, int]], workers: int, flops: float, link_bytes_per_s: float
                  ) -> list[tuple[int, ...]]:
    """The ranks that solve each unit of a pass, for units given as (stacked rows, in_features), in their order.
    A unit whose solve (rows · in²) costs more than a worker's fair share of the pass — a dense layer's passes
    hold one unit each — goes to every worker, a share of its rows each, where `row_split_pays`; the rest go
    whole, largest first, each to the least loaded worker, ties to the lowest rank, so the assignment is the
    same on every run. The data-parallel schedule assigns with this, and the phase model estimates with it."""
    cost = [rows * in_f**2 for rows, in_f in units]
    fair = sum(cost) / workers
    load = [0.0] * workers
    ranks: list[tuple[int, ...]] = [()] * len(units)
    for k in sorted(range(len(units)), key=lambda k: (-cost[k], k)):
        if cost[k] > fair and row_split_pays(*units[k], workers, flops, link_bytes_per_s):
            ranks[k] = tuple(range(workers))
            load = [x + cost[k] / workers for x in load]
            continue
        rank = min(range(workers), key=lambda r: (load[r], r))
        ranks[k] = (rank,)
        load[rank] += cost[k]
    return ranks


def estimate_phases(reader: CheckpointReader, index: int, intermediate: int, tokens: int, workers: int, bits: int,
                    worker_flops: float, link_bytes_per_s: float, all_experts: bool = True) -> PhaseEstimate:
    """Per-phase seconds of layer `index` under the data-parallel schedule on `workers` workers of
    `worker_flops` FLOP/s each, joined by links of `link_bytes_per_s`; `tokens` calibration tokens in all.
    Forward: the capture passes (each runs the layer up to its units: half a layer on average) and the
    output forward, 2 FLOPs per weight and token, every expert in a sparse layer's down_proj pass when all
    experts are calibrated on every token; Hessians: 2·in² per token and unit. Solves, pass after pass as the
    schedule runs them (`solving_ranks`): in row shares on every worker (2·rows·in²/W each plus the in³
    factorization every worker makes) or whole (2·rows·in² + in³). Reduce: the W − 1 partial Hessians of each
    unit to its owner (to every worker for a unit in row shares); broadcast: the packed weights to the W − 1
    other workers — both serialized on one link, as the collective transport sends them (an upper bound for the
    object store). Experts streamed `chunk` at a time add next to nothing: later chunks run the experts block
    alone on its recorded inputs."""
    arch, config = reader.arch, reader.config
    groups = layer_groups(reader, index, intermediate, all_experts)
    weights = sum(r * i for units, _ in groups for r, i in units)
    passes = len(groups)
    forward_flops = 2 * weights * tokens * (passes / 2 + 1)
    if arch.is_sparse(index):
        experts = arch.num_experts(index)
        top_k = int(getattr(config, "num_experts_per_tok", None) or getattr(config, "moe_k", 1))
        expert_weights = sum(r * i for units, _ in groups[-2:] for r, i in units)
        dense = weights - expert_weights
        routed = expert_weights * top_k / experts
        forward_flops = 2 * tokens * (dense * (passes / 2 + 1) + routed * 3 + (expert_weights if all_experts else 0))
    hessian_flops = sum(2 * i * i * tokens * shared for units, shared in groups for _, i in units[:1])
    solve_flops = 0.0
    hessian_bytes = 0.0
    for units, hessians in groups:
        share = hessians / len(units)  # the units of a group may share Hessians (experts on every token)
        loads = [0.0] * workers
        for (rows, i), ranks in zip(units, solving_ranks(units, workers, worker_flops, link_bytes_per_s)):
            partials = i * i * 4 * share * (workers - 1)
            hessian_bytes += partials * len(ranks)
            if len(ranks) > 1:
                loads = [load + 2 * rows * i * i / workers + i**3 for load in loads]
            else:
                loads[ranks[0]] += 2 * rows * i * i + i**3
        solve_flops += max(loads)
    result_bytes = int(weights * bits / 8 * (workers - 1))
    return PhaseEstimate(forward_flops / workers / worker_flops, hessian_flops / workers / worker_flops,
                         hessian_bytes / link_bytes_per_s, solve_flops / worker_flops,
                         result_bytes / link_bytes_per_s, int(hessian_bytes), result_bytes)


def describe_phases(estimate: PhaseEstimate, layers: int, workers: int, worker_flops: float,
                    link_bytes_per_s: float, transport: str) -> str:
    e = estimate
    return "\n".join([
        f"schedule: data_parallel, {workers} worker(s), transport {transport}; assumed {worker_flops / 1e12:g} "
        f"TFLOP/s per worker, {link_bytes_per_s / 1e9:g} GB/s between workers",
        f"  per layer: forward {e.forward_s:.1f} s, Hessians {e.hessian_s:.1f} s, reduce {e.reduce_s:.1f} s "
        f"({human(e.hessian_bytes)}), solve {e.solve_s:.1f} s, broadcast {e.broadcast_s:.1f} s "
        f"({human(e.result_bytes)}) = {e.total_s:.1f} s",
        f"  {layers} layers: about {layers * e.total_s / 60:.0f} min"])
