"""The layer-wise engine a stage runs: for each of its decoder layers, capture the layer's inputs,
quantize its linears in sequential groups, checkpoint the packed tensors, and run the quantized layer
to produce the next layer's inputs. Memory holds one layer plus one activation batch at a time;
activations between passes live in an ActivationStore (in memory, or Ray's object store)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Iterator, Protocol

import torch
from torch import nn

from quantizer.activations import ActivationChunk, ActivationStore, TokenBatch
from quantizer.config import FALLBACK_DAMP_PERCENT, QuantConfig
from quantizer.decoder import LayerSpec, Unit
from quantizer.experts import ExpertList
from quantizer.errors import ConfigError
from quantizer.gptq import Factorization, factorize
from quantizer.hessian import HessianAccumulator
from quantizer.host_memory import peak_rss_mb, release_free_heap, resident_mb
from quantizer.layer_builder import (
    build_float_layer, build_quantized_layer, compute_architecture, load_float, pad_mlp, padded_intermediate,
    quantized_linear, set_submodule,
)
from quantizer.layer_inputs import LayerInputs, layer_output
from quantizer.model_io import CheckpointReader
from quantizer.packing import pack_result
from quantizer.passes import (Pass, expert_of, experts_label, experts_progress, layer_passes, part_after, pass_stop,
                              streamed)
from quantizer.result import QuantResult
from quantizer.solvers import LocalSolver, Solver, SolveJob, solve_share, split_rows

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    layer: int
    losses: dict[str, float] = field(default_factory=dict)  # linear name → output MSE per token
    cholesky_fallbacks: dict[str, str] = field(default_factory=dict)  # linear name → fallback used, if any
    expert_tokens: list[int] = field(default_factory=list)  # MoE: calibration tokens routed to each expert
    hessian_tokens: dict[str, int] = field(default_factory=dict)  # MoE: tokens in each expert unit's Hessian
    expert_fallbacks: dict[str, str] = field(default_factory=dict)  # MoE: unit → fallback used and why
    experts_per_chunk: int = 0  # MoE: experts whose float weights were held at once
    chunk_seconds: list[float] = field(default_factory=list)  # MoE: wall of each expert chunk (load, capture, solve)
    chunk_rss_mb: list[float] = field(default_factory=list)  # MoE, stage schedules: resident MB after each chunk
    seconds: float = 0.0
    resumed: bool = False  # replayed whole from its checkpoint
    resumed_at_pass: int = 0  # continued from part checkpoints after this many passes (streamed experts)
    started: float = 0.0  # wall-clock (time.time()) start and end, for timelines across stages
    finished: float = 0.0
    peak_rss_mb: float = 0.0
    # stage schedules: seconds in each phase (cluster.timeline's names: load, capture — Hessians included —, solve —
    # results applied included —, forward through the quantized layer, save — what was left of the checkpoint write)
    phase_seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def timing(self, phase: str) -> Iterator[None]:
        """Add the seconds the block takes to `phase`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + time.perf_counter() - start

    @property
    def loss(self) -> float:
        return sum(self.losses.values())


@dataclass
class StagePhase:
    """What a stage is doing now (streamed to the driver between LayerReports, for progress); in a layer whose
    experts are streamed, how many of them are finished (the driver's estimate before the first layer ends)."""
    layer: int
    what: str
    experts_done: int = 0
    experts: int = 0  # 0: not a pass over streamed experts


@dataclass
class LayerParts:
    """What the part files of an unfinished layer hold together: the packed tensors so far, the report as of the
    last part, and the engine's state at that point (`LayerWork.resume` reads it)."""
    tensors: dict[str, torch.Tensor]
    report: LayerReport
    state: dict[str, Any]


class LayerStore(Protocol):
    """Per-layer checkpoints that make a stage resumable, and parts of an unfinished layer (see LayerWork.resume)."""

    def has(self, index: int) -> bool: ...

    def load(self, index: int) -> tuple[dict[str, torch.Tensor], LayerReport] | None: ...

    def save(self, index: int, tensors: dict[str, torch.Tensor], report: LayerReport) -> None: ...

    def save_part(self, index: int, part: int, tensors: dict[str, torch.Tensor], report: str,
                  state: dict[str, Any]) -> None: ...

    def load_parts(self, index: int) -> LayerParts | None: ...

    def remove_parts(self, index: int) -> None: ...


@dataclass
class BlockInputs:
    """The inputs of a sparse layer's experts block (`block`, the module holding the experts), per calibration
    batch, recorded by the first pass over the experts. Later passes over other chunks of experts run the block
    alone on them instead of the whole layer: what precedes the block is settled by then, so each expert sees
    the same inputs, to the bit."""
    block: str
    calls: list[tuple[tuple, dict]] | None = None  # per batch: the block's (args, kwargs)


class _StopForward(Exception):
    """Raised from a capture hook once the last needed input was seen: the rest of the layer is skipped."""


def output_dtype(source: torch.dtype) -> torch.dtype:
    """Float tensors keep a half-precision source dtype; float32 sources are written as float16."""
    return source if source in (torch.float16, torch.bfloat16) else torch.float16


def _names(groups: tuple[tuple[Unit, ...], ...]) -> str:
    """"q_proj+k_proj+v_proj, o_proj" or, for a sparse layer's expert group, "8 × gate_proj+up_proj"."""
    def unit(u: Unit) -> str:
        return "+".join(name.rpartition(".")[2] for name in u)
    return ", ".join(unit(g[0]) if len(g) == 1 else f"{len(g)} × {unit(g[0])}" for g in groups)


class StageEngine:
    """Quantizes decoder layers `layers` of the checkpoint behind `reader`."""

    def __init__(self, reader: CheckpointReader, layers: range, qcfg: QuantConfig, store: ActivationStore,
                 layer_store: LayerStore | None = None, device: str = "cpu",
                 compute_dtype: torch.dtype = torch.float32, solver: Solver | None = None,
                 emit_outputs: bool = True) -> None:
        """emit_outputs: whether anything reads the last layer's quantized outputs (False for the job's last stage:
        its last layer is then not run forward, one layer's forward saved)."""
        self.reader, self.layers, self.qcfg = reader, layers, qcfg
        self.emit_outputs = emit_outputs
        self.arch = compute_architecture(reader, qcfg)
        self.store, self.layer_store = store, layer_store
        self.solver = solver or LocalSolver()
        self.device, self.dtype = torch.device(device), compute_dtype
        self.intermediate = padded_intermediate(reader.config, qcfg.pad_intermediate_to)
        self.out_dtype = output_dtype(reader.embedding_info().dtype_torch)
        # the model's own code computes each layer's masks and rotary inputs; it needs the tensors outside the
        # layers its forward touches before the first layer (GPT-2's position table, …), not the embedding table
        others = [n for n in reader.outside_layers() if n not in reader.head_names()
                  and reader.arch.names.to_module[n] != self.arch.embed + ".weight"]
        self.inputs = LayerInputs(self.arch, compute_dtype, self.device, reader.load_modules(others))
        self._mask: torch.Tensor | None = None
        self._embedding_loaded = False
        self._tokens = 0  # real tokens of the last capture pass
        self.block_input: HessianAccumulator | None = None  # moe_calibration auto: the last pass's block input
        self.hessian_seconds = 0.0  # time spent adding to Hessians, all passes so far
        self.background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-io")  # reads and writes
        self._prefetched: tuple[tuple[int, bool], Future] | None = None  # (index, streamed), its float state

    # ---- inputs -----------------------------------------------------------------------------------
    def embed(self, batch: TokenBatch) -> ActivationChunk:
        """Token ids → first-layer hidden states, as the model computes them (the first stage only). The table
        stays in the checkpoint dtype (a 152k × 8192 vocabulary is 2.5 GB in bf16, 5 GB in fp32); looked-up rows
        are cast, exactly."""
        if not self._embedding_loaded:
            self.inputs.set_embedding(self.reader.embedding_weight())
            self._embedding_loaded = True
        hidden = self.inputs(batch.mask, input_ids=batch.input_ids, upto=0)[0].hidden.to(self.dtype)
        return ActivationChunk(hidden, batch.mask.to(self.device))

    # ---- forward passes ---------------------------------------------------------------------------
    def _set_mask(self, layer: nn.Module, chunk: ActivationChunk) -> None:
        """The batch's real tokens, for the Hessian hooks and the experts (which see real tokens only)."""
        self._mask = chunk.mask
        for experts in _experts(layer):
            experts.token_mask = chunk.mask

    def _run(self, layer: nn.Module, index: int, chunk: ActivationChunk) -> torch.Tensor:
        """Layer `index` on one batch, with the inputs the model computes for it."""
        hidden = chunk.hidden.to(self.device, self.dtype)
        self._set_mask(layer, chunk)
        with torch.inference_mode():
            call = self.inputs(chunk.mask, upto=index)[index]
            return layer_output(call.run(layer, hidden))

    def _run_block(self, layer: nn.Module, block: str, chunk: ActivationChunk, args: tuple, kwargs: dict) -> None:
        """The experts block alone, on its recorded inputs for `chunk` (see BlockInputs)."""
        self._set_mask(layer, chunk)
        with torch.inference_mode():
            layer.get_submodule(block)(*args, **kwargs)

    def forward_layer(self, layer: nn.Module, index: int, chunk: ActivationChunk) -> ActivationChunk:
        return ActivationChunk(self._run(layer, index, chunk), chunk.mask)

    def float_layer(self, index: int, streamed: bool = False) -> nn.Module:
        """Layer `index` in float; `streamed`: its experts' weights are left out (on the meta device), loaded a
        chunk at a time by LayerWork. Its weights come from `prefetch` when that read them already."""
        ahead, self._prefetched = self._prefetched, None
        state = ahead[1].result() if ahead is not None and ahead[0] == (index, streamed) else \
            self._float_state(index, streamed)
        return build_float_layer(self.arch, index, state, self.dtype, self.device, self._absent(index, streamed))

    def _absent(self, index: int, streamed: bool) -> Callable[[str], bool] | None:
        """Which of layer `index`'s modules are left out of its float weights: its experts when `streamed`."""
        spec = self.arch.spec(index)
        return (lambda name: expert_of(name, spec) is not None) if streamed else None

    def _float_state(self, index: int, streamed: bool) -> dict[str, torch.Tensor]:
        """Layer `index`'s float weights as read from the checkpoint (without its experts when `streamed`)."""
        absent = self._absent(index, streamed)
        state = self.reader.layer_state(index, None if absent is None else lambda name: not absent(name))
        if self.arch is not self.reader.arch and not self.arch.is_sparse(index):
            state = pad_mlp(state, self.intermediate)
        return state

    def prefetch(self, index: int) -> None:
        """Start reading layer `index`'s float weights in the background — while the layer before it runs its
        output forward — for `float_layer` to take (a sparse layer's: without its experts, read per chunk)."""
        if index in self.layers:
            streamed = self.arch.spec(index).sparse
            self._prefetched = ((index, streamed), self.background.submit(self._float_state, index, streamed))

    def runs_forward(self, index: int) -> bool:
        """Whether layer `index`'s quantized outputs are computed: not the last layer's without `emit_outputs`."""
        return self.emit_outputs or index != self.layers[-1]

    # ---- quantization -----------------------------------------------------------------------------
    def quantize(self, inputs: list[Any]) -> Iterator[LayerReport | StagePhase]:
        """Quantize every layer of the stage. `inputs` are store handles of the first layer's inputs.

        Yields what it is doing (StagePhase) and one report per finished layer; afterwards `self.outputs`
        holds the handles of the last layer's outputs (none without `emit_outputs`).
        """
        handles = inputs
        for index in self.layers:
            report = LayerReport(layer=index, started=time.time())
            start = time.perf_counter()
            saved = self.layer_store.load(index) if self.layer_store else None
            if saved is not None:
                tensors, old = saved
                report = dataclasses.replace(old, resumed=True, started=report.started)
            else:
                tensors = yield from self._quantize_layer(index, handles, report)
            saving = None
            if saved is None and self.layer_store:  # written while the forward runs (it only reads the tensors)
                saving = self.background.submit(self.layer_store.save, index, tensors, dataclasses.replace(
                    report, seconds=time.perf_counter() - start, peak_rss_mb=peak_rss_mb(),
                    phase_seconds=dict(report.phase_seconds)))  # the forward's and the save's are added meanwhile
            if not (self.layer_store and self.layer_store.has(index + 1)):
                self.prefetch(index + 1)
            if not self.runs_forward(index):
                handles = []
            else:
                yield StagePhase(index, "forward through the quantized layer" if saved is None else
                                 "replaying the finished layer from its checkpoint")
                with report.timing("forward"):
                    layer = build_quantized_layer(self.arch, index, tensors, self.qcfg, self.dtype, self.device)
                    handles = [self.store.put(self.forward_layer(layer, index, self.store.get(h))) for h in handles]
            if saving is not None:
                yield StagePhase(index, "writing the layer's checkpoint")
                with report.timing("save"):
                    saving.result()
            report.seconds = time.perf_counter() - start
            report.finished = time.time()
            report.peak_rss_mb = peak_rss_mb()
            yield report
        self.outputs = handles

    def _quantize_layer(self, index: int, handles: list[Any], report: LayerReport
                        ) -> Generator[StagePhase, None, dict[str, torch.Tensor]]:
        yield StagePhase(index, "loading float weights")
        with report.timing("load"):
            work = LayerWork(self, index, report)
            done = work.resume(self.layer_store) if self.layer_store and work.streamed else 0
        saving: Future | None = None
        for k, step in enumerate(work.passes[done:], start=done):
            start = time.perf_counter()
            where, experts = work.describe(step), experts_progress(step, work.num_experts)
            yield StagePhase(index, f"{where}calibration forward ({len(handles)} batches) for {_names(step.groups)}",
                             *experts)
            with report.timing("capture"):
                accs = work.capture(step, handles)
            for group in step.groups:
                yield StagePhase(index, f"{where}solving {_names((group,))}", *experts)
                with report.timing("solve"):
                    for name, result in self._solve_group(work.layer, group, accs, report):
                        work.apply(name, result)
            del accs
            work.timed(step, time.perf_counter() - start)
            if self.layer_store and work.resume_point(k):  # written while the next chunk runs
                if saving is not None:
                    saving.result()
                saving = self.background.submit(self.layer_store.save_part, index, *work.part(k + 1))
        if saving is not None:
            saving.result()
        return work.finish()

    def _capture(self, layer: nn.Module, index: int, groups: tuple[tuple[Unit, ...], ...], handles: list[Any],
                 expert_tokens: list[int] | None = None, replay: BlockInputs | None = None
                 ) -> dict[Unit, HessianAccumulator]:
        """One pass over all batches, accumulating the input Hessian of each unit. An expert calibrated on
        every token has, for gate/up, the experts' input: one accumulator serves all such experts; for
        down_proj, the expert runs on every token. moe_calibration "auto" decides per expert from its routed
        tokens (`expert_tokens`, counted in an earlier pass; for gate/up, this pass's own count): every token
        when they are fewer than the projection's inputs. The pass stops once the last unit's inputs are
        seen (after the experts when that unit is one of theirs). With `replay`, the pass records the experts
        block's inputs (first time) or runs the block alone on the recorded ones."""
        spec = self.arch.spec(index)
        accs: dict[Unit, HessianAccumulator] = {}
        shared: HessianAccumulator | None = None
        hooks = []

        def accumulate(acc: HessianAccumulator):
            def hook(_module, args):
                start = time.perf_counter()
                x = args[0]  # [B, T, in] (or [B·T, in]) with padding; [tokens, in] inside the experts (none)
                mask = self._mask if x.shape[:-1].numel() == self._mask.numel() else None
                acc.add(x, mask)
                self.hessian_seconds += time.perf_counter() - start
            return hook

        mode = self.qcfg.moe_calibration
        experts = _experts(layer)
        for group in groups:
            for unit in group:
                module = layer.get_submodule(unit[0])
                if experts and mode != "routed" and _expert_input_unit(unit, spec):
                    if shared is None:  # the experts' own input: no expert needs to run for it
                        shared = HessianAccumulator(module.in_features, self.device)
                        hooks.append(_hook_experts_input(layer, spec.experts[0], accumulate(shared)))
                    if mode == "all":
                        accs[unit] = shared
                        continue
                acc = accs[unit] = HessianAccumulator(module.in_features, self.device)
                hooks.append(module.register_forward_pre_hook(accumulate(acc)))

        def stop(*_):
            raise _StopForward

        where, kind = pass_stop(spec, groups)
        stop_at = layer.get_submodule(where)
        hooks.append(stop_at.register_forward_hook(stop) if kind == "post" else stop_at.register_forward_pre_hook(stop))
        down_units = [u for g in groups for u in g if _in_experts(u, spec) and not _expert_input_unit(u, spec)]
        if experts and down_units:  # experts run on every token only where their own inputs are captured
            block = experts[0]
            if mode == "all" or (mode == "auto" and not expert_tokens):
                block.every_token = frozenset(range(block.num_experts))
            elif mode == "auto":  # too few routed tokens for a full-rank down_proj Hessian
                block.every_token = frozenset(e for e, n in enumerate(expert_tokens) if n < block.width)
            if block.every_token and block.scaled_input:  # Llama 4: the experts' input is router-scaled
                hooks.append(_hook_experts_input(layer, spec.experts[0], None))
        calls: list[tuple[tuple, dict]] = []
        if replay is not None and replay.calls is None:
            hooks.append(layer.get_submodule(replay.block).register_forward_pre_hook(
                lambda _m, args, kwargs: calls.append((args, kwargs)), with_kwargs=True))
        self._tokens = 0  # real tokens in this pass: what an expert's Hessian share is measured against
        try:
            for k, h in enumerate(handles):
                chunk = self.store.get(h)
                self._tokens += int(chunk.mask.sum())
                try:
                    if replay is not None and replay.calls is not None:
                        self._run_block(layer, replay.block, chunk, *replay.calls[k])
                    else:
                        self._run(layer, index, chunk)
                except _StopForward:
                    pass
            if replay is not None and replay.calls is None:
                if len(calls) != len(handles):
                    raise RuntimeError(f"layer {index}: the experts block {replay.block} ran {len(calls)} times on "
                                       f"{len(handles)} batches")
                replay.calls = calls
        finally:
            for hook_handle in hooks:
                hook_handle.remove()
            for block in experts:
                block.every_token, block.block_tokens = frozenset(), None
        self.block_input = shared if mode == "auto" else None  # the every-token option LayerWork.settle weighs
        return accs

    def _solve_group(self, layer: nn.Module, group: tuple[Unit, ...], accs: dict[Unit, HessianAccumulator],
                     report: LayerReport) -> Iterator[tuple[str, QuantResult]]:
        """Solve each unit of a group as one stacked weight on this engine's solver, and split the rows back
        by module. Jobs are made as the solver asks for them (one stacked weight at a time in this process);
        units sharing a Hessian share its factorization; experts with too few tokens fall back."""
        for job, result in self.solver.solve(self._jobs(layer, group, accs, report), self.qcfg):
            widths = [layer.get_submodule(name).weight.shape[0] for name in job.names]
            yield from split_rows(job.names, result, widths).items()

    def solve_shares(self, layer: nn.Module, group: tuple[Unit, ...], accs: dict[Unit, HessianAccumulator],
                     report: LayerReport, part: int, parts: int) -> list[tuple[Unit, QuantResult]]:
        """Share `part` of `parts` of each unit's stacked rows (`row_shares`), solved against the unit's whole
        Hessian: (unit, result of those rows); units too narrow to have that share are left out."""
        shares = []
        for job in self._jobs(layer, group, accs, report):
            result = solve_share(job, self.qcfg, part, parts)
            if result is not None:
                shares.append((job.names, result))
        return shares

    def _jobs(self, layer: nn.Module, group: tuple[Unit, ...], accs: dict[Unit, HessianAccumulator],
              report: LayerReport) -> Iterator[SolveJob]:
        facts: dict[int, Factorization] = {}
        for unit in group:
            weights = [layer.get_submodule(name).weight.detach().float() for name in unit]
            for name, w in zip(unit, weights):
                self.qcfg.check_in_features(name, w.shape[1])
            acc, stacked = accs[unit], torch.cat(weights)
            del weights
            if acc.xtx is not None and acc.count and not torch.isfinite(acc.xtx).all():  # (a shared one: once)
                raise ConfigError(f"layer {report.layer}: the inputs of {'+'.join(unit)} hold NaN/Inf — the float "
                                  "model's own activations overflow on the calibration text; check the model files "
                                  "and their dtype (an fp16 copy of a bf16 model overflows)")
            fallback = self._expert_fallback(unit, acc, self._tokens, report)
            if self.qcfg.method == "rtn" or fallback == "rtn":
                yield SolveJob(unit, stacked, None, acc.hessian() if acc.count else None)
            elif fallback == "damp":
                cfg = dataclasses.replace(self.qcfg, damp_percent=max(self.qcfg.damp_percent, FALLBACK_DAMP_PERCENT))
                yield SolveJob(unit, stacked, factorize(acc, cfg, copy=True), cfg=cfg)
            else:
                shared = sum(other is acc for other in accs.values()) > 1
                if id(acc) not in facts:  # H inverted once per accumulator; a lone one hands H over
                    fact = factorize(acc, self.qcfg, copy=False)
                    if not shared:
                        yield SolveJob(unit, stacked, fact)
                        continue
                    facts[id(acc)] = fact
                yield SolveJob(unit, stacked, facts[id(acc)])

    def _expert_fallback(self, unit: Unit, acc: HessianAccumulator, total: int, report: LayerReport) -> str | None:
        """For an expert unit whose Hessian saw fewer than moe_min_token_fraction of the layer's tokens:
        the configured fallback ("rtn" or "damp"), recorded in the report and the log."""
        if not _in_experts(unit, self.arch.spec(report.layer)):
            return None
        report.hessian_tokens[unit[0]] = acc.count
        needed = self.qcfg.moe_min_token_fraction * total
        if acc.count >= needed and acc.count > 0:
            return None
        how = self.qcfg.moe_fallback
        report.expert_fallbacks[unit[0]] = f"{how}: {acc.count} tokens < {needed:.0f}"
        log.warning("layer %d %s saw %d calibration tokens (< %.0f, moe_min_token_fraction %.3g): %s", report.layer,
                    unit[0], acc.count, needed, self.qcfg.moe_min_token_fraction,
                    "round-to-nearest" if how == "rtn" else f"GPTQ with damp_percent {FALLBACK_DAMP_PERCENT}")
        return "rtn" if acc.count == 0 else how


class LayerWork:
    """One layer being quantized: its float modules (replaced by their quantized values as results arrive),
    its capture passes, and the packed tensors and report so far. A stage drives it alone; data-parallel
    workers each hold one and exchange only Hessians and results."""

    def __init__(self, engine: StageEngine, index: int, report: LayerReport) -> None:
        self.engine, self.index, self.report = engine, index, report
        self.spec = engine.arch.spec(index)
        self.layer = engine.float_layer(index, streamed=self.spec.sparse)
        self.num_experts = engine.arch.num_experts(index)
        self.passes = layer_passes(self.spec, self.num_experts, engine.qcfg.experts_per_chunk,
                                   engine.qcfg.true_sequential)
        start_chunks(report, self.passes)
        self.streamed = streamed(self.passes)  # experts read per chunk
        self.floating: set[int] = set()  # experts whose float weights are loaded
        self.counted_before: dict[int, bool] = {}  # pass step → routed counts were known at the first chunk's pass
        blocks = {name.rpartition(".")[0] for name in self.spec.experts}
        self.block_inputs = BlockInputs(blocks.pop()) if len(blocks) == 1 and len(self.passes) > 1 else None
        self.tensors: dict[str, torch.Tensor] = {}
        self._checkpointed: set[str] = set()  # tensors already in a part checkpoint
        self._parts = 0  # part checkpoints written (or resumed from)

    def describe(self, step: Pass) -> str:
        """"experts 32-63 of 256: " for a pass over a chunk of the experts ("" otherwise)."""
        label = experts_label(step, self.num_experts)
        return f"{label}: " if label else ""

    def timed(self, step: Pass, seconds: float) -> None:
        """A pass is done: its freed memory goes back to the OS, its time and the resident size are recorded."""
        release_free_heap()
        if step.chunk is not None:
            self.report.chunk_seconds[step.chunk] += seconds
            rss = self.report.chunk_rss_mb
            rss.extend([0.0] * (step.chunk + 1 - len(rss)))
            rss[step.chunk] = max(rss[step.chunk], resident_mb())

    def resume_point(self, k: int) -> bool:
        """Whether the layer is checkpointed after pass k (passes.part_after)."""
        return part_after(self.passes, k)

    def _layout(self) -> str:
        """A digest of how the layer is cut into passes (units and experts) and computed (dtype, device): parts
        written under another chunk size, or in another precision, do not resume."""
        what = f"{self.passes!r} {self.engine.dtype} {self.engine.device.type}"
        return hashlib.sha256(what.encode()).hexdigest()[:16]

    def part(self, passes: int) -> tuple[int, dict[str, torch.Tensor], str, dict[str, Any]]:
        """The next part checkpoint once `passes` passes are done: (part number, the packed tensors new since the
        last part, the report's JSON, the state `resume` restores)."""
        new = {k: v for k, v in self.tensors.items() if k not in self._checkpointed}
        self._checkpointed.update(new)
        number, self._parts = self._parts, self._parts + 1
        state = {"part": number, "passes": passes, "layout": self._layout(),
                 "counted_before": {str(k): v for k, v in self.counted_before.items()}}
        return number, new, json.dumps(dataclasses.asdict(self.report)), state

    def resume(self, store: LayerStore) -> int:
        """Continue from the layer's part checkpoints, if any: their packed tensors, report and state; the units
        solved so far take their quantized values (experts already solved become QuantLinear modules, as after
        their chunk in an uninterrupted run). Returns the passes already done (0: start from the first)."""
        saved = store.load_parts(self.index)
        if saved is None:
            return 0
        done = int(saved.state["passes"])
        if done > len(self.passes) or saved.state["layout"] != self._layout():
            log.warning("layer %d: its part checkpoints were cut into other passes (another experts_per_chunk) or "
                        "computed in another dtype or device; quantizing the layer from its start", self.index)
            store.remove_parts(self.index)
            return 0
        for f in dataclasses.fields(LayerReport):
            if f.name not in ("layer", "started"):
                setattr(self.report, f.name, getattr(saved.report, f.name))
        self.report.resumed_at_pass = done
        self.counted_before = {int(k): v for k, v in saved.state["counted_before"].items()}
        self.tensors = saved.tensors
        self._checkpointed, self._parts = set(self.tensors), int(saved.state["part"]) + 1
        solved = {name for name in self.spec.linears if f"{name}.qweight" in self.tensors}
        for name in solved:
            if expert_of(name, self.spec) is None:
                self.layer.get_submodule(name).weight.data = self._packed(name).dequantized_weight(self.engine.dtype)
        self._pack_experts({e for name in solved if (e := expert_of(name, self.spec)) is not None})
        log.info("layer %d resumes after pass %d of %d (%d packed tensors from its part checkpoints)", self.index,
                 done, len(self.passes), len(self.tensors))
        return done

    def _packed(self, name: str) -> nn.Module:
        """Projection `name` as a QuantLinear of its packed tensors (dequantized per call)."""
        return quantized_linear(self.tensors, name, self.engine.qcfg, self.engine.dtype, self.engine.device,
                                cache_weight=False)

    def _pack_experts(self, experts: set[int]) -> None:
        """Experts whose every unit is solved become QuantLinear modules of their packed tensors."""
        for name in self.spec.linears:
            if expert_of(name, self.spec) in experts:
                set_submodule(self.layer, name, self._packed(name))

    def hold_experts(self, experts: range) -> None:
        """Float weights for `experts` (read from disk), and none for the others: experts whose every unit is
        solved become QuantLinear modules of their packed tensors (later passes and forwards still run them)."""
        self._pack_experts(self.floating - set(experts))
        self.floating &= set(experts)
        quantized = {expert_of(name, self.spec) for name in self.spec.linears if f"{name}.qweight" in self.tensors}
        need = set(experts) - self.floating - quantized
        if not need:
            return
        state = self.engine.reader.layer_state(self.index, lambda name: expert_of(name, self.spec) in need)
        for block in self.spec.experts:
            for e in sorted(need):
                prefix = f"{block}.{e}."
                own = {k[len(prefix):]: state.pop(k) for k in list(state) if k.startswith(prefix)}
                load_float(self.layer.get_submodule(prefix[:-1]), own, self.engine.dtype, self.engine.device)
        self.floating |= need

    def capture(self, step: Pass, handles: list[Any], settle: bool = True) -> dict[Unit, HessianAccumulator]:
        """The pass's Hessians over `handles`; the first pass through a sparse block counts routed tokens.
        With `settle=False` (a data-parallel worker, which holds a share of the calibration) the auto
        calibration's choice for gate/up is left to `settle`, made on the counts of the whole calibration."""
        expert_tokens = self.report.expert_tokens
        if step.experts is not None:
            self.hold_experts(step.experts)
            # every chunk decides as the first chunk did (moe_calibration auto: before the routed tokens are
            # counted, down_proj takes every token), so chunked = unchunked
            known = self.counted_before.setdefault(step.step, bool(expert_tokens))
            expert_tokens = expert_tokens if known else []
        pass_groups = step.groups
        experts = _experts(self.layer)
        counting = bool(experts) and not self.report.expert_tokens and any(
            _in_experts(u, self.spec) for g in pass_groups for u in g)
        if counting:
            experts[0].routed_tokens = None
        inside = self.block_inputs is not None and step.experts is not None and all(
            u[0].startswith(self.block_inputs.block + ".") for g in pass_groups for u in g)
        if step.experts is not None:  # only the chunk's experts run: the pass reads nothing past the experts
            for block in experts:
                block.active = frozenset(step.experts)
        try:
            accs = self.engine._capture(self.layer, self.index, pass_groups, handles, expert_tokens,
                                        self.block_inputs if inside else None)
        finally:
            for block in experts:
                block.active = None
        if not any(p.experts is not None for p in self.passes[self.passes.index(step) + 1:]):
            self.block_inputs = None  # the last pass over the experts: their recorded inputs are done with
        if counting:
            routed = experts[0].routed_tokens
            self.report.expert_tokens = [int(t) for t in (routed if routed is not None
                                                          else torch.zeros(experts[0].num_experts))]
        return self.settle(accs) if settle else accs

    def routed_counts(self, accs: dict[Unit, HessianAccumulator]) -> dict[Unit, int]:
        """{gate/up unit: routed tokens in its Hessian} of the units `settle` decides (auto calibration)."""
        if self.engine.block_input is None:
            return {}
        return {unit: acc.count for unit, acc in accs.items() if _expert_input_unit(unit, self.spec)}

    def settle(self, accs: dict[Unit, HessianAccumulator], routed: dict[Unit, int] | None = None
               ) -> dict[Unit, HessianAccumulator]:
        """moe_calibration auto: an expert's gate/up takes every token (the block input's Hessian) when fewer
        were routed to it than the projection has inputs (a rank-deficient Hessian). `routed`: {unit: tokens}
        over the whole calibration (default: this pass's own counts, `routed_counts`)."""
        shared = self.engine.block_input
        if shared is None:
            return accs
        routed = routed if routed is not None else self.routed_counts(accs)
        self.engine.block_input = None
        return {unit: shared if unit in routed and routed[unit] < acc.xtx.shape[0] else acc
                for unit, acc in accs.items()}

    def apply(self, name: str, result: QuantResult) -> None:
        """Use the quantized weights from here on (later passes see them) and keep the packed tensors."""
        _check_finite(name, self.index, result)
        module = self.layer.get_submodule(name)
        module.weight.data = result.dequantize().to(self.engine.dtype)
        self.tensors.update(pack_result(result, self.engine.qcfg.bits).tensors(name))
        if module.bias is not None:
            self.tensors[f"{name}.bias"] = module.bias.detach().half()
        self.report.losses[name] = result.loss
        if result.cholesky_fallback:
            self.report.cholesky_fallbacks[name] = result.cholesky_fallback

    def finish(self) -> dict[str, torch.Tensor]:
        """The layer's checkpoint tensors: packed projections plus every float parameter left."""
        linears = set(self.spec.linears)
        buffers = {name for name, _ in self.layer.named_buffers()}
        reader, prefix = self.engine.reader, self.engine.arch.layer_prefix(self.index)
        for name, tensor in self.layer.state_dict().items():
            if name.rpartition(".")[0] in linears:
                continue
            if name in buffers:  # persistent buffers (DeepSeek's score-correction bias) keep their stored dtype
                dtype = reader.tensors[reader.arch.names.disk_name(f"{prefix}.{name}")].dtype_torch
            else:  # float parameters in the output dtype
                dtype = self.engine.out_dtype
            self.tensors[name] = tensor.detach().to(dtype)
        log.debug("layer %d quantized: loss %.4g", self.index, self.report.loss)
        return {k: v.contiguous().cpu() for k, v in self.tensors.items()}


def start_chunks(report: LayerReport, passes: list[Pass]) -> None:
    """The report's chunk size and one chunk_seconds slot per expert chunk of `passes` (a sparse layer)."""
    chunks = {step.experts for step in passes if step.experts is not None}
    if chunks:
        report.experts_per_chunk = max(len(r) for r in chunks)
        report.chunk_seconds = [0.0] * len(chunks)


def _experts(layer: nn.Module) -> list[ExpertList]:
    return [m for m in layer.modules() if isinstance(m, ExpertList)]


def _in_experts(unit: Unit, spec: LayerSpec) -> bool:
    """A unit of one of the layer's experts."""
    return any(unit[0].startswith(e + ".") for e in spec.experts)


def _expert_input_unit(unit: Unit, spec: LayerSpec) -> bool:
    """An expert's gate/up unit (it reads the experts' input)."""
    return _in_experts(unit, spec) and unit[0].rpartition(".")[2] in ("gate_proj", "up_proj")


def _hook_experts_input(layer: nn.Module, name: str, hook):
    """A pre-hook seeing the experts' input [tokens, H] with padding (the experts' own input, or for
    router-scaled experts, Llama 4's, the block's input, which it also keeps as the experts' `block_tokens`)."""
    experts = layer.get_submodule(name)
    if not experts.scaled_input:
        return experts.register_forward_pre_hook(hook)
    block = layer.get_submodule(name.rpartition(".")[0])

    def on_block(module, args):
        x = args[0].reshape(-1, args[0].shape[-1])
        mask = experts.token_mask
        experts.block_tokens = x if mask is None or mask.numel() != x.shape[0] else x[mask.reshape(-1).to(x.device)]
        if hook is not None:
            hook(module, (args[0],))
    return block.register_forward_pre_hook(on_block)


def _check_finite(name: str, index: int, result: QuantResult) -> None:
    """No NaN or Inf reaches a checkpoint: a non-finite scale means the solve diverged."""
    if not torch.isfinite(result.scales.float()).all():
        raise RuntimeError(f"layer {index} {name}: the solve produced non-finite scales (NaN/Inf); check the "
                           "calibration data, or raise damp_percent")
