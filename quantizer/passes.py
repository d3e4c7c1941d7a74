"""The capture passes of one decoder layer, with a sparse layer's experts streamed a chunk at a time.

A layer's units come in sequential groups (LayerSpec.groups). True-sequential quantization captures one group per
pass (later groups see the quantized earlier ones); otherwise every group is captured in one pass. A sparse layer's
experts are independent of one another, so their groups can be cut by expert: with `chunk` experts at a time, the
experts' groups run chunk by chunk — [experts 0–31 gate/up], [experts 0–31 down], [experts 32–63 gate/up], … — and
only one chunk's float weights and Hessians are held at once. Each expert sees exactly what it would see
unchunked (the same inputs, the same router, the same order of batches), so the result is the same bit for bit.
The units outside the experts (a shared expert beside them) ride with the last chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantizer.decoder import LayerSpec, Unit


@dataclass(frozen=True)
class Pass:
    """One capture pass: its groups (each a tuple of units solved together) and, for a pass over part of the
    experts, which experts (`experts`, a range of expert indices; None when the pass holds no expert units)."""
    groups: tuple[tuple[Unit, ...], ...]
    experts: range | None = None
    chunk: int | None = None  # index of the expert chunk
    step: int = 0  # position among its chunk's passes (the first chunk's pass in that position is its model)


def expert_of(name: str | Unit, spec: LayerSpec) -> int | None:
    """The expert a module, tensor or unit belongs to ("mlp.experts.7.down_proj.weight" → 7); None outside the
    experts (or for a tensor of the experts block not held per expert)."""
    name = name if isinstance(name, str) else name[0]
    for experts in spec.experts:
        if name.startswith(experts + "."):
            index = name[len(experts) + 1:].partition(".")[0]
            return int(index) if index.isdigit() else None
    return None


def experts_progress(step: Pass, num_experts: int) -> tuple[int, int]:
    """(experts of the layer finished before this pass, of how many) for a pass over one chunk of streamed
    experts — the chunks run in expert order —; (0, 0) for any other pass."""
    if step.experts is None or len(step.experts) >= num_experts:
        return 0, 0
    return step.experts.start, num_experts


def experts_label(step: Pass, num_experts: int) -> str:
    """"experts 32-63 of 256" for a pass over one chunk of streamed experts; "" for any other pass."""
    if step.experts is None or len(step.experts) >= num_experts:
        return ""
    return f"experts {step.experts.start}-{step.experts.stop - 1} of {num_experts}"


def streamed(passes: list[Pass]) -> bool:
    """Whether the layer's experts are read a chunk at a time (more than one chunk)."""
    return len({p.chunk for p in passes if p.chunk is not None}) > 1


def part_after(passes: list[Pass], k: int) -> bool:
    """Whether a streamed layer is checkpointed (a part) after pass k: the next pass starts a new chunk of experts
    (after the attention part, after each chunk but the last)."""
    if not streamed(passes) or k + 1 >= len(passes):
        return False
    return passes[k + 1].chunk is not None and passes[k + 1].chunk != passes[k].chunk


def chunk_ranges(num_experts: int, chunk: int) -> list[range]:
    """Experts 0 … E-1 in chunks of `chunk` (≤ 0 or ≥ E: one chunk of all)."""
    size = num_experts if chunk <= 0 or chunk >= num_experts else chunk
    return [range(start, min(start + size, num_experts)) for start in range(0, num_experts, size)]


def layer_passes(spec: LayerSpec, num_experts: int, chunk: int, true_sequential: bool) -> list[Pass]:
    """The capture passes of a layer with `num_experts` experts per expert list (0: dense), `chunk` experts held at
    once (≤ 0: all)."""
    groups = list(spec.groups)
    if not true_sequential:
        runs: list[list[tuple[Unit, ...]]] = [groups]
    else:
        runs = []
        for group in groups:  # consecutive groups holding experts are cut together (gate/up then down per chunk)
            if _has_experts([group], spec) and runs and _has_experts(runs[-1], spec):
                runs[-1].append(group)
            else:
                runs.append([group])
    passes: list[Pass] = []
    for run in runs:
        if not _has_experts(run, spec):
            passes += [Pass((g,)) for g in run] if true_sequential else [Pass(tuple(run))]
            continue
        chunks = chunk_ranges(num_experts, chunk)
        for k, experts in enumerate(chunks):
            last = k == len(chunks) - 1
            cut = [tuple(u for u in g if (expert_of(u, spec) in experts) or (last and expert_of(u, spec) is None))
                   for g in run]
            cut = [g for g in cut if g]
            if true_sequential:
                passes += [Pass((g,), experts, k, step) for step, g in enumerate(cut)]
            else:
                passes.append(Pass(tuple(cut), experts, k))
    return passes


def _has_experts(groups: list[tuple[Unit, ...]], spec: LayerSpec) -> bool:
    return any(expert_of(u, spec) is not None for g in groups for u in g)


def pass_stop(spec: LayerSpec, groups: tuple[tuple[Unit, ...], ...]) -> tuple[str, str]:
    """Where a pass over `groups` (whole groups of the spec or parts of them) may stop: the stop of the deepest
    spec group any of its units belongs to."""
    depth = {u: k for k, group in enumerate(spec.groups) for u in group}
    return spec.stops[max(depth[u] for g in groups for u in g)]
