"""What Ray Serve's proxies do not offer, set from inside each proxy process, and the checks that make the
server fail closed when they are not in place.

- The address the gRPC proxy binds: Serve starts the gRPC server on `[::]:port` (every interface) with no host
  option; we bind the serve config's `host` instead (127.0.0.1 unless told otherwise).
- The status a gRPC client gets when the replica running its call dies: Serve answers INTERNAL; we answer
  UNAVAILABLE ("retry"), the code gRPC clients and load balancers treat as transient.
- HTTP under /v1 while no replica of the app is routable (starting, redeploying): Serve answers a plain-text
  404 "Path … not found"; OpenAI clients get 503 in OpenAI's error shape ("retry"), as vLLM's server says.

Serve calls the function named by RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH inside every proxy process
before that proxy starts its servers (it is meant to return HTTP middlewares). `proxy_env(host)` names
`install` there and is handed to the Serve controller as env_vars, which the proxies it starts inherit.

Both hooks replace private Serve functions, so they are used only on the Ray versions they were tested on
(`TESTED_RAY_VERSIONS`, which pyproject pins): elsewhere `install` refuses and the proxy does not start.
Each proxy reports to a small registry actor what it installed and the address it bound; the server
starts serving only once every proxy has reported the configured address and this node's sockets agree.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import grpc
import ray

from rayquant.ray_private import TESTED_RAY_VERSIONS, untested_ray

log = logging.getLogger("ray.serve")
HOST_ENV = "RAYQUANT_GRPC_HOST"
CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
REPLICA_DIED = "the replica serving this call stopped (it died or was replaced); retry the call"
REGISTRY_NAME, REGISTRY_NAMESPACE = "rayquant_proxy_hooks", "rayquant"


def proxy_env(host: str) -> dict[str, str]:
    """Environment for the Serve controller (and so its proxies): gRPC bound to `host`, replica deaths
    answered UNAVAILABLE."""
    return {CALLBACK_ENV: "serving.proxy_hooks.install", HOST_ENV: host}


def grpc_address(host: str, port: int | str) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def private_api_problem(version: str | None = None) -> str | None:
    """Why the hooks cannot be trusted on this Ray (None: they can): an untested version, or a private
    function they replace that is gone."""
    version = version or ray.__version__
    if untested_ray("the Serve proxy hooks", version):
        return (f"Ray {version} is not a version rayquant's Serve proxy hooks were tested on "
                f"({', '.join(TESTED_RAY_VERSIONS)}); install ray[serve]=={TESTED_RAY_VERSIONS[-1]}")
    try:
        from ray.serve._private import default_impl, proxy
        from ray.serve._private.proxy_request_response import ResponseStatus  # noqa: F401
    except ImportError as exc:
        return f"Ray Serve's private modules the hooks patch are gone ({exc})"
    missing = [f"{module.__name__}.{name}" for module, name in ((default_impl, "add_grpc_address"),
                                                                 (proxy, "get_grpc_response_status"))
               if not callable(getattr(module, name, None))]
    return f"Ray Serve lacks {', '.join(missing)}, which the hooks replace" if missing else None


@ray.remote(num_cpus=0)
class HookRegistry:
    """What each proxy's hooks did, by node id: installed (bool), host, bound address, or the refusal."""

    def __init__(self) -> None:
        self.reports: dict[str, dict[str, Any]] = {}

    def report(self, node_id: str, fields: dict[str, Any]) -> None:
        self.reports.setdefault(node_id, {}).update(fields)

    def all(self) -> dict[str, dict[str, Any]]:
        return self.reports

    def clear(self) -> None:
        """Before Serve starts anew: reports of earlier proxies no longer count."""
        self.reports = {}


def hook_registry():
    """The cluster's registry actor (created on first use; it outlives this process)."""
    return HookRegistry.options(name=REGISTRY_NAME, namespace=REGISTRY_NAMESPACE, get_if_exists=True,
                                lifetime="detached").remote()


def _report(**fields: Any) -> None:
    """From a proxy process: tell the registry what happened (the server checks it before serving)."""
    if not ray.is_initialized():  # not in a proxy (a test calling install directly)
        return
    try:
        registry = ray.get_actor(REGISTRY_NAME, namespace=REGISTRY_NAMESPACE)
        registry.report.remote(ray.get_runtime_context().get_node_id(), {**fields, "pid": os.getpid()})
    except Exception as exc:  # no registry: the server that checks will find no report and refuse
        log.warning("rayquant proxy hooks: could not report to the registry (%s)", exc)


class UnavailableWhileNoReplica:
    """ASGI middleware of the HTTP proxy: Serve's own plain-text 404 for a /v1 path (no routable replica)
    becomes a 503 in OpenAI's error shape. The app's own 404s (JSON) pass unchanged."""

    BODY = json.dumps({"error": {"message": "no replica of this model is ready yet; retry shortly",
                                 "type": "service_unavailable", "param": None, "code": 503}}).encode()

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope.get("type") != "http" or not scope.get("path", "").startswith("/v1"):
            await self.app(scope, receive, send)
            return
        replaced = False

        async def guarded(message) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start" and message["status"] == 404 and not any(
                    k.lower() == b"content-type" and b"json" in v for k, v in message.get("headers", [])):
                replaced = True
                return
            if replaced:
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    await send({"type": "http.response.start", "status": 503,
                                "headers": [(b"content-type", b"application/json"),
                                            (b"content-length", str(len(self.BODY)).encode())]})
                    await send({"type": "http.response.body", "body": self.BODY})
                return
            await send(message)

        await self.app(scope, receive, guarded)


def install() -> list:
    """Runs in each proxy process; returns the HTTP middleware above. Refuses (the proxy then fails to start)
    on a Ray whose private Serve functions were not tested with these hooks."""
    problem = private_api_problem()
    if problem:
        _report(installed=False, problem=problem)
        raise RuntimeError(f"rayquant proxy hooks refused: {problem}")
    from ray.serve._private import default_impl, proxy
    from ray.serve._private.proxy_request_response import ResponseStatus

    host = os.environ.get(HOST_ENV) or "::"
    serve_add_address = default_impl.add_grpc_address

    def add_grpc_address(server, address: str) -> None:
        bound = grpc_address(host, address.rpartition(":")[2])
        serve_add_address(server, bound)
        _report(bound=bound)

    default_impl.add_grpc_address = add_grpc_address
    serve_status = proxy.get_grpc_response_status

    def get_grpc_response_status(exc: BaseException, request_timeout_s, request_id: str):
        if replica_died(exc):
            return ResponseStatus(code=grpc.StatusCode.UNAVAILABLE, is_error=True, message=REPLICA_DIED)
        return serve_status(exc, request_timeout_s, request_id)

    proxy.get_grpc_response_status = get_grpc_response_status
    _report(installed=True, host=host)
    log.info("rayquant proxy hooks: gRPC binds %s; replica deaths answer UNAVAILABLE", host)
    from starlette.middleware import Middleware

    return [Middleware(UnavailableWhileNoReplica)]


def replica_died(exc: BaseException) -> bool:
    """The call failed because its replica's actor died (not because of the call itself)."""
    from ray.exceptions import RayActorError, RayTaskError

    return isinstance(exc, RayActorError) and not isinstance(exc, RayTaskError)


def listening_addresses(port: int) -> set[str]:
    """Local addresses of this machine's TCP sockets listening on `port` ('127.0.0.1', '0.0.0.0', '::'),
    read from /proc (Linux)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.rpartition(":")
            if state != "0A" or int(hex_port, 16) != port:
                continue
            if len(address) == 32 and address.startswith("0000000000000000FFFF0000"):  # IPv4-mapped IPv6
                address = address[24:]
            if len(address) == 8:
                found.add(".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0)))
            else:
                found.add("::" if int(address, 16) == 0 else "::1" if int(address, 16) == 1 else address)
    return found


def _allowed(host: str) -> set[str]:
    """The addresses a socket bound to `host` may show (a name resolves to its addresses)."""
    try:
        return {host} | {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return {host}


def lockdown_problems(host: str, port: int) -> list[str]:
    """Why the running proxies are not the locked-down ones for host:port (empty: they are)."""
    from ray import serve

    proxies = serve.status().proxies
    if not proxies:
        return ["no Serve proxy is running"]
    reports = ray.get(hook_registry().all.remote(), timeout=30)
    expected = grpc_address(host, port)
    problems = []
    for node_id in proxies:
        report = reports.get(node_id)
        if report is None or not report.get("installed"):
            why = report.get("problem") if report else "it never ran the hooks (Serve was started without them)"
            problems.append(f"the proxy on node {node_id[:12]} has no rayquant hooks: {why}")
        elif report.get("bound") != expected:
            problems.append(f"the proxy on node {node_id[:12]} bound {report.get('bound')}, not {expected}")
    here = ray.get_runtime_context().get_node_id()
    if here in proxies and Path("/proc/net/tcp").is_file():
        stray = listening_addresses(port) - _allowed(host)
        if stray:
            problems.append(f"gRPC port {port} listens on {sorted(stray)} beside {host}")
    return problems


def wait_until_locked_down(host: str, port: int, timeout_s: float) -> list[str]:
    """Poll until every proxy reports the hooks and the configured address; returns what is still wrong."""
    deadline = time.time() + timeout_s
    while True:
        problems = lockdown_problems(host, port)
        if not problems or time.time() > deadline:
            return problems
        time.sleep(0.5)
