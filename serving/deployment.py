"""The Ray Serve application: one deployment that is both the gRPC ingress (Generation + grpc.health.v1)
and an HTTP health route. Each replica runs one engine (the serve config's `engine`, "auto" settled
per replica): vLLM's async engine, which batches continuously, or our transformers engine below.

Transformers engine batching: `@serve.batch` over a streaming handler. Requests that arrive within
`batch_wait_timeout_s` are decoded together (one forward pass per token for the whole batch) and each
request's stream ends as soon as it finishes. Unary and streaming calls share these batches. This is
static batching: a request arriving mid-batch waits for the next one. We kept it for this engine
because it is Serve's own mechanism (queueing, metrics and autoscaling signals work unchanged) and, on
CPU replicas, a batch's decode time is dominated by per-step overheads that static batches already
amortize; the vLLM engine is the continuous-batching one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from contextlib import aclosing
from pathlib import Path
from typing import Any, AsyncIterator, Iterable, NoReturn

import grpc
import ray
from ray import serve
from ray.serve.config import gRPCOptions
from ray.serve.grpc_util import RayServegRPCContext
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from protos.grpc.health.v1 import health_pb2
from protos.rayquant.v1 import generation_pb2 as pb
from serving.auth import Unauthenticated, check_api_key
from quantizer.errors import ConfigError
from serving.config import GRPC_SERVICER_FUNCTIONS, ServeConfig
from serving.engine import GenerationEngine, serving_dtype
from serving.metrics import CallMetrics, ServingMetrics
from serving.openai_api import Completion, OpenAIError, models_response, parse_request
from serving.proxy_hooks import hook_registry, lockdown_problems, private_api_problem, proxy_env, wait_until_locked_down
from serving.requests import (GRPC_FIELDS, OPENAI_FIELDS, InvalidRequest, PreparedRequest, RequestTooLarge,
                              SamplingParams, StepOutput)
from serving.vllm_engine import VLLMEngine

log = logging.getLogger("ray.serve")

_END = StopIteration  # Serve's marker for "this request's stream is over"
_NO_OUTPUT = None  # a batch entry for a request that produced nothing at this step
LOCKDOWN_WAIT_S = 60.0  # how long start_server waits for every proxy to report its hooks and address
PROXY_READY_ENV = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"  # seconds per readiness check of a starting proxy


def _refuse(context: RayServegRPCContext | None, code: grpc.StatusCode, exc: Exception) -> NoReturn:
    """Answer the call with `code` and the exception's message, then re-raise to end the handler."""
    if context is not None:
        context.set_code(code)
        context.set_details(str(exc))
    raise exc


def sampling_params(request: pb.GenerateRequest, max_new_tokens_limit: int) -> SamplingParams:
    """Proto fields → SamplingParams, with defaults for the optional fields left unset."""
    def get(name: str, default):
        return getattr(request, name) if request.HasField(name) else default

    return SamplingParams(max_new_tokens=get("max_new_tokens", min(128, max_new_tokens_limit)),
                          temperature=get("temperature", 1.0), top_p=get("top_p", 1.0), top_k=get("top_k", 0),
                          seed=get("seed", None), stop=tuple(request.stop))


@serve.deployment
class GenerationService:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = c = ServeConfig.from_dict(config)
        c.check_model()
        self.api_key = c.api_key()  # a named key that is missing here fails the replica, never serves open
        self.engine_name, self.kv_cache_dtype = c.resolve_engine()
        self.model_names = [c.served_model_name or str(c.model)]  # what OpenAI clients send as `model`
        self.started = int(time.time())
        self.metrics = ServingMetrics(self.engine_name, self.model_names[0])
        if self.engine_name == "vllm":
            self.engine = VLLMEngine(Path(c.model), self.kv_cache_dtype, c.max_new_tokens_limit, c.max_context,
                                     c.max_batch_size, c.vllm, serving_dtype(Path(c.model), c.dtype, True),
                                     on_kv_cache_usage=self.metrics.set_kv_cache_usage)
        else:
            self.engine = GenerationEngine(c.model, self.kv_cache_dtype, c.max_new_tokens_limit, c.max_context,
                                           c.device, c.cache_dequantized_weights, c.dtype)
            self._batched.set_max_batch_size(c.max_batch_size)
            self._batched.set_batch_wait_timeout_s(c.batch_wait_timeout_s)
        log.info("replica serving %s with the %s engine in %s, %s KV cache%s", c.model, self.engine_name,
                 self.engine.dtype, self.kv_cache_dtype, ", API key required" if self.api_key else "")

    def __del__(self) -> None:
        """Serve calls this on replica shutdown: stop vLLM's engine process with it."""
        if getattr(self, "engine_name", None) == "vllm":
            self.engine.shutdown()

    def _admit(self, call: CallMetrics, prompt: str, messages: list[dict[str, str]], params: SamplingParams,
               size: int, metadata: Iterable[tuple[str, str]], fields: dict[str, str]) -> PreparedRequest:
        """API key, then limits and validation: the same for gRPC and HTTP calls. Raises Unauthenticated,
        RequestTooLarge or InvalidRequest naming the problem and the fix (in the caller's field names)."""
        c = self.config
        code = "OK"
        try:
            check_api_key(self.api_key, metadata)
            if size > c.max_request_bytes:
                raise RequestTooLarge(f"the request is {size} bytes; this server takes at most {c.max_request_bytes} "
                                      f"(max_request_bytes): send a shorter {fields['prompt']}")
            prepared = self.engine.prepare(prompt, messages, params, fields)
            if c.max_prompt_tokens and len(prepared.prompt_ids) > c.max_prompt_tokens:
                raise InvalidRequest(f"the prompt has {len(prepared.prompt_ids)} tokens; this server takes at most "
                                     f"{c.max_prompt_tokens} prompt tokens (max_prompt_tokens): shorten the prompt",
                                     fields["prompt"])
            call.accepted(len(prepared.prompt_ids))
            return prepared
        except Unauthenticated:
            code = "UNAUTHENTICATED"
            raise
        except InvalidRequest:
            code = "INVALID_ARGUMENT"
            raise
        finally:
            if code != "OK":
                call.finished(code)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, requests: list[PreparedRequest]) -> AsyncIterator[list[Any]]:
        steps = self.engine.stream(requests)
        done = [False] * len(requests)
        while not all(done):
            step = await asyncio.to_thread(next, steps, None)  # decoding runs off the event loop
            if step is None:  # every remaining caller has gone
                return
            out: list[Any] = []
            for i, item in enumerate(step):
                if item is None or done[i]:
                    done[i] = True
                    out.append(_END)
                else:
                    out.append(item)
                    done[i] = item.finish_reason is not None
            yield out
            finished_now = [i for i, item in enumerate(out) if isinstance(item, StepOutput) and item.finish_reason]
            if finished_now and not all(done):
                # End those streams now rather than one decode step later; the others get a placeholder.
                yield [_END if done[i] else _NO_OUTPUT for i in range(len(requests))]

    async def _outputs(self, prepared: PreparedRequest) -> AsyncIterator[StepOutput]:
        """This request's outputs, read to the end of its stream (so Serve's end marker is consumed). When
        the caller goes (finished, cancelled, past its deadline) the request is closed: the transformers
        engine stops decoding its row, vLLM aborts it."""
        if self.engine_name == "vllm":
            async with aclosing(self.engine.outputs(prepared)) as outputs:
                async for item in outputs:
                    yield item
            return
        try:
            async for item in self._batched(prepared):
                if item is not _NO_OUTPUT:
                    yield item
        finally:
            prepared.closed = True

    async def _generate(self, prepared: PreparedRequest, call: CallMetrics) -> AsyncIterator[StepOutput]:
        """Decoding of an admitted request, with its metrics. Every generator from the gRPC method down closes
        the one it reads when it is closed itself (`aclosing`): left to the garbage collector, the request would
        be closed only once collected — a cancelled stream could keep its batch slot for a whole decode."""
        code = "INTERNAL"
        try:
            async with aclosing(self._outputs(prepared)) as outputs:
                async for out in outputs:
                    call.tokens_sent(len(out.token_ids))
                    yield out
            code = "OK"
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            raise
        finally:
            call.finished(code)

    async def _serve(self, method: str, request: pb.GenerateRequest,
                     context: RayServegRPCContext | None) -> AsyncIterator[StepOutput]:
        """One gRPC call: admission (errors as gRPC status codes), then decoding."""
        call = self.metrics.call(method)
        metadata = context.invocation_metadata() if context is not None else []
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        try:
            prepared = self._admit(call, request.prompt, messages, sampling_params(request, self.config
                                                                                   .max_new_tokens_limit),
                                   request.ByteSize(), metadata, GRPC_FIELDS)
        except Unauthenticated as exc:
            _refuse(context, grpc.StatusCode.UNAUTHENTICATED, exc)
        except InvalidRequest as exc:
            _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, exc)
        async with aclosing(self._generate(prepared, call)) as outputs:
            async for out in outputs:
                yield out

    async def Generate(self, request: pb.GenerateRequest,
                       grpc_context: RayServegRPCContext | None = None) -> pb.GenerateResponse:
        text, tokens, last = [], [], None
        async with aclosing(self._serve("Generate", request, grpc_context)) as outputs:
            async for out in outputs:
                text.append(out.text)
                tokens += out.token_ids
                last = out
        return pb.GenerateResponse(text="".join(text), token_ids=tokens, finish_reason=last.finish_reason,
                                   usage=pb.Usage(prompt_tokens=last.prompt_tokens,
                                                  completion_tokens=last.completion_tokens))

    async def GenerateStream(self, request: pb.GenerateRequest,
                             grpc_context: RayServegRPCContext | None = None) -> AsyncIterator[pb.GenerateChunk]:
        async with aclosing(self._serve("GenerateStream", request, grpc_context)) as outputs:
            async for out in outputs:
                chunk = pb.GenerateChunk(text=out.text, token_ids=out.token_ids)
                if out.finish_reason:
                    chunk.finish_reason = out.finish_reason
                    chunk.usage.CopyFrom(pb.Usage(prompt_tokens=out.prompt_tokens,
                                                  completion_tokens=out.completion_tokens))
                yield chunk

    async def ModelInfo(self, request: pb.ModelInfoRequest,
                        grpc_context: RayServegRPCContext | None = None) -> pb.ModelInfoResponse:
        try:
            check_api_key(self.api_key, grpc_context.invocation_metadata() if grpc_context is not None else [])
        except Unauthenticated as exc:
            _refuse(grpc_context, grpc.StatusCode.UNAUTHENTICATED, exc)
        qcfg = self.engine.quant_config
        return pb.ModelInfoResponse(
            model=str(self.config.model), quantized=bool(qcfg), bits=int(qcfg.get("bits", 0)),
            group_size=int(qcfg.get("group_size", 0)), kv_cache_dtype=self.kv_cache_dtype,
            max_context=self.engine.max_context, max_new_tokens_limit=self.config.max_new_tokens_limit,
            engine=self.engine_name, dtype=self.engine.dtype)

    async def Check(self, request: health_pb2.HealthCheckRequest) -> health_pb2.HealthCheckResponse:
        """grpc.health.v1.Health/Check: SERVING once the model is loaded (the replica is up). No API key
        needed, so load balancers and probes can ask."""
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def __call__(self, request: Request) -> Response:
        """HTTP: GET /healthz, and the OpenAI-compatible API (serving/openai_api.py) under /v1."""
        path = request.url.path.rstrip("/") or "/"
        if path.endswith("/healthz"):
            return JSONResponse({"status": "ok", "model": str(self.config.model), "engine": self.engine_name,
                                 "kv_cache_dtype": self.kv_cache_dtype})
        try:
            if path == "/v1/models" and request.method == "GET":
                self._http_key(request)
                return JSONResponse(models_response(self.model_names, self.started))
            if path in ("/v1/completions", "/v1/chat/completions") and request.method == "POST":
                return await self._openai(request, chat=path == "/v1/chat/completions")
            raise OpenAIError(404, f"no route {request.method} {path}: this server answers POST /v1/completions, "
                                   "POST /v1/chat/completions, GET /v1/models and GET /healthz over HTTP, and "
                                   "rayquant.v1.Generation over gRPC", code="not_found")
        except OpenAIError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)

    def _http_key(self, request: Request) -> None:
        try:
            check_api_key(self.api_key, request.headers.items())
        except Unauthenticated as exc:
            raise OpenAIError(401, str(exc).replace("gRPC metadata", "the header"), code="invalid_api_key") from exc

    async def _openai(self, request: Request, chat: bool) -> Response:
        """POST /v1/completions and /v1/chat/completions: the same admission as gRPC calls, errors in OpenAI's
        shape (401 key, 413 size, 400 field, 404 model), then JSON or server-sent events."""
        call = self.metrics.call("chat.completions" if chat else "completions")
        try:
            self._http_key(request)
            raw = await request.body()
            if len(raw) > self.config.max_request_bytes:
                raise OpenAIError(413, f"the request is {len(raw)} bytes; this server takes at most "
                                       f"{self.config.max_request_bytes} (max_request_bytes): send a shorter prompt",
                                  code="request_too_large")
            try:
                body = json.loads(raw or b"null")
            except ValueError as exc:
                raise OpenAIError(400, f"the request body is not valid JSON ({exc})") from exc
            parsed = parse_request(body, chat)
            if parsed.model not in self.model_names:
                raise OpenAIError(404, f"the model `{parsed.model}` does not exist here; this server serves "
                                       f"{self.model_names}", param="model", code="model_not_found")
            prepared = self._admit(call, parsed.prompt, parsed.messages, parsed.params, len(raw),
                                   request.headers.items(), OPENAI_FIELDS)
        except OpenAIError as exc:
            call.finished({401: "UNAUTHENTICATED", 404: "NOT_FOUND"}.get(exc.status, "INVALID_ARGUMENT"))
            raise
        except InvalidRequest as exc:
            raise OpenAIError.invalid(exc) from exc
        completion = Completion(parsed, parsed.model)
        outputs = self._generate(prepared, call)
        if parsed.stream:
            return StreamingResponse(_until_disconnect(request, completion.events(outputs)),
                                     media_type="text/event-stream")
        return JSONResponse(completion.response([out async for out in outputs]))


async def _until_disconnect(request: Request, events: AsyncIterator[str]) -> AsyncIterator[str]:
    """The events of a streamed response until the client goes: Serve hands the replica the proxy's
    `http.disconnect` but (ASGI ≥ 2.4) a send to a gone client does not fail, so a watcher cancels the stream,
    which closes the request (its batch slot freed, its vLLM request aborted)."""
    stream = asyncio.current_task()

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        stream.cancel()

    watcher = asyncio.create_task(watch())
    try:
        async for event in events:
            yield event
    finally:
        watcher.cancel()


def build_app(config: ServeConfig):
    """The Serve application for `config` (autoscaling and replica resources applied)."""
    return GenerationService.options(
        autoscaling_config=config.autoscaling, ray_actor_options=config.ray_actor_options,
        max_ongoing_requests=max(4 * config.max_batch_size, 16),
    ).bind(config.to_dict())


def start_server(config: ServeConfig) -> bool:
    """Start Serve's proxies on the connected Ray (gRPC on config.host:grpc_port, HTTP on config.host:http_port)
    with rayquant's proxy hooks, deploy the app, and return once its replicas are up and every proxy is
    verified to bind the configured address. Fails closed: on a Ray the hooks were not tested on, on a
    cluster whose Serve runs without them, or when a proxy binds anything else, nothing is served and a
    ConfigError says why. Returns whether this call started Serve."""
    problem = private_api_problem()
    if problem:
        raise ConfigError(f"refusing to serve: {problem} (the gRPC proxy could otherwise listen on every interface)")
    registry = hook_registry()  # the proxies report to it
    started = not serve_running()
    if started:
        ray.get(registry.clear.remote())
        try:
            serve.start(http_options={"host": config.host, "port": config.http_port},
                        grpc_options=gRPCOptions(port=config.grpc_port,
                                                 grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS),
                        controller_options={"runtime_env": {"env_vars": controller_env(config.host)}})
        except BaseException:
            serve.shutdown()  # a half-started Serve (a proxy that timed out) would refuse every later start
            raise
    else:
        problems = lockdown_problems(config.host, config.grpc_port)
        if problems:
            raise ConfigError("Serve already runs on this cluster without rayquant's proxy hooks for "
                              f"{config.host}:{config.grpc_port} ({'; '.join(problems)}): stop it (`serve shutdown`) "
                              "or serve on a cluster where Serve is not running yet")
    try:
        serve.run(build_app(config), name=config.app_name, route_prefix="/", blocking=False)
    except BaseException:
        stop_server(config, started)
        raise
    problems = wait_until_locked_down(config.host, config.grpc_port, LOCKDOWN_WAIT_S)
    if problems:
        stop_server(config, started)
        raise ConfigError(f"refusing to serve: the gRPC proxy is not locked down ({'; '.join(problems)})")
    return started


def controller_env(host: str) -> dict[str, str]:
    """The Serve controller's environment: the proxy hooks' (`proxy_env`), and a longer readiness check for the
    proxies it starts. Serve kills a proxy that fails 3 checks of 5 s; one starting beside a quantization job
    on a busy 2-core node took longer, and `serve.start` failed. 3 × 15 s stays inside serve.start's 60 s wait."""
    return {**proxy_env(host), PROXY_READY_ENV: os.environ.get(PROXY_READY_ENV, "15")}


def serve_running() -> bool:
    status = serve.status()
    return bool(status.proxies or status.applications)


def stop_server(config: ServeConfig, started_serve: bool) -> None:
    """Remove our application only; Serve itself too if this process started it and no other app remains."""
    if config.app_name in serve.status().applications:
        serve.delete(config.app_name)
    if started_serve and not serve.status().applications:
        serve.shutdown()


def app_builder(args: dict[str, Any]):
    """Import path for `serve run` / `serve deploy` / KubeRay serveConfigV2:
    `import_path: serving.deployment:app_builder` with the serve config keys as `args`."""
    return build_app(ServeConfig.from_dict(args))
