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
import logging
from pathlib import Path
from typing import Any, AsyncIterator

import grpc
from ray import serve
from ray.serve.config import gRPCOptions
from ray.serve.grpc_util import RayServegRPCContext
from starlette.requests import Request
from starlette.responses import JSONResponse

from protos.grpc.health.v1 import health_pb2
from protos.rayquant.v1 import generation_pb2 as pb
from serving.config import GRPC_SERVICER_FUNCTIONS, ServeConfig
from serving.engine import GenerationEngine
from serving.requests import InvalidRequest, PreparedRequest, SamplingParams, StepOutput
from serving.vllm_engine import VLLMEngine

log = logging.getLogger("ray.serve")

_END = StopIteration  # Serve's marker for "this request's stream is over"
_NO_OUTPUT = None  # a batch entry for a request that produced nothing at this step


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
        self.engine_name, self.kv_cache_dtype = c.resolve_engine()
        if self.engine_name == "vllm":
            self.engine = VLLMEngine(Path(c.model), self.kv_cache_dtype, c.max_new_tokens_limit, c.max_context,
                                     c.max_batch_size, c.vllm)
        else:
            self.engine = GenerationEngine(c.model, self.kv_cache_dtype, c.max_new_tokens_limit, c.max_context,
                                           c.device, c.cache_dequantized_weights)
            self._batched.set_max_batch_size(c.max_batch_size)
            self._batched.set_batch_wait_timeout_s(c.batch_wait_timeout_s)
        log.info("replica serving %s with the %s engine, %s KV cache", c.model, self.engine_name, self.kv_cache_dtype)

    def __del__(self) -> None:
        """Serve calls this on replica shutdown: stop vLLM's engine process with it."""
        if getattr(self, "engine_name", None) == "vllm":
            self.engine.shutdown()

    def _prepare(self, request: pb.GenerateRequest, context: RayServegRPCContext | None) -> PreparedRequest:
        try:
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            params = sampling_params(request, self.config.max_new_tokens_limit)
            return self.engine.prepare(request.prompt, messages, params)
        except InvalidRequest as exc:
            if context is not None:
                context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
                context.set_details(str(exc))
            raise

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, requests: list[PreparedRequest]) -> AsyncIterator[list[Any]]:
        steps = self.engine.stream(requests)
        done = [False] * len(requests)
        while not all(done):
            step = await asyncio.to_thread(next, steps)  # decoding runs off the event loop
            out: list[Any] = []
            for i, item in enumerate(step):
                if item is None or done[i]:
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
        """This request's outputs, read to the end of its stream (so Serve's end marker is consumed)."""
        if self.engine_name == "vllm":
            async for item in self.engine.outputs(prepared):
                yield item
            return
        async for item in self._batched(prepared):
            if item is not _NO_OUTPUT:
                yield item

    async def Generate(self, request: pb.GenerateRequest,
                       grpc_context: RayServegRPCContext | None = None) -> pb.GenerateResponse:
        prepared = self._prepare(request, grpc_context)
        text, tokens, last = [], [], None
        async for out in self._outputs(prepared):
            text.append(out.text)
            tokens += out.token_ids
            last = out
        return pb.GenerateResponse(text="".join(text), token_ids=tokens, finish_reason=last.finish_reason,
                                   usage=pb.Usage(prompt_tokens=last.prompt_tokens,
                                                  completion_tokens=last.completion_tokens))

    async def GenerateStream(self, request: pb.GenerateRequest,
                             grpc_context: RayServegRPCContext | None = None) -> AsyncIterator[pb.GenerateChunk]:
        prepared = self._prepare(request, grpc_context)
        async for out in self._outputs(prepared):
            chunk = pb.GenerateChunk(text=out.text, token_ids=out.token_ids)
            if out.finish_reason:
                chunk.finish_reason = out.finish_reason
                chunk.usage.CopyFrom(pb.Usage(prompt_tokens=out.prompt_tokens,
                                              completion_tokens=out.completion_tokens))
            yield chunk

    async def ModelInfo(self, request: pb.ModelInfoRequest) -> pb.ModelInfoResponse:
        qcfg = self.engine.quant_config
        return pb.ModelInfoResponse(
            model=str(self.config.model), quantized=bool(qcfg), bits=int(qcfg.get("bits", 0)),
            group_size=int(qcfg.get("group_size", 0)), kv_cache_dtype=self.kv_cache_dtype,
            max_context=self.engine.max_context, max_new_tokens_limit=self.config.max_new_tokens_limit,
            engine=self.engine_name)

    async def Check(self, request: health_pb2.HealthCheckRequest) -> health_pb2.HealthCheckResponse:
        """grpc.health.v1.Health/Check: SERVING once the model is loaded (the replica is up)."""
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def __call__(self, request: Request) -> JSONResponse:
        """HTTP: GET /healthz → {"status": "ok", ...}; other paths → 404."""
        if request.url.path.rstrip("/").endswith("/healthz"):
            return JSONResponse({"status": "ok", "model": str(self.config.model), "engine": self.engine_name,
                                 "kv_cache_dtype": self.kv_cache_dtype})
        return JSONResponse({"error": "not found; the API is gRPC (rayquant.v1.Generation)"}, status_code=404)


def build_app(config: ServeConfig):
    """The Serve application for `config` (autoscaling and replica resources applied)."""
    return GenerationService.options(
        autoscaling_config=config.autoscaling, ray_actor_options=config.ray_actor_options,
        max_ongoing_requests=max(4 * config.max_batch_size, 16),
    ).bind(config.to_dict())


def start_server(config: ServeConfig, http_host: str = "127.0.0.1", blocking: bool = False) -> None:
    """Start Serve's proxies (gRPC on config.grpc_port, HTTP on http_host:config.http_port) on the connected
    Ray and deploy the app; returns once its replicas are up (blocking=True: serves until interrupted)."""
    serve.start(http_options={"host": http_host, "port": config.http_port},
                grpc_options=gRPCOptions(port=config.grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS))
    serve.run(build_app(config), name=config.app_name, route_prefix="/", blocking=blocking)


def app_builder(args: dict[str, Any]):
    """Import path for `serve run` / `serve deploy` / KubeRay serveConfigV2:
    `import_path: serving.deployment:app_builder` with the serve config keys as `args`."""
    return build_app(ServeConfig.from_dict(args))
