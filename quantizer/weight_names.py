"""Names of a checkpoint's tensors on disk and in the modules rayquant builds, through transformers' own
checkpoint conversion mapping (the renamings and expert merges it applies when it loads a Hub checkpoint).

On disk, most mixture-of-experts families keep one tensor per expert (`mlp.experts.7.gate_proj.weight`,
Mixtral `block_sparse_moe.experts.7.w1.weight`); transformers merges them into fused experts, and rayquant
keeps them per expert (`ExpertList`): such a tensor maps to `<experts>.7.gate_proj.weight`. Families whose
Hub checkpoints keep the experts fused (gpt_oss, llama4_text) map their fused tensors unchanged; the layer
builder splits them per expert, and the quantized experts are written per expert under the same prefix.
"""

from __future__ import annotations

import re
from typing import Iterable

from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter, rename_source_key

from quantizer.errors import ConfigError

EXPERT_PROJECTIONS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",), "up_proj": ("up_proj",)}
GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")  # a quantized module's tensors, in place of its weight


class WeightNames:
    """Disk name ↔ module name of every tensor of a checkpoint (full names, e.g. `model.layers.3.…`).
    `merged`: module tensors transformers concatenates from several disk tensors on load (Kimi-Linear's q/k/v
    conv1d) → (their disk names in order, the dimension); such a tensor is written under its module name."""

    def __init__(self, model: nn.Module, disk_names: Iterable[str]) -> None:
        transforms = get_model_conversion_mapping(model)
        self._renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        self._converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self.merged: dict[str, tuple[list[str], int]] = {}
        self.to_module: dict[str, str] = {name: self._module_name(name) for name in disk_names}
        self.to_disk: dict[str, str] = {module: disk for disk, module in self.to_module.items()
                                        if module not in self.merged}

    def _module_name(self, disk: str) -> str:
        module, _, kind = disk.rpartition(".")
        if kind in GPTQ_TENSORS:  # a quantized module is named as its weight would be
            return f"{self._module_name(f'{module}.weight').rpartition('.')[0]}.{kind}"
        renamed, _ = rename_source_key(disk, self._renamings, [])
        for converter in self._converters:
            _, pattern = converter.rename_source_key(renamed)
            if pattern is not None:
                return self._expert_name(disk, renamed, converter, pattern)
        return renamed

    def _expert_name(self, disk: str, renamed: str, converter: WeightConverter, pattern: str) -> str:
        """A per-expert tensor merged by `converter` → its name in an ExpertList ("<experts>.7.gate_proj.weight");
        a tensor concatenated with others into one (no expert list) → that tensor's name, noted in `merged`."""
        ops = getattr(converter, "operations", [])
        target = converter.target_patterns[0].rpartition(".")[2]
        if len(ops) == 1 and isinstance(ops[0], Concatenate) and "*" not in pattern:
            found = re.search(re.escape(pattern.replace("\\.", ".")), renamed)
            if found is not None:
                merged = renamed[: found.start()] + converter.target_patterns[0] + renamed[found.end():]
                parts, _ = self.merged.setdefault(merged, ([], ops[0].dim))
                parts.append(disk)
                parts.sort(key=lambda d: converter.source_patterns.index(next(
                    p for p in converter.source_patterns if re.search(re.escape(p.replace("\\.", ".")), d))))
                return merged
        if target not in EXPERT_PROJECTIONS or not all(isinstance(op, (MergeModulelist, Concatenate)) for op in ops):
            raise ConfigError(f"tensor {disk} needs transformers' conversion {converter} when loaded, which rayquant "
                              "does not apply; load the model with transformers and save_pretrained it, then "
                              "quantize that copy")
        regex = r"(\d+)".join(re.escape(part) for part in pattern.replace("\\.", ".").split("*"))
        found = re.search(regex, renamed)
        if found is None:
            raise ConfigError(f"tensor {disk}: cannot find the expert index (pattern {pattern})")
        experts = (renamed[: found.start()] + converter.target_patterns[0]).rpartition(".")[0]
        projection = EXPERT_PROJECTIONS[target][converter.source_patterns.index(pattern)]
        kind = disk.rpartition(".")[2]
        return f"{experts}.{found.group(1)}.{projection}.{kind}"

    def disk_name(self, module_name: str) -> str:
        """The name a tensor of our modules is written under: its source's name where it had one of its own, else
        (experts split from a fused tensor, quantized tensors) its module name with the same prefix renamings
        reversed (a module `<experts>.7.gate_proj` whose `.weight` came from disk name D.weight → D)."""
        if module_name in self.to_disk:
            return self.to_disk[module_name]
        module, _, kind = module_name.rpartition(".")
        weight = self.to_disk.get(f"{module}.weight")
        if weight is not None:
            return f"{weight.rpartition('.')[0]}.{kind}"
        return module_name
