"""The gRPC server on real Ray Serve over loopback, called by a real gRPC client."""

import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from bench.common import free_port
from serving.client import GenerationClient
from serving.config import ServeConfig
from serving.engine import GenerationEngine, SamplingParams

PROMPTS = ["The history of the Royal Navy", "Quantization reduces", "In 1776,"]


@pytest.fixture(scope="module")
def quantized_tiny(tiny_llama_gptq, ray_local):
    return tiny_llama_gptq


def serve_config(model: Path, **settings) -> ServeConfig:
    """A one-replica server on free loopback ports."""
    return ServeConfig(model=str(model), max_new_tokens_limit=64, max_batch_size=8, grpc_port=free_port(),
                       http_port=free_port(),
                       autoscaling={"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8}, **settings)


@contextmanager
def running_server(config: ServeConfig, api_key: str | None = None) -> Iterator[GenerationClient]:
    """Ray Serve with the gRPC ingress on loopback, until the block ends; yields a client once healthy."""
    from ray import serve

    from serving.deployment import start_server

    start_server(config)
    client = GenerationClient(f"127.0.0.1:{config.grpc_port}", api_key=api_key)
    try:
        client.wait_healthy()
        yield client
    finally:
        client.close()
        serve.shutdown()


def http_json(config: ServeConfig, path: str, body: dict | bytes | None = None, key: str | None = None
              ) -> tuple[int, dict]:
    """(status, parsed JSON) of an HTTP call to the server: POST `body` (a dict is sent as JSON), else GET."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(f"http://127.0.0.1:{config.http_port}{path}", data=data, headers=headers,
                                     method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def server(quantized_tiny, ray_local):
    config = serve_config(quantized_tiny, engine="transformers", kv_cache_dtype="int8")
    with running_server(config) as client:
        yield config, client


def test_unary_stream_and_engine_agree_on_greedy_text(server, quantized_tiny):
    config, client = server
    engine = GenerationEngine(quantized_tiny, kv_cache_dtype="int8")
    for prompt in PROMPTS:
        unary = client.generate(prompt, max_new_tokens=16, temperature=0)
        chunks = list(client.stream(prompt, max_new_tokens=16, temperature=0))
        direct = engine.generate(engine.prepare(prompt, [], SamplingParams(max_new_tokens=16, temperature=0)))
        assert unary.text == "".join(c.text for c in chunks) == direct.text
        assert list(unary.token_ids) == [t for c in chunks for t in c.token_ids] == direct.token_ids
        assert unary.finish_reason == chunks[-1].finish_reason == direct.finish_reason
        assert unary.usage.completion_tokens == chunks[-1].usage.completion_tokens == len(direct.token_ids)


def assert_stop_strings_and_seeded_sampling(client: GenerationClient, greedy_prompt: str, sampled_prompt: str) -> None:
    """A stop string taken from the greedy text cuts it there (finish_reason stop); same seed, same sample."""
    full = client.generate(greedy_prompt, max_new_tokens=24, temperature=0)
    stop = full.text[5:8]
    cut = client.generate(greedy_prompt, max_new_tokens=24, temperature=0, stop=[stop])
    assert cut.finish_reason == "stop" and stop not in cut.text and full.text.startswith(cut.text)
    a = client.generate(sampled_prompt, max_new_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=7)
    b = client.generate(sampled_prompt, max_new_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=7)
    assert a.text == b.text


def cancel_a_stream(client: GenerationClient, prompt: str) -> None:
    """Read one chunk of a long stream, then hang up; the server answers the next call as usual."""
    stream = client.stream(prompt, max_new_tokens=60, temperature=0)
    next(stream)
    stream.cancel()
    assert client.generate(prompt, max_new_tokens=4, temperature=0).finish_reason in ("length", "eos")


def test_stop_strings_and_seeded_sampling(server):
    assert_stop_strings_and_seeded_sampling(server[1], PROMPTS[0], PROMPTS[1])


def test_model_info_health_and_http_route(server):
    config, client = server
    info = client.model_info()
    assert info.quantized and info.bits == 4 and info.kv_cache_dtype == "int8" and info.max_new_tokens_limit == 64
    assert info.engine == "transformers" and info.dtype == "float32"  # ours computes in float32 on CPU
    assert client.healthy()
    body = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{config.http_port}/healthz", timeout=30).read())
    assert body["status"] == "ok"


BAD_REQUESTS = [  # (request fields, words of the INVALID_ARGUMENT message) for a server with limit 64
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens must be between 1 and 64"),
    ({"prompt": "hi", "max_new_tokens": 65}, "max_new_tokens must be between 1 and 64"),
    ({"prompt": "hi", "temperature": -0.5}, "temperature must be ≥ 0"),
    ({"prompt": "hi", "top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"prompt": "hi", "top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"prompt": "word " * 1100, "max_new_tokens": 8}, "exceeds the context of 1024 tokens"),
]


def assert_invalid_argument(client: GenerationClient, kwargs: dict, message: str) -> None:
    """Unary and streaming calls both refuse the request with INVALID_ARGUMENT; the server still answers."""
    for call in (client.generate, lambda **k: list(client.stream(**k))):
        with pytest.raises(grpc.RpcError) as info:
            call(**kwargs)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in info.value.details()
    assert client.generate("still answering", max_new_tokens=2, temperature=0).usage.completion_tokens >= 1


@pytest.mark.parametrize("kwargs,message", BAD_REQUESTS)
def test_bad_requests_get_invalid_argument(server, kwargs, message):
    assert_invalid_argument(server[1], kwargs, message)


def test_a_disconnected_stream_stops_decoding_its_row(quantized_tiny):
    """The engine's side of a hang-up: a closed request's row stops decoding at the next step (the server
    sets `closed` when its caller goes; test_server_access shows the freed batch slot over gRPC)."""
    engine = GenerationEngine(quantized_tiny, kv_cache_dtype="int8")
    long, other = (engine.prepare(p, [], SamplingParams(max_new_tokens=40, temperature=0)) for p in PROMPTS[:2])
    steps, produced = engine.stream([long, other]), {0: 0, 1: 0}
    for n, step in enumerate(steps):
        for i, item in enumerate(step):
            produced[i] += item is not None and bool(item.token_ids)
        if n == 2:
            long.closed = True  # the caller hung up after three tokens
    assert produced[0] <= 3 < produced[1]


def concurrent_calls(port: int, clients: int, calls_per_client: int, call) -> tuple[list, list[str]]:
    """`clients` threads, each with its own channel, each making call(client, n, i) `calls_per_client` times.
    Returns (results, failures as "CODE: details")."""
    results, failures = [], []
    lock = threading.Lock()

    def worker(n: int) -> None:
        client = GenerationClient(f"127.0.0.1:{port}")
        try:
            for i in range(calls_per_client):
                try:
                    result = call(client, n, i)
                    with lock:
                        results.append(result)
                except grpc.RpcError as exc:
                    with lock:
                        failures.append(f"{exc.code()}: {exc.details()}")
        finally:
            client.close()

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    return results, failures


def test_32_concurrent_clients_500_requests(server):
    config, _ = server

    def call(client: GenerationClient, n: int, i: int) -> str:
        prompt = PROMPTS[(n + i) % len(PROMPTS)]
        if i % 4 == 0:
            return "".join(c.text for c in client.stream(prompt, max_new_tokens=4, temperature=0))
        return client.generate(prompt, max_new_tokens=4, temperature=0).text

    done, failures = concurrent_calls(config.grpc_port, 32, 16, call)
    assert not failures, failures[:3]
    assert len(done) == 512


def test_a_hung_up_grpc_stream_closes_its_request_before_the_close_returns():
    """Serve closes a replica's stream generator when its gRPC client hangs up. Each generator of the chain
    (GenerateStream → _serve → _generate → _outputs) closes the one it reads, so the request is closed (its
    batch row stops decoding; a vLLM request is aborted) by the time the close returns — not whenever the
    abandoned generators are collected, which once left a cancelled stream decoding in the only batch slot."""
    import asyncio
    from types import SimpleNamespace

    from protos.rayquant.v1 import generation_pb2 as pb
    from serving import deployment
    from serving.requests import PreparedRequest, SamplingParams, StepOutput

    prepared = PreparedRequest([1, 2, 3], SamplingParams(max_new_tokens=900))
    codes: list[str] = []
    service = object.__new__(deployment.GenerationService.func_or_class)
    service.engine_name = "transformers"
    service.config = SimpleNamespace(max_new_tokens_limit=900)
    service.metrics = SimpleNamespace(call=lambda method: SimpleNamespace(tokens_sent=lambda n: None,
                                                                          finished=codes.append))
    service._admit = lambda *args: prepared

    async def decoding(request: PreparedRequest):  # the batch queue's steps for this request, until it is closed
        while not request.closed:
            yield StepOutput("a", [7])
            await asyncio.sleep(0)

    service._batched = decoding

    async def hang_up() -> bool:
        stream = service.GenerateStream(pb.GenerateRequest(prompt="Once upon a time", max_new_tokens=900), None)
        await stream.__anext__()
        await stream.aclose()
        return prepared.closed

    assert asyncio.run(hang_up()) and codes == ["CANCELLED"]
