"""Per-layer GPTQ solve time and loss, ours vs GPTQModel's GPTQ class, on identical weights and inputs.

Inputs: the real inputs of SmolLM2-135M layer 3 (q/k/v stacked [960, 576]; down_proj [576, 1536])
on 32 calibration texts, and synthetic 7B-class layers with correlated inputs ([4096, 4096] as
q/k/v/o, [11008, 4096] as up/gate). Both solvers get the
same settings; time is the solve alone (median of --repeats), loss is the same output MSE per token,
tr(ΔW H ΔWᵀ)/2, computed by us for both results.
Usage: python -m bench.solve [--repeats 3] [--device cuda]   (needs the interop extra: gptqmodel;
results in solve.* on CPU, solve_cuda.* on a GPU)
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

import torch

from bench.common import write_results
from quantizer.config import QuantConfig
from quantizer.gptq import gptq_quantize
from quantizer.hessian import HessianAccumulator
from quantizer.result import output_error

# (label, settings); "g" is replaced by the largest of 128/64 that divides the layer's input width
SETTINGS = [("4-bit g asym act-order", dict(bits=4, desc_act=True, sym=False)),
            ("4-bit g sym group-aware order", dict(bits=4, desc_act=False, act_group_aware=True, sym=True)),
            ("4-bit g sym natural order", dict(bits=4, desc_act=False, act_group_aware=False, sym=True)),
            ("3-bit g asym act-order", dict(bits=3, desc_act=True, sym=False))]


def smollm2_inputs() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from quantizer.assets import default_model_dir
    from tests.layer_inputs import capture_layer_inputs

    captured = capture_layer_inputs(default_model_dir(), num_samples=32, max_len=512)
    return {"SmolLM2 q/k/v [960×576]": captured["attn"], "SmolLM2 down [576×1536]": captured["down"]}


def synthetic_inputs(n: int = 4096, out: int = 4096, tokens: int = 8192, device: str = "cpu"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """W: [out, n] ~ N(0, 0.02²); X: [tokens, n] correlated, with input scales spread over 0.2–3 (on `device`)."""
    g = torch.Generator(device).manual_seed(0)
    mix = torch.randn(n, n, generator=g, device=device) / n**0.5
    x = (torch.randn(tokens, n, generator=g, device=device) @ mix) * torch.linspace(0.2, 3, n, device=device)
    return torch.randn(out, n, generator=g, device=device) * 0.02, x


def layers_for(device: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """SmolLM2's real layers and 7B-class synthetic ones; on a GPU also Qwen2-72B's shapes."""
    layers = {**smollm2_inputs(), "synthetic [4096×4096]": synthetic_inputs(),
              "synthetic [11008×4096]": synthetic_inputs(out=11008)}
    if device == "cuda":
        layers["Qwen2-72B q/k/v [10240×8192]"] = synthetic_inputs(8192, 10240, device=device)
        layers["Qwen2-72B down [8192×29568]"] = synthetic_inputs(29568, 8192, device=device)
    return layers


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def solve_ours(w, x, cfg: QuantConfig, device: str) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(solve seconds, dequantized weight [out, in], H), on `device`."""
    w = w.to(device)
    acc = HessianAccumulator(w.shape[1], device)
    for part in x.split(1024):
        acc.add(part.to(device))
    h = acc.hessian()
    _sync(device)
    start = time.perf_counter()
    result = gptq_quantize(w, h, cfg)
    _sync(device)
    return time.perf_counter() - start, result.dequantize(), h


def solve_gptqmodel(w, x, settings: dict, device: str) -> tuple[float, torch.Tensor]:
    from gptqmodel.quantization.config import QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ

    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=device)
    linear.weight.data.copy_(w)
    solver = GPTQ(linear, qcfg=QuantizeConfig(damp_percent=0.01, **settings))
    solver.quantizer.configure(perchannel=True)
    for part in x.split(1024):
        solver.add_batch(part.to(device).unsqueeze(0), None)
    _sync(device)
    start = time.perf_counter()
    q = solver.quantize()[0]
    _sync(device)
    return time.perf_counter() - start, q.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    args = parser.parse_args()
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    if args.device == "cpu":
        torch.set_num_threads(2)
    name = "solve" if args.device == "cpu" else f"solve_{args.device}"
    meta = {"reference": "gptqmodel 7.6.0 GPTQ class (damp 0.01, same bits/group/order/sym)",
            "machine": "2 CPU cores, 2 torch threads" if args.device == "cpu" else torch.cuda.get_device_name(),
            "repeats": f"median of {args.repeats} after one warm-up", "loss": "output MSE per token, tr(ΔW H ΔWᵀ)/2"}
    columns = ["layer", "setting", "ours_s", "gptqmodel_s", "speedup", "ours_loss", "gptqmodel_loss", "loss_ratio"]
    rows = []
    for layer_name, (w, x) in layers_for(args.device).items():
        group = 128 if w.shape[1] % 128 == 0 else 64
        for label, settings in SETTINGS:
            label, settings = label.replace(" g ", f" g{group} "), {**settings, "group_size": group}
            ours = [solve_ours(w, x, QuantConfig(**settings), args.device) for _ in range(args.repeats + 1)][1:]
            theirs = [solve_gptqmodel(w, x, settings, args.device) for _ in range(args.repeats + 1)][1:]
            w, h = w.to(args.device), ours[0][2]
            rows.append({
                "layer": layer_name, "setting": label,
                "ours_s": statistics.median(t for t, _, _ in ours),
                "gptqmodel_s": statistics.median(t for t, _ in theirs),
                "ours_loss": output_error(w, ours[0][1], h), "gptqmodel_loss": output_error(w, theirs[0][1], h),
            })
            rows[-1]["speedup"] = rows[-1]["gptqmodel_s"] / rows[-1]["ours_s"]
            rows[-1]["loss_ratio"] = rows[-1]["ours_loss"] / rows[-1]["gptqmodel_loss"]
            write_results(name, rows, columns, meta)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
