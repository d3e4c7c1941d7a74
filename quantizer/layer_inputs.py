"""What the model hands each decoder layer: found by running transformers' own model forward with every decoder
layer replaced by a recorder.

A decoder layer is called as `layer(hidden_states, *args, **kwargs)`; the model computes `args` / `kwargs`
(attention masks of each layer's type, rotary position embeddings, position ids, …) from the token ids and the
padding mask before the first layer runs. `LayerInputs` rebuilds the model's base (meta weights, except the few
it needs) with recorders in place of the layers, so every family's own mask and rotary code runs unchanged.
Stages past the first compute these inputs from zeros shaped like the hidden states (no embedding table);
the first stage also gets layer 0's real input from the token ids.
"""

from __future__ import annotations

import copy
import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantizer.errors import ConfigError


@dataclass
class LayerCall:
    """One decoder layer's inputs as the model passes them."""
    hidden: torch.Tensor  # [B, T, H] the hidden states the layer receives
    args: tuple  # further positional arguments
    kwargs: dict[str, Any]
    hidden_as_keyword: bool = False  # the model passed hidden_states=…

    def run(self, layer: nn.Module, hidden: torch.Tensor) -> Any:
        if self.hidden_as_keyword:
            return layer(*self.args, hidden_states=hidden, **self.kwargs)
        return layer(hidden, *self.args, **self.kwargs)

    def to(self, device: torch.device | str) -> "LayerCall":
        move = _mapper(lambda t: t.to(device))
        return LayerCall(self.hidden.to(device), move(self.args), move(self.kwargs), self.hidden_as_keyword)


def layer_output(out: Any) -> torch.Tensor:
    """A decoder layer's hidden-state output (some families return a tuple led by it)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _mapper(fn):
    def apply(value):
        if isinstance(value, torch.Tensor):
            return fn(value)
        if isinstance(value, tuple):
            return tuple(apply(v) for v in value)
        if isinstance(value, list):
            return [apply(v) for v in value]
        if isinstance(value, dict):
            return {k: apply(v) for k, v in value.items()}
        return value
    return apply


class _Stop(Exception):
    pass


class LayerInputs:
    """Per-batch inputs of decoder layers 0 … `upto` as the model computes them.

    `weights`: the base model's own tensors outside the decoder layers (module names), loaded by the caller —
    the input embedding only where layer 0's input is wanted; any other (GPT-2's position embeddings, …) always.
    `fill`: give tensors not in `weights` zeros instead (shape tracing)."""

    def __init__(self, arch, dtype: torch.dtype, device: torch.device | str,
                 weights: dict[str, torch.Tensor] | None = None, fill: bool = False) -> None:
        self.arch, self.dtype, self.device = arch, dtype, torch.device(device)
        self.calls: dict[int, LayerCall] = {}
        self.upto = arch.num_layers - 1
        self.model = copy.deepcopy(arch.base_model)
        for index, layer in enumerate(self.model.get_submodule(arch.layers_in_base)):
            layer.forward = types.MethodType(self._recorder(index), layer)
        weights = weights or {}
        prefix = arch.base_prefix + "." if arch.base_prefix else ""
        embed = arch.embed.removeprefix(prefix) + ".weight"
        layers = arch.layers_in_base + "."
        for name, param in list(self.model.named_parameters()):
            full = prefix + name
            if name.startswith(layers):  # the layers' own weights stay on meta: recorders stand in for them
                continue
            if full in weights:
                value = weights[full].to(self.device)
                if name != embed:
                    value = value.to(dtype)
            elif fill and name != embed:
                value = torch.zeros(param.shape, dtype=dtype, device=self.device)
            else:
                continue
            _assign(self.model, name, value)
        for name, buf in list(self.model.named_buffers()):
            if not buf.is_meta:  # the layers' own (persistent) buffers stay on meta with their weights
                _assign(self.model, name, buf.to(self.device), buffer=True)
        self.model.eval()
        embedding = self.model.get_input_embeddings()
        embedding.register_forward_hook(lambda _m, _a, out: out.to(dtype))  # looked-up rows in the compute dtype

    def set_embedding(self, weight: torch.Tensor) -> None:
        """The input embedding table, kept in its checkpoint dtype (its looked-up rows are cast)."""
        embedding = self.model.get_input_embeddings()
        embedding._parameters["weight"] = nn.Parameter(weight.to(self.device), requires_grad=False)

    def _recorder(self, index: int):
        """A forward for (meta) layer `index` that records its inputs: the layer object stays, so the model can
        read its attributes (a layer's attention type, …)."""
        inputs = self

        def forward(self, *args, **kwargs):
            as_keyword = not args
            hidden = kwargs.pop("hidden_states") if as_keyword else args[0]
            inputs.calls[index] = LayerCall(hidden, tuple(args[1:]), kwargs, as_keyword)
            if index >= inputs.upto:
                raise _Stop
            returns = inputs.arch.layer_returns
            return (hidden,) + (None,) * (returns - 1) if returns else hidden

        return forward

    def __call__(self, mask: torch.Tensor, input_ids: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                 upto: int | None = None) -> dict[int, LayerCall]:
        """Layer inputs for a batch with padding `mask` [B, T]: from `input_ids` (layer 0's hidden states are then
        the model's own), or from `hidden` [B, T, H] (default zeros) standing in for the embeddings."""
        self.calls, self.upto = {}, self.arch.num_layers - 1 if upto is None else upto
        b, t = mask.shape
        kwargs: dict[str, Any] = {"attention_mask": mask.to(self.device, torch.long), "use_cache": False}
        if input_ids is not None:
            kwargs["input_ids"] = input_ids.to(self.device)
        else:
            hidden = hidden if hidden is not None else torch.zeros(b, t, self.arch.hidden_size)
            kwargs["inputs_embeds"] = hidden.to(self.device, self.dtype)
        try:
            with torch.no_grad():
                self.model(**kwargs)
        except _Stop:
            pass
        except Exception as exc:  # noqa: BLE001 - the family's own forward, refused with what it said
            how = "the token ids" if input_ids is not None else "stand-in embeddings (later stages have no table)"
            raise ConfigError(f"{self.arch.model_type}: its model forward cannot compute the decoder layers' inputs "
                              f"from {how} ({type(exc).__name__}: {exc})") from exc
        return self.calls

    def check_between_layers(self, mask: torch.Tensor) -> None:
        """Refuse a family whose model changes the hidden states between decoder layers (outside them): a stage
        running layers one by one would not reproduce it."""
        hidden = torch.randn(*mask.shape, self.arch.hidden_size, generator=torch.Generator().manual_seed(0))
        calls = self(mask, hidden=hidden)
        for i in range(1, len(calls)):
            if not torch.equal(calls[i].hidden, calls[i - 1].hidden):
                raise ConfigError(f"{self.arch.model_type}: the model changes the hidden states between decoder "
                                  f"layers {i - 1} and {i} (outside the layers); rayquant runs layers one by one")


def _assign(model: nn.Module, name: str, value: torch.Tensor, buffer: bool = False) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if buffer:
        owner._buffers[attr] = value
    else:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
