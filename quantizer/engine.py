"""The layer-wise engine a stage runs: for each of its decoder layers, capture the layer's inputs,
quantize its linears in sequential groups, checkpoint the packed tensors, and run the quantized layer
to produce the next layer's inputs. Memory holds one layer plus one activation batch at a time;
activations between passes live in an ActivationStore (in memory, or Ray's object store)."""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Generator, Iterator, Protocol

import torch
from torch import nn

from quantizer.activations import ActivationChunk, ActivationStore, TokenBatch
from quantizer.config import QuantConfig
from quantizer.gptq import gptq_quantize
from quantizer.hessian import HessianAccumulator
from quantizer.layer_builder import (
    AttentionInputs, build_float_layer, build_quantized_layer, compute_config, pad_mlp, padded_intermediate,
)
from quantizer.model_io import CheckpointReader
from quantizer.packing import pack_result
from quantizer.result import QuantResult
from quantizer.rtn import rtn_quantize

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    layer: int
    losses: dict[str, float] = field(default_factory=dict)  # linear name → output MSE per token
    cholesky_fallbacks: dict[str, str] = field(default_factory=dict)  # linear name → fallback used, if any
    seconds: float = 0.0
    resumed: bool = False
    started: float = 0.0  # wall-clock (time.time()) start and end, for timelines across stages
    finished: float = 0.0
    peak_rss_mb: float = 0.0

    @property
    def loss(self) -> float:
        return sum(self.losses.values())


@dataclass
class StagePhase:
    """What a stage is doing now (streamed to the driver between LayerReports, for progress)."""
    layer: int
    what: str


class LayerStore(Protocol):
    """Per-layer checkpoints that make a stage resumable."""

    def load(self, index: int) -> tuple[dict[str, torch.Tensor], LayerReport] | None: ...

    def save(self, index: int, tensors: dict[str, torch.Tensor], report: LayerReport) -> None: ...


class _StopForward(Exception):
    """Raised from a capture hook once the last needed input was seen: the rest of the layer is skipped."""


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def output_dtype(source: torch.dtype) -> torch.dtype:
    """Float tensors keep a half-precision source dtype; float32 sources are written as float16."""
    return source if source in (torch.float16, torch.bfloat16) else torch.float16


def _names(groups: list[tuple[str, ...]]) -> str:
    return ", ".join("+".join(name.rpartition(".")[2] for name in group) for group in groups)


class StageEngine:
    """Quantizes decoder layers `layers` of the checkpoint behind `reader`."""

    def __init__(self, reader: CheckpointReader, layers: range, qcfg: QuantConfig, store: ActivationStore,
                 layer_store: LayerStore | None = None, device: str = "cpu",
                 compute_dtype: torch.dtype = torch.float32) -> None:
        self.reader, self.arch, self.layers, self.qcfg = reader, reader.arch, layers, qcfg
        self.store, self.layer_store = store, layer_store
        self.device, self.dtype = torch.device(device), compute_dtype
        self.intermediate = padded_intermediate(reader.config, qcfg.pad_intermediate_to)
        self.config = compute_config(reader.config, self.intermediate)
        self.out_dtype = output_dtype(reader.tensors[self.arch.embed + ".weight"].dtype_torch)
        self.attention = AttentionInputs(self.arch, self.config, self.device)
        self._mask: torch.Tensor | None = None
        self._embed: nn.Embedding | None = None

    # ---- inputs -----------------------------------------------------------------------------------
    def embed(self, batch: TokenBatch) -> ActivationChunk:
        """Token ids → first-layer hidden states (the first stage only). The table stays in the checkpoint
        dtype (a 152k × 8192 vocabulary is 2.5 GB in bf16, 5 GB in fp32); looked-up rows are cast, exactly."""
        if self._embed is None:
            weight = self.reader.load_prefix(self.arch.embed)["weight"]
            self._embed = nn.Embedding.from_pretrained(weight.to(self.device))
        hidden = self._embed(batch.input_ids.to(self.device)).to(self.dtype)
        return ActivationChunk(hidden, batch.mask.to(self.device))

    # ---- forward passes ---------------------------------------------------------------------------
    def _run(self, layer: nn.Module, chunk: ActivationChunk) -> torch.Tensor:
        hidden = chunk.hidden.to(self.device, self.dtype)
        self._mask = chunk.mask
        with torch.inference_mode():
            return layer(hidden, **self.attention(hidden, chunk.mask))

    def forward_layer(self, layer: nn.Module, chunk: ActivationChunk) -> ActivationChunk:
        return ActivationChunk(self._run(layer, chunk), chunk.mask)

    def float_layer(self, index: int) -> nn.Module:
        state = self.reader.load_prefix(self.arch.layer_prefix(index))
        if self.intermediate != self.reader.config.intermediate_size:
            state = pad_mlp(state, self.arch, self.intermediate)
        return build_float_layer(self.arch, self.config, index, state, self.dtype, self.device)

    # ---- quantization -----------------------------------------------------------------------------
    def quantize(self, inputs: list[Any]) -> Iterator[LayerReport | StagePhase]:
        """Quantize every layer of the stage. `inputs` are store handles of the first layer's inputs.

        Yields what it is doing (StagePhase) and one report per finished layer; afterwards `self.outputs`
        holds the handles of the last layer's outputs.
        """
        handles = inputs
        for index in self.layers:
            report = LayerReport(layer=index, started=time.time())
            start = time.perf_counter()
            saved = self.layer_store.load(index) if self.layer_store else None
            if saved is not None:
                tensors, old = saved
                report.losses, report.cholesky_fallbacks, report.resumed = old.losses, old.cholesky_fallbacks, True
            else:
                tensors = yield from self._quantize_layer(index, handles, report)
            yield StagePhase(index, "forward through the quantized layer" if saved is None else
                             "replaying the finished layer from its checkpoint")
            layer = build_quantized_layer(self.arch, self.config, index, tensors, self.qcfg, self.dtype, self.device)
            handles = [self.store.put(self.forward_layer(layer, self.store.get(h))) for h in handles]
            report.seconds = time.perf_counter() - start
            report.finished = time.time()
            report.peak_rss_mb = peak_rss_mb()
            if saved is None and self.layer_store:
                self.layer_store.save(index, tensors, report)
            yield report
        self.outputs = handles

    def _quantize_layer(self, index: int, handles: list[Any], report: LayerReport
                        ) -> Generator[StagePhase, None, dict[str, torch.Tensor]]:
        yield StagePhase(index, "loading float weights")
        layer = self.float_layer(index)
        groups = self.arch.sequential
        passes = [[g] for g in groups] if self.qcfg.true_sequential else [list(groups)]
        tensors: dict[str, torch.Tensor] = {}
        for pass_groups in passes:
            yield StagePhase(index, f"calibration forward ({len(handles)} batches) for {_names(pass_groups)}")
            hessians = self._capture(layer, pass_groups, handles)
            for group in pass_groups:
                yield StagePhase(index, f"solving {_names([group])}")
                for name, result in self._solve_group(layer, group, hessians[group[0]]).items():
                    module = layer.get_submodule(name)
                    module.weight.data = result.dequantize().to(self.dtype)
                    tensors.update(pack_result(result, self.qcfg.bits).tensors(name))
                    if module.bias is not None:
                        tensors[f"{name}.bias"] = module.bias.detach().half()
                    report.losses[name] = result.loss
                    if result.cholesky_fallback:
                        report.cholesky_fallbacks[name] = result.cholesky_fallback
        for name, param in layer.named_parameters():
            if name.rpartition(".")[0] not in self.arch.linear_names:
                tensors[name] = param.detach().to(self.out_dtype)
        log.debug("layer %d quantized: loss %.4g", index, sum(report.losses.values()))
        return {k: v.contiguous().cpu() for k, v in tensors.items()}

    def _capture(self, layer: nn.Module, groups: list[tuple[str, ...]], handles: list[Any]
                 ) -> dict[str, HessianAccumulator]:
        """One pass over all batches, accumulating the shared input Hessian of each group."""
        accs: dict[str, HessianAccumulator] = {}
        hooks = []
        for i, group in enumerate(groups):
            module = layer.get_submodule(group[0])
            acc = accs[group[0]] = HessianAccumulator(module.in_features, self.device)
            last = i == len(groups) - 1

            def hook(_module, args, acc=acc, last=last):
                acc.add(args[0], self._mask)
                if last:
                    raise _StopForward

            hooks.append(module.register_forward_pre_hook(hook))
        try:
            for h in handles:
                try:
                    self._run(layer, self.store.get(h))
                except _StopForward:
                    pass
        finally:
            for hook_handle in hooks:
                hook_handle.remove()
        return accs

    def _solve_group(self, layer: nn.Module, group: tuple[str, ...], acc: HessianAccumulator
                     ) -> dict[str, QuantResult]:
        """Solve the projections of one group as a single stacked weight, then split the rows back."""
        weights = [layer.get_submodule(name).weight.detach().float() for name in group]
        for name, w in zip(group, weights):
            self.qcfg.check_in_features(name, w.shape[1])
        stacked = torch.cat(weights)
        if self.qcfg.method == "gptq":
            result = gptq_quantize(stacked, acc, self.qcfg)  # the accumulator hands its Hessian over
        else:
            result = rtn_quantize(stacked, self.qcfg, acc.take_hessian())
        results: dict[str, QuantResult] = {}
        row = 0
        for name, w in zip(group, weights):
            rows = slice(row, row + w.shape[0])
            part = QuantResult(codes=result.codes[rows], scales=result.scales[:, rows], zeros=result.zeros[:, rows],
                               g_idx=result.g_idx.clone(), loss=float(result.row_losses[rows].sum()),
                               seconds=result.seconds, cholesky_fallback=result.cholesky_fallback)
            results[name] = part
            row += w.shape[0]
        return results
