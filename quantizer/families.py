"""What rayquant cannot read from transformers' modules, per family: nothing else is written by hand.

Everything about a decoder layer — its projections, which share an input (one Hessian), the order the forward
calls them, its experts and their names on disk — is read from the layer transformers builds (see
`quantizer/decoder.py`). What stays here:
- aliases: config `model_type`s that transformers does not know but that are an architecture it has (Kimi-K2
  checkpoints say `kimi_k2` and ship remote code for what is DeepSeek-V3); rayquant never runs remote code;
- float: `nn.Linear`s that must stay float beyond the generic rules (an `nn.Linear` that sits directly in a
  block holding experts — routers, shared-expert gates — or that has one output per expert stays float; so does
  one the layer's forward never calls, reading its weight directly);
- refused: families whose layers rayquant cannot run, with the reason.
"""

from __future__ import annotations

ALIASES: dict[str, str] = {
    "kimi_k2": "deepseek_v3",  # moonshotai/Kimi-K2-*: DeepseekV3ForCausalLM with 384 experts
}

# fnmatch patterns of module names (relative to a decoder layer) kept float in addition to the generic rule
FLOAT: dict[str, tuple[str, ...]] = {
    "zaya": ("mlp.gate.*",),  # its router is a small MLP (E + 1 outputs) inside the gate
    "gemma3n_text": ("altup.*",),  # AltUp's router and its per-modality coefficients (4 outputs each)
}

# nn.Linear subclasses whose forward is a plain linear map (quantized like nn.Linear); others (BitNet's, which
# quantize on the fly) are left as they are
LINEAR_CLASSES = frozenset({"FalconLinear"})

REFUSED: dict[str, str] = {}
