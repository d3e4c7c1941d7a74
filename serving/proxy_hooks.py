"""Two things Ray Serve 2.60's gRPC proxy does not offer, set from inside each proxy process:

- the address it binds: Serve starts the gRPC server on `[::]:port` (every interface) with no host option;
  we bind the serve config's `host` instead (127.0.0.1 unless told otherwise);
- the status a client gets when the replica running its call dies: Serve answers INTERNAL; we answer
  UNAVAILABLE ("retry"), the code gRPC clients and load balancers treat as transient.

Serve calls the function named by RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH inside every proxy process
before that proxy starts its servers (it is meant to return HTTP middlewares). `proxy_env(host)` names
`install` there and is handed to the Serve controller as env_vars, which the proxies it starts inherit.
"""

from __future__ import annotations

import logging
import os

import grpc

log = logging.getLogger("ray.serve")
HOST_ENV = "RAYQUANT_GRPC_HOST"
CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
REPLICA_DIED = "the replica serving this call stopped (it died or was replaced); retry the call"


def proxy_env(host: str) -> dict[str, str]:
    """Environment for the Serve controller (and so its proxies): gRPC bound to `host`, replica deaths
    answered UNAVAILABLE."""
    return {CALLBACK_ENV: "serving.proxy_hooks.install", HOST_ENV: host}


def grpc_address(host: str, port: int | str) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def install() -> list:
    """Runs in each proxy process. Returns no HTTP middlewares."""
    from ray.serve._private import default_impl, proxy
    from ray.serve._private.proxy_request_response import ResponseStatus

    host = os.environ.get(HOST_ENV)
    if host:
        serve_add_address = default_impl.add_grpc_address

        def add_grpc_address(server, address: str) -> None:
            serve_add_address(server, grpc_address(host, address.rpartition(":")[2]))

        default_impl.add_grpc_address = add_grpc_address

    serve_status = proxy.get_grpc_response_status

    def get_grpc_response_status(exc: BaseException, request_timeout_s, request_id: str):
        if replica_died(exc):
            return ResponseStatus(code=grpc.StatusCode.UNAVAILABLE, is_error=True, message=REPLICA_DIED)
        return serve_status(exc, request_timeout_s, request_id)

    proxy.get_grpc_response_status = get_grpc_response_status
    log.info("rayquant proxy hooks: gRPC binds %s; replica deaths answer UNAVAILABLE", host or "[::]")
    return []


def replica_died(exc: BaseException) -> bool:
    """The call failed because its replica's actor died (not because of the call itself)."""
    from ray.exceptions import RayActorError, RayTaskError

    return isinstance(exc, RayActorError) and not isinstance(exc, RayTaskError)
