"""Serving subcommands of the `rayquant` CLI: `serve` (start the gRPC server) and `generate` (a client)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("rayquant")


def add_serving_commands(sub) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint over gRPC with Ray Serve (blocks until stopped)",
                       description="Start Ray Serve with a gRPC ingress (rayquant.v1.Generation and "
                       "grpc.health.v1.Health) and GET /healthz over HTTP, bound to 127.0.0.1 unless the "
                       "config's host or --host says otherwise; with api_key_env set, calls need "
                       "`authorization: Bearer <key>`. Local Ray (Prometheus metrics on metrics_port) "
                       "unless --address.")
    p.add_argument("--config", type=Path, required=True, help="serve config YAML (see configs/serve.yaml)")
    p.add_argument("--model", help="override the config's checkpoint dir")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--host", help="address to bind (default: the config's host, 127.0.0.1 = this machine only; "
                   "0.0.0.0 = every interface)")
    g = sub.add_parser("generate", help="send one request to a running server",
                       description="Call Generate (or GenerateStream with --stream) on HOST:PORT.")
    g.add_argument("--address", default="localhost:9000", help="gRPC HOST:PORT (default localhost:9000)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--stream", action="store_true", help="print text as it is decoded")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--temperature", type=float, help="0 = greedy (default 1.0)")
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--api-key-env", metavar="NAME", help="send the API key held in env var NAME "
                   "(as `authorization: Bearer <key>`)")


def cmd_serve(args: argparse.Namespace) -> None:
    import time

    import ray

    from rayquant.ray_connect import connect_ray
    from rayquant.ray_private import stop_local_ray
    from serving.config import load_serve_config
    from serving.deployment import start_server, stop_server

    overrides = {k: v for k, v in {"model": args.model, "host": args.host}.items() if v}
    config = load_serve_config(args.config, overrides)
    config.check_model()
    engine, kv_cache_dtype = config.resolve_engine()  # an impossible engine choice fails here, not in a replica
    if not (args.address or os.environ.get("RAY_ADDRESS")):
        config.api_key()  # the local Ray's replicas inherit this environment: a missing key fails here
    started = connect_ray(args.address, 1, config.metrics_port)
    log.info("serving %s as %r with the %s engine (%s KV cache): gRPC on %s:%d, OpenAI API and GET /healthz on "
             "http://%s:%d%s%s (Ctrl-C stops)", config.model, config.served_model_name or config.model, engine,
             kv_cache_dtype, config.host, config.grpc_port, config.host,
             config.http_port, f", API key from ${config.api_key_env}" if config.api_key_env else "",
             f", Prometheus metrics on :{config.metrics_port}/metrics" if started else "")
    started_serve = False
    try:
        started_serve = start_server(config)
        log.info("serving; Ctrl-C removes the %r application", config.app_name)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        log.info("stopping: removing the %r application", config.app_name)
    finally:
        if ray.is_initialized():
            stop_server(config, started_serve)
        if started:
            stop_local_ray()


def cmd_generate(args: argparse.Namespace) -> None:
    import grpc

    from serving.client import GenerationClient

    sampling = {k: v for k, v in {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                                  "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed}.items()
                if v is not None}
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            from quantizer.errors import ConfigError

            raise ConfigError(f"--api-key-env {args.api_key_env}: that variable is unset or empty")
    client = GenerationClient(args.address, api_key=api_key)
    try:
        if args.stream:
            for chunk in client.stream(args.prompt, stop=args.stop, **sampling):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                if chunk.finish_reason:
                    sys.stdout.write(f"\n[finish_reason={chunk.finish_reason} "
                                     f"completion_tokens={chunk.usage.completion_tokens}]\n")
        else:
            r = client.generate(args.prompt, stop=args.stop, **sampling)
            print(json.dumps({"text": r.text, "finish_reason": r.finish_reason,
                              "prompt_tokens": r.usage.prompt_tokens,
                              "completion_tokens": r.usage.completion_tokens}))
    except grpc.RpcError as exc:
        from quantizer.errors import ConfigError

        raise ConfigError(f"{exc.code().name}: {exc.details()}") from exc
    finally:
        client.close()


SERVING_COMMANDS = {"serve": cmd_serve, "generate": cmd_generate}
