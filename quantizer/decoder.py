"""A decoder-only causal LM as transformers builds it, read from its own modules.

`Architecture` builds the whole model on the meta device (no weights) from its config and reads off:
- where the decoder layers, the input embedding and the output head live;
- per layer (`LayerSpec`, from one shape-only run of the layer with hooks): the projections to quantize (every
  `nn.Linear`, and every expert of a fused experts module, unfused into an `ExpertList`), the units (projections
  that receive the same input tensor share one Hessian and are solved as one: q/k/v, MLA's q_a + kv_a, gate/up),
  and the true-sequential order (a unit comes after every unit its input depends on, found from the autograd
  graph of that run);
- names on disk (`WeightNames`, from transformers' own checkpoint conversion mapping).
Families keep as data only what cannot be read this way (`quantizer/families.py`).
"""

from __future__ import annotations

import copy
import fnmatch
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers import initialization as hf_init
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.pytorch_utils import Conv1D

from quantizer.errors import ConfigError
from quantizer.experts import ExpertList, is_fused_experts, unfuse_tensors
from quantizer.families import ALIASES, FLOAT, LINEAR_CLASSES, REFUSED
from quantizer.layer_inputs import LayerCall, LayerInputs
from quantizer.weight_names import WeightNames

log = logging.getLogger(__name__)

Unit = tuple[str, ...]  # projections solved as one stacked weight (they see the same input)
NORMS = ("Norm", "norm")


def load_config(model_dir: Path) -> PretrainedConfig:
    """The model's config. Never runs remote code: a `model_type` transformers lacks is read as the architecture
    it is an alias of (families.ALIASES), or refused."""
    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is unreadable ({exc}); is it a Hugging Face checkpoint dir?") from exc
    model_type = raw.get("model_type")
    if model_type in ALIASES:
        keep = {k: v for k, v in raw.items() if k not in ("model_type", "auto_map", "transformers_version")}
        config = CONFIG_MAPPING[ALIASES[model_type]](**keep)
        config.source_model_type = model_type
        return config
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"model_type {model_type!r} ({path}) is not an architecture transformers knows, and "
                          "rayquant never runs a checkpoint's remote code; use a checkpoint of a family "
                          "transformers implements") from exc


def load_tokenizer(model_dir: Path, config: PretrainedConfig | None = None) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, resolved with `config` (load_config's reading when None): left to itself,
    transformers would build a generic config for a model_type it lacks (kimi_k2) and fail on it. Never runs
    remote code."""
    config = config if config is not None else load_config(model_dir)
    try:
        return AutoTokenizer.from_pretrained(model_dir, config=config, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"the tokenizer in {model_dir} does not load without running the checkpoint's code "
                          f"({exc}); add a tokenizer.json (save the tokenizer with transformers' "
                          "save_pretrained once, in a trusted environment)") from exc


@dataclass(frozen=True)
class LayerSpec:
    """What one decoder layer quantizes, and in which order."""
    groups: tuple[tuple[Unit, ...], ...]  # units by sequential depth; a group's units are captured in one pass
    stops: tuple[tuple[str, str], ...]  # per group: (module, "pre" | "post") after which its inputs are all seen
    experts: tuple[str, ...]  # ExpertList modules of the layer
    floats: tuple[str, ...]  # nn.Linear modules kept float (routers, shared-expert gates)
    returns: int  # 0: the layer returns its hidden states; n: a tuple of n led by them

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for unit in group for name in unit)

    @property
    def sparse(self) -> bool:
        return bool(self.experts)


class Architecture:
    """A causal LM family as transformers implements it, built from `config` (see the module docstring).
    `disk_names`: the checkpoint's tensor names, for the disk ↔ module name map."""

    def __init__(self, config: PretrainedConfig, disk_names: Iterable[str] = ()) -> None:
        self.config = config
        self.model_type = getattr(config, "source_model_type", config.model_type)
        if config.model_type in REFUSED:
            raise ConfigError(f"model_type {config.model_type!r} is not supported: {REFUSED[config.model_type]}")
        self.model = build_meta_model(config)
        self.base_prefix = self.model.base_model_prefix if self.model.base_model is not self.model else ""
        self.base_model = self.model.base_model
        self.layers_prefix = _find_layers(self.model, config)
        self.layers_in_base = self.layers_prefix.removeprefix(self.base_prefix + ".") if self.base_prefix else \
            self.layers_prefix
        self._layers = list(self.model.get_submodule(self.layers_prefix))  # as transformers built them
        self.num_layers = len(self._layers)
        self.embed = _module_path(self.model, self.model.get_input_embeddings())
        head = self.model.get_output_embeddings()
        self.lm_head = _module_path(self.model, head) if head is not None else None
        self.hidden_size = int(self.model.get_input_embeddings().weight.shape[1])
        self.names = WeightNames(self.model, disk_names)
        self.layer_returns = 0  # a layer returns its hidden states (0), or a tuple of this length led by them
        self._specs: dict[tuple, tuple[LayerSpec, nn.Module]] = {}  # by layer fingerprint: spec, meta layer
        self._float_patterns = FLOAT.get(config.model_type, ())

    # ---- layers ------------------------------------------------------------------------------------
    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_prefix}.{index}"

    def empty_layer(self, index: int) -> nn.Module:
        """Decoder layer `index` on the meta device, with fused experts unfused (ExpertList) and GPT-2's Conv1D
        projections as nn.Linear (weights [out, in]; loading transposes them)."""
        layer = copy.deepcopy(self._layers[index])
        with torch.device("meta"):
            for name, module in list(layer.named_modules()):
                if is_fused_experts(module) and name:
                    _set_submodule(layer, name, ExpertList(module))
                elif isinstance(module, Conv1D):
                    linear = nn.Linear(module.weight.shape[0], module.weight.shape[1], bias=module.bias is not None)
                    linear.is_conv1d = True
                    _set_submodule(layer, name, linear)
        return layer

    def _fingerprint(self, index: int) -> tuple:
        """What makes two layers trace alike: their modules, parameter shapes and the string / flag attributes
        their forward may branch on (attention or layer type); not their index."""
        layer = self._layers[index]
        modules = tuple((n, type(m).__name__, tuple(sorted(
            (k, v) for k, v in vars(m).items() if isinstance(v, (str, bool)) and k != "training")))
            for n, m in layer.named_modules())
        return modules, tuple((n, tuple(p.shape)) for n, p in layer.named_parameters())

    def _traced(self, index: int) -> tuple[LayerSpec, nn.Module]:
        key = self._fingerprint(index)
        if key not in self._specs:
            if index and not self._specs:
                self._traced(0)  # layer 0 tells how layers return (a recorder for layer i-1 must return the same)
            layer = self.empty_layer(index).to("meta")  # buffers too: the run is shape-only
            spec = trace_layer(layer, self._meta_call(index), self._float_patterns, self.model_type)
            self._specs[key] = (spec, layer)
            if index == 0:
                self.layer_returns = spec.returns
        return self._specs[key]

    def spec(self, index: int) -> LayerSpec:
        return self._traced(index)[0]

    def _meta_call(self, index: int) -> LayerCall:
        """Inputs of layer `index` for a shape-only run: the model's own, for one short batch, on the meta device."""
        inputs = LayerInputs(self, torch.float32, "cpu", fill=True)
        mask = torch.ones(1, 8, dtype=torch.bool)
        call = inputs(mask, upto=index)[index]
        return call.to("meta")

    def layer_units(self, index: int) -> tuple[tuple[Unit, ...], ...]:
        return self.spec(index).groups

    def linear_names(self, index: int) -> tuple[str, ...]:
        return self.spec(index).linears

    def is_sparse(self, index: int) -> bool:
        return self.spec(index).sparse

    def linear_shapes(self, index: int) -> dict[str, tuple[int, int]]:
        """Projection (relative to the layer) → (out, in)."""
        spec, layer = self._traced(index)
        return {name: tuple(layer.get_submodule(name).weight.shape) for name in spec.linears}

    def expert_width(self, index: int) -> int:
        """The inner width of layer `index`'s experts (0 for a dense layer)."""
        spec, layer = self._traced(index)
        return max((layer.get_submodule(e).width for e in spec.experts), default=0)

    def num_experts(self, index: int) -> int:
        """Routed experts of layer `index` (0 for a dense layer)."""
        spec, layer = self._traced(index)
        return sum(layer.get_submodule(e).num_experts for e in spec.experts)

    def tensor_shapes(self, index: int) -> dict[str, tuple[int, ...]]:
        """Every parameter and persistent buffer of layer `index` in our modules (relative names) → shape."""
        _, layer = self._traced(index)
        return {name: tuple(t.shape) for name, t in layer.state_dict(keep_vars=True).items()}

    def buffer_names(self, index: int) -> set[str]:
        """Persistent buffers of layer `index` (relative names): written in their own dtype."""
        _, layer = self._traced(index)
        return {name for name, _ in layer.named_buffers()} & set(layer.state_dict())

    def missing_tensors(self, index: int, have: set[str]) -> list[str]:
        """Tensors layer `index` needs that `have` (relative module names, experts fused or not) lacks."""
        have = set(have) | set(self.split_fused(index, dict.fromkeys(have)))
        return [name for name in self.tensor_shapes(index) if name not in have]

    def split_fused(self, index: int, state: dict) -> dict:
        """Layer tensors by module name, with fused expert tensors (gpt_oss and Llama 4 store them so) split per
        expert as ExpertList holds them; Conv1D weights ([in, out]) transposed to nn.Linear's [out, in]. With
        None values (names only), only the names are mapped."""
        spec, layer = self._traced(index)
        out = dict(state)
        for experts in spec.experts:
            fused = {k[len(experts) + 1:]: out.pop(k) for k in list(out) if k.rpartition(".")[0] == experts}
            if fused:
                module = layer.get_submodule(experts)
                if None in fused.values():
                    out.update(dict.fromkeys(f"{experts}.{k}" for k in module.state_dict()))
                else:
                    out.update({f"{experts}.{k}": v for k, v in unfuse_tensors(fused, module.transposed).items()})
        for name, module in layer.named_modules():
            if getattr(module, "is_conv1d", False) and out.get(f"{name}.weight") is not None:
                out[f"{name}.weight"] = out[f"{name}.weight"].t().contiguous()
        return out


def build_meta_model(config: PretrainedConfig) -> nn.Module:
    """The causal LM on the meta device, with its non-persistent buffers (rotary frequencies) computed for real,
    as transformers' own loading does; attention through SDPA where the family has it, else eager."""
    for implementation in ("sdpa", "eager"):
        try:
            with torch.device("meta"), hf_init.meta_device_safe_creation_ops():
                model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=implementation,
                                                         dtype=torch.float32)
            break
        except ValueError as exc:
            if implementation == "eager":
                raise ConfigError(f"transformers cannot build {config.model_type}: {exc}") from exc
    owners: dict[str, nn.Module] = {}
    for name, buffer in list(model.named_non_persistent_buffers()):
        owner_name, _, attr = name.rpartition(".")
        owner = owners[owner_name] = model.get_submodule(owner_name) if owner_name else model
        owner._buffers[attr] = torch.empty_like(buffer, device="cpu")
    # each owner is initialised by the innermost PreTrainedModel holding it, as transformers' own init does
    # (Gemma 3n's text model reads its own attributes there)
    pretrained = {name: m for name, m in model.named_modules() if isinstance(m, PreTrainedModel)}
    for owner_name, owner in owners.items():
        holder = max((n for n in pretrained if not n or owner_name == n or owner_name.startswith(n + ".")), key=len)
        pretrained[holder]._init_weights(owner)
    return model.eval()


def _module_path(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _find_layers(model: nn.Module, config: PretrainedConfig) -> str:
    """The ModuleList of the num_hidden_layers decoder layers (the shallowest; ambiguity is refused)."""
    n = int(getattr(config, "num_hidden_layers", 0) or 0)
    found = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n and n]
    if not found:
        raise ConfigError(f"{config.model_type}: no list of its {n} decoder layers in transformers' model; rayquant "
                          "quantizes models built as a stack of decoder layers")
    depth = min(name.count(".") for name in found)
    shallowest = [name for name in found if name.count(".") == depth]
    if len(shallowest) > 1:
        raise ConfigError(f"{config.model_type}: its decoder layers are split over several module lists "
                          f"({', '.join(shallowest)}); rayquant quantizes one stack of decoder layers")
    return shallowest[0]


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


# ---- the shape-only trace -------------------------------------------------------------------------------
def trace_layer(layer: nn.Module, call: LayerCall, float_patterns: tuple[str, ...], model_type: str) -> LayerSpec:
    """Run `layer` once on the meta device with hooks and read off its LayerSpec (see the module docstring)."""
    experts = tuple(name for name, m in layer.named_modules() if isinstance(m, ExpertList))
    blocks = {name.rpartition(".")[0] for name in experts}  # modules holding experts: their own Linears stay float
    routes = {layer.get_submodule(name).num_experts for name in experts}  # a Linear with one output per expert routes
    floats, projections = [], {}
    for name, module in layer.named_modules():
        if type(module) is not nn.Linear and type(module).__name__ not in LINEAR_CLASSES:
            continue
        if name.rpartition(".")[0] in blocks or module.out_features in routes or \
                any(fnmatch.fnmatch(name, p) for p in float_patterns):
            floats.append(name)
        else:
            projections[name] = module
    _refuse_unquantizable(layer, blocks, model_type)
    first_input: dict[str, torch.Tensor] = {}
    position: dict[str, int] = {}
    outputs: dict[object, str] = {}
    expert_end: dict[str, int] = {}
    hooks = []

    def before(name):
        def hook(_module, args, kwargs=None):
            if name not in first_input:
                x = args[0] if args else next(iter(kwargs.values()))
                first_input[name], position[name] = x, len(position) + len(expert_end)
        return hook

    def after(name):
        def hook(_module, _args, out):
            if isinstance(out, torch.Tensor) and out.grad_fn is not None and out.grad_fn not in outputs:
                outputs[out.grad_fn] = name
        return hook

    def experts_done(name):
        def hook(*_):
            expert_end[name] = len(position) + len(expert_end)
        return hook

    for name, module in projections.items():
        hooks.append(module.register_forward_pre_hook(before(name)))
        hooks.append(module.register_forward_hook(after(name)))
    for name in experts:
        hooks.append(layer.get_submodule(name).register_forward_hook(experts_done(name)))
    try:
        with torch.enable_grad():
            hidden = call.hidden.detach().requires_grad_(True)
            out = call.run(layer, hidden)
    except Exception as exc:
        raise ConfigError(f"{model_type}: rayquant could not run its decoder layer shape by shape ({type(exc).__name__}"
                          f": {exc})") from exc
    finally:
        for h in hooks:
            h.remove()
    for name in [n for n in projections if n not in first_input]:  # read as a weight, never called (Mamba's
        floats.append(name)  # dt_proj): nothing to calibrate it on, and a quantized module would not be read
        log.info("%s: %s is never called by the layer's forward; it stays float", model_type, name)
    order = sorted(first_input, key=position.get)
    units: dict[int, list[str]] = {}  # id(first input) → modules, in call order
    for name in order:
        units.setdefault(id(first_input[name]), []).append(name)
    unit_of = {name: tuple(names) for names in units.values() for name in names}
    memo: dict[object, frozenset[str]] = {}
    depth: dict[Unit, int] = {}
    for names in units.values():
        unit = tuple(names)
        upstream = _upstream(first_input[unit[0]].grad_fn, outputs, memo)
        depth[unit] = 1 + max((depth[unit_of[m]] for m in upstream if unit_of[m] in depth), default=-1)
    levels = sorted(set(depth.values()))
    groups = tuple(tuple(u for u in depth if depth[u] == level) for level in levels)

    def inside_experts(name: str) -> str | None:
        return next((e for e in experts if name.startswith(e + ".")), None)

    def stop(group: tuple[Unit, ...]) -> tuple[str, str]:
        events = []
        for unit in group:
            owner = inside_experts(unit[0])
            events.append((expert_end[owner], owner, "post") if owner else (position[unit[0]], unit[0], "pre"))
        _, module, kind = max(events)
        return module, kind

    return LayerSpec(groups=groups, stops=tuple(stop(g) for g in groups), experts=experts, floats=tuple(floats),
                     returns=len(out) if isinstance(out, (tuple, list)) else 0)


def _upstream(node, outputs: dict[object, str], memo: dict[object, frozenset[str]]) -> frozenset[str]:
    """Projections whose outputs the autograd node `node` depends on (stopping at those outputs)."""
    if node is None:
        return frozenset()
    stack = [(node, False)]
    while stack:
        current, expanded = stack.pop()
        if current in memo:
            continue
        if current in outputs:
            memo[current] = frozenset({outputs[current]})
            continue
        children = [c for c, _ in current.next_functions if c is not None]
        if expanded:
            memo[current] = frozenset().union(*(memo[c] for c in children))
        else:
            stack.append((current, True))
            stack.extend((c, False) for c in children if c not in memo)
    return memo[node]


def _refuse_unquantizable(layer: nn.Module, blocks: set[str], model_type: str) -> None:
    """A module that holds a projection-sized matrix but is neither an nn.Linear nor experts rayquant can unfuse
    would be left float silently: refuse the family, naming it."""
    for name, module in layer.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d, ExpertList)) or any(s in type(module).__name__
                                                                                      for s in NORMS):
            continue
        if name.rpartition(".")[0] in blocks:  # a router of a block with experts
            continue
        for pname, param in module.named_parameters(recurse=False):
            if param.dim() >= 2 and sorted(param.shape)[-2] >= 32:
                raise ConfigError(f"{model_type}: {name}.{pname} ({type(module).__name__}, shape {tuple(param.shape)}) "
                                  "is a projection rayquant cannot quantize: it is neither an nn.Linear nor experts of "
                                  "transformers' experts interface")
