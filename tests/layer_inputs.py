"""Real inputs of one SmolLM2 decoder layer's projections, captured on the shipped calibration text."""

from __future__ import annotations

from pathlib import Path

import torch


def capture_layer_inputs(model_dir: Path, layer_index: int = 3, num_samples: int = 16, max_len: int = 256
                         ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"attn": (W_qkv [q+k+v out, hidden], X [tokens, hidden]), "down": (W_down, X_mlp [tokens, intermediate])}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantizer.calibration import CalibrationConfig, default_calibration_file, tokenize_samples

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    samples = tokenize_samples(default_calibration_file(), tokenizer,
                               CalibrationConfig(num_samples=num_samples, max_len=max_len))
    layer = model.model.layers[layer_index]
    seen: dict[str, list[torch.Tensor]] = {"attn": [], "down": []}
    hooks = [layer.self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen["attn"].append(a[0][0])),
             layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen["down"].append(a[0][0]))]
    with torch.inference_mode():
        for s in samples:
            model(s.unsqueeze(0))
    for h in hooks:
        h.remove()
    attn_w = torch.cat([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight])
    return {"attn": (attn_w.detach().clone(), torch.cat(seen["attn"])),
            "down": (layer.mlp.down_proj.weight.detach().clone(), torch.cat(seen["down"]))}
