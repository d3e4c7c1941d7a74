"""The quantization subcommands of the `rayquant` CLI: `quantize`, `eval` and `plan`."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

log = logging.getLogger("rayquant")

# flag dest → dotted job key
_QUANTIZE_FLAGS = {
    "model": "model", "calib": "calibration_file", "out": "output_dir", "overwrite": "overwrite",
    "stages": "stages", "schedule": "schedule", "address": "ray_address",
    "bits": "quant.bits", "group_size": "quant.group_size", "desc_act": "quant.desc_act",
    "act_group_aware": "quant.act_group_aware", "sym": "quant.sym",
    "damp_percent": "quant.damp_percent", "static_groups": "quant.static_groups",
    "true_sequential": "quant.true_sequential", "method": "quant.method",
    "pad_intermediate_to": "quant.pad_intermediate_to", "moe_calibration": "quant.moe_calibration",
    "moe_min_token_fraction": "quant.moe_min_token_fraction", "moe_fallback": "quant.moe_fallback",
    "experts_per_chunk": "quant.experts_per_chunk",
    "solve_workers": "resources.solve_workers", "workers": "resources.workers",
    "transport": "resources.transport",
    "num_samples": "calibration.num_samples", "max_len": "calibration.max_len",
    "batch_size": "calibration.batch_size", "seed": "calibration.seed",
    "cpus_per_stage": "resources.cpus_per_stage", "gpus_per_stage": "resources.gpus_per_stage",
    "memory_per_stage_gb": "resources.memory_per_stage_gb", "max_restarts": "resources.max_restarts",
}


def _stages(value: str) -> int | str:
    return value if value == "auto" else int(value)


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a checkpoint with GPTQ on Ray (local Ray unless --address)",
                       description="Quantize a Hugging Face causal LM (any decoder-only family transformers "
                       "implements, read from its own modules: Llama, Qwen, DeepSeek-V3/Kimi-K2 — also from their "
                       "FP8 releases —, GLM-4.5, gpt-oss, …) with GPTQ. "
                       "Decoder layers are split into contiguous stages, one Ray actor each. Without --model, "
                       "quantizes the packaged SmolLM2-135M on the shipped Wikipedia calibration text "
                       "(configs/default.yaml holds the settings for it). "
                       "Rerunning the same command after a crash resumes from the finished layers.")
    p.add_argument("--config", type=Path, help="YAML job file (see configs/); flags below override it")
    p.add_argument("--model", help="float or block-scaled FP8 checkpoint: a dir, a Hub id org/name[@revision], an "
                   "s3:// or gs:// URL, "
                   "or 'default' (packaged SmolLM2-135M-Instruct)")
    p.add_argument("--calib", help="calibration file (path or s3:// / gs:// URL): Qwen conversation .json, .jsonl, "
                   "or plain text")
    p.add_argument("--out", help="output dir or s3:// / gs:// prefix for the GPTQ checkpoint (must not exist unless "
                   "--overwrite); under `ray job submit` give an absolute path or a URL")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace an existing checkpoint that rayquant wrote (never anything else)")
    p.add_argument("--restart", action="store_true", help="discard an unfinished run instead of resuming it")
    g = p.add_argument_group("quantization")
    g.add_argument("--bits", type=int, help="2, 3, 4 or 8 (default 4; vLLM takes 4 and 8)")
    g.add_argument("--group-size", type=int, help="-1, 32, 64, 128… (default 128; SmolLM2 needs 64 or 32)")
    g.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=None,
                   help="act-order: solve columns by decreasing Hessian diagonal (groups then scatter over "
                   "columns via g_idx, which vLLM refuses, unless --static-groups)")
    g.add_argument("--act-group-aware", action=argparse.BooleanOptionalAction, default=None,
                   help="without --desc-act: solve whole groups by their largest diagonal entry (default on; "
                   "plain checkpoint layout)")
    g.add_argument("--sym", action=argparse.BooleanOptionalAction, default=None,
                   help="symmetric grid (default on; vLLM's GPTQ kernels need it)")
    g.add_argument("--damp-percent", type=float, help="Hessian dampening (default 0.01)")
    g.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=None,
                   help="with --desc-act: fix each group's grid before the solve, keeping g_idx = column // group "
                   "(a plain desc_act=false checkpoint that vLLM loads; configs/default.yaml does this)")
    g.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--method", choices=["gptq", "rtn"], help="gptq (default) or the round-to-nearest baseline")
    g.add_argument("--pad-intermediate-to", type=int, help="zero-pad the MLP width to a multiple (Qwen2-72B: 1024)")
    m = p.add_argument_group("mixture of experts (DeepSeek-V3/Kimi-K2, Qwen3-MoE, GLM-4.5, gpt-oss, Mixtral, …)")
    m.add_argument("--moe-calibration", choices=["auto", "all", "routed"],
                   help="tokens in an expert's Hessian (outputs always follow the router): all = every token, "
                   "routed = its routed tokens, auto (default) = routed when they are at least as many as the "
                   "projection's inputs, every token otherwise")
    m.add_argument("--moe-min-token-fraction", type=float,
                   help="an expert whose Hessian saw fewer of the layer's tokens falls back (default 0.005)")
    m.add_argument("--moe-fallback", choices=["rtn", "damp"],
                   help="that fallback: round-to-nearest (default) or GPTQ with damp_percent 0.1")
    m.add_argument("--experts-per-chunk", type=int,
                   help="experts held in memory at once while a sparse layer is quantized (the rest stream from "
                   "disk; the result is the same bit for bit); default 0: the most that fit the memory budget")
    c = p.add_argument_group("calibration")
    c.add_argument("--num-samples", type=int, help="sequences (default 128)")
    c.add_argument("--max-len", type=int, help="tokens per sequence at most (default 512)")
    c.add_argument("--batch-size", type=int, help="sequences per activation batch (default 8)")
    c.add_argument("--seed", type=int)
    r = p.add_argument_group("cluster")
    r.add_argument("--stages", type=_stages, help="stage actors, or 'auto' (default): fewest that fit")
    r.add_argument("--schedule", choices=["auto", "sequential", "pipelined", "data_parallel"],
                   help="sequential (exact, one stage at a time), pipelined (every stage at once on float inputs), "
                   "data_parallel (exact, every worker on every layer with 1/W of the data); auto (default): "
                   "data_parallel when --workers > 1, else sequential")
    r.add_argument("--workers", type=int, help="data-parallel workers W (one per GPU, or per --cpus-per-stage CPUs)")
    r.add_argument("--transport", choices=["auto", "object_store", "collective"],
                   help="how data-parallel workers exchange Hessians and results: Ray's object store, or a "
                   "torch.distributed group (NCCL on GPUs, gloo on CPUs); auto (default): collective on GPUs")
    r.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start a local Ray)")
    r.add_argument("--cpus-per-stage", type=int)
    r.add_argument("--gpus-per-stage", type=float)
    r.add_argument("--memory-per-stage-gb", type=float, help="planning budget per stage")
    r.add_argument("--max-restarts", type=int, help="times a dead stage actor is replaced (default 2)")
    r.add_argument("--solve-workers", type=int, help="processes solving a layer's units (MoE experts): the stage "
                   "and N-1 Ray tasks of its size (default 1)")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a float or GPTQ checkpoint on a text file",
                       description="Perplexity (exp of mean next-token NLL) over fixed windows of a text file.")
    p.add_argument("--model", required=True, help="checkpoint dir (float, or GPTQ written by rayquant/GPTQModel)")
    p.add_argument("--data", help="text file (default: the shipped Wikipedia evaluation text)")
    p.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--max-windows", type=int, default=32, help="windows at most (default 32)")


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="print the stage split for a checkpoint without loading weights",
                       description="The stage split and each stage's memory, from config.json and the safetensors "
                       "headers only (a header-only checkpoint plans too).")
    p.add_argument("--config", type=Path, help="YAML job file")
    p.add_argument("--model", help="checkpoint dir, Hub id, s3:// / gs:// URL, or 'default'")
    p.add_argument("--stages", type=_stages)
    p.add_argument("--memory-per-stage-gb", type=float)
    p.add_argument("--gpus-per-stage", type=float, help="1: plan for GPU stages (layers in the checkpoint dtype)")
    p.add_argument("--schedule", choices=["auto", "sequential", "pipelined", "data_parallel"])
    p.add_argument("--workers", type=int, help="data-parallel workers")
    p.add_argument("--transport", choices=["auto", "object_store", "collective"])
    p.add_argument("--worker-tflops", type=float, help="assumed TFLOP/s of one worker for the phase estimate "
                   "(default 200 on GPUs, 0.1 per CPU thread: 0.22 measured on 2 fp32 threads here)")
    p.add_argument("--link-gbps", type=float, default=10.0, help="assumed GB/s between workers (default 10)")
    p.add_argument("--num-samples", type=int, help="calibration sequences (default 128)")
    p.add_argument("--max-len", type=int, help="tokens per sequence (default 512)")
    p.add_argument("--batch-size", type=int, help="sequences per activation batch (default 8)")
    p.add_argument("--moe-calibration", choices=["auto", "all", "routed"])
    p.add_argument("--experts-per-chunk", type=int, help="experts held at once (default: the most that fit)")


def add_quantization_commands(sub) -> None:
    _add_quantize(sub)
    _add_eval(sub)
    _add_plan(sub)


def _overrides(args: argparse.Namespace) -> dict:
    return {key: getattr(args, dest) for dest, key in _QUANTIZE_FLAGS.items() if getattr(args, dest, None) is not None}


def cmd_quantize(args: argparse.Namespace) -> None:
    from cluster.job import load_job
    from cluster.launch import run_job

    report = run_job(load_job(args.config, _overrides(args)), restart=args.restart)
    print(json.dumps({"output_dir": report["output_dir"], "wall_seconds": round(report["wall_seconds"], 1),
                      "stages": len(report["stages"])}))


def cmd_eval(args: argparse.Namespace) -> None:
    import torch

    from quantizer.calibration import default_eval_file
    from quantizer.decoder import load_tokenizer
    from quantizer.evaluation import perplexity
    from quantizer.loading import load_model

    torch.manual_seed(0)
    model = load_model(Path(args.model))
    tokenizer = load_tokenizer(Path(args.model))
    data = Path(args.data) if args.data else default_eval_file()
    ppl = perplexity(model, tokenizer, data, args.window, args.max_windows)
    print(json.dumps({"model": args.model, "data": str(data), "perplexity": round(ppl, 4)}))


def cmd_plan(args: argparse.Namespace) -> None:
    from cluster.driver import default_budget, experts_line, job_sizes, plan_job, resolve_model
    from cluster.job import load_job
    from cluster.plan import (describe, describe_phases, estimate_phases, experts_see_every_token, host_bytes, human,
                              worker_flops)
    from quantizer.layer_builder import padded_intermediate
    from quantizer.model_io import CheckpointReader

    job = load_job(args.config, _overrides(args))
    reader = CheckpointReader(resolve_model(job.model).open())
    tokens = job.calibration.batch_size * job.calibration.max_len
    intermediate = padded_intermediate(reader.config, job.quant.pad_intermediate_to)
    schedule = job.resolved_schedule
    stages = 1 if schedule == "data_parallel" else job.stages
    plans, job = plan_job(reader, job, intermediate, tokens, stages, default_budget(job))
    print(describe(plans) + experts_line(reader, job))
    if job.resources.gpus_per_stage:
        sizes = job_sizes(reader, job, intermediate, tokens, job.quant.experts_per_chunk)
        print(f"  host RAM per worker: about {human(host_bytes(sizes))} (the process, and the float weights of one "
              "layer as read from disk before they move to the GPU)")
    workers = job.resources.workers if schedule == "data_parallel" else 1
    threads = job.resources.cpus_per_stage or max(1, (os.cpu_count() or 1) // workers)
    flops = args.worker_tflops * 1e12 if args.worker_tflops else worker_flops(job.resources.gpus_per_stage, threads)
    sparse = [i for i in range(reader.num_layers) if reader.arch.is_sparse(i)]
    calibration_tokens = job.calibration.num_samples * job.calibration.max_len
    estimate = estimate_phases(reader, sparse[0] if sparse else 0, intermediate, calibration_tokens, workers,
                               job.quant.bits, flops, args.link_gbps * 1e9,
                               experts_see_every_token(reader, job.quant.moe_calibration, calibration_tokens))
    if schedule == "data_parallel":
        print(describe_phases(estimate, reader.num_layers, workers, flops, args.link_gbps * 1e9,
                              job.resources.resolved_transport))
    else:
        print(f"schedule: {schedule}, {len(plans)} stage(s); the same "
              f"phases on one worker at a time: about {reader.num_layers * estimate.total_s / 60:.0f} min "
              "(data_parallel with --workers W divides the forward, Hessian and solve phases by up to W)")


QUANTIZATION_COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval, "plan": cmd_plan}
