"""The server locked down: proxies bound to loopback, an API key from the environment checked on gRPC
metadata and HTTP headers (health exempt), request size and prompt length limits, client deadlines and
hang-ups that free the batch slot, and the Prometheus metrics Ray exports for the replica."""

import http.client as http_client
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest

from bench.common import free_port
from serving.client import GenerationClient
from serving.config import ServeConfig
from serving.proxy_hooks import listening_addresses
from tests.inline_job import quantize_inline
from tests.test_serving import http_json, running_server

KEY_ENV, KEY = "RAYQUANT_TEST_API_KEY", "test-key-0123456789"


@pytest.fixture(scope="module")
def ray_with_key_and_metrics():
    """A local Ray whose workers see the API key (they inherit this environment) and export metrics."""
    import ray

    os.environ[KEY_ENV] = KEY
    metrics_port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING",
             _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 1000})
    yield metrics_port
    ray.shutdown()
    del os.environ[KEY_ENV]


@pytest.fixture(scope="module")
def locked_server(tiny_llama, tmp_path_factory, ray_with_key_and_metrics):
    out = tmp_path_factory.mktemp("locked") / "tiny-gptq"
    quantize_inline(tiny_llama, out)
    config = ServeConfig(model=str(out), engine="transformers", api_key_env=KEY_ENV, max_prompt_tokens=32,
                         max_request_bytes=2048, max_new_tokens_limit=900, max_batch_size=1,
                         grpc_port=free_port(), http_port=free_port(),
                         autoscaling={"min_replicas": 1, "max_replicas": 1})
    with running_server(config, api_key=KEY) as client:
        yield config, client


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_default_config_binds_loopback_only():
    assert ServeConfig(model="m").host == "127.0.0.1" and ServeConfig(model="m").api_key_env is None


def test_proxies_listen_on_loopback_only(locked_server):
    config, _ = locked_server
    assert listening_addresses(config.grpc_port) == {"127.0.0.1"}
    assert listening_addresses(config.http_port) == {"127.0.0.1"}


def test_calls_need_the_api_key_but_health_does_not(locked_server):
    config, client = locked_server
    address = f"127.0.0.1:{config.grpc_port}"
    for key in (None, "wrong-key"):
        other = GenerationClient(address, api_key=key)
        try:
            for call in (lambda: other.generate("hi", max_new_tokens=2), lambda: list(other.stream("hi")),
                         other.model_info):
                error = rpc_error(call)
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED
                assert ("needs an API key" if key is None else "not valid") in error.details()
            assert other.healthy()  # grpc.health.v1 needs no key
        finally:
            other.close()
    body = urllib.request.urlopen(f"http://127.0.0.1:{config.http_port}/healthz", timeout=30).read()
    assert b'"ok"' in body
    assert client.generate("hi", max_new_tokens=2, temperature=0).usage.completion_tokens >= 1
    assert client.model_info().bits == 4


def test_request_size_and_prompt_length_limits(locked_server):
    _, client = locked_server
    long_prompt = " ".join(["word"] * 40)  # > 32 tokens, < 2048 bytes
    huge_prompt = "x" * 3000  # > 2048 bytes
    for kwargs, message in (({"prompt": long_prompt}, "at most 32 prompt tokens (max_prompt_tokens)"),
                            ({"prompt": huge_prompt}, "at most 2048 (max_request_bytes)")):
        for call in (lambda: client.generate(max_new_tokens=2, **kwargs),
                     lambda: list(client.stream(max_new_tokens=2, **kwargs))):
            error = rpc_error(call)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.details()


def test_a_deadline_that_passes_frees_the_batch_slot(locked_server):
    """One batch slot. A long call whose deadline passes must stop decoding at once: a short call queued
    behind it finishes right after the deadline, not after the long call's full decode."""
    _, client = locked_server
    started = time.perf_counter()
    full = client.generate("Once upon a time", max_new_tokens=900, temperature=0)
    full_s = time.perf_counter() - started
    assert full.usage.completion_tokens > 300, "the tiny model stopped early; the test needs a long decode"
    deadline_s = full_s / 4
    outcome = {}

    def long_call():
        try:
            client.generate("Once upon a time", max_new_tokens=900, temperature=0, timeout_s=deadline_s)
        except grpc.RpcError as exc:
            outcome["long"] = exc.code()

    thread = threading.Thread(target=long_call)
    started = time.perf_counter()
    thread.start()
    time.sleep(0.1)
    short = client.generate("Hello", max_new_tokens=4, temperature=0)
    outcome["short_s"] = time.perf_counter() - started
    thread.join()
    assert outcome["long"] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert short.usage.completion_tokens >= 1
    assert outcome["short_s"] < deadline_s + full_s / 2, (outcome, full_s)  # ≈ full_s if the slot stayed taken


def test_a_cancelled_stream_frees_the_batch_slot(locked_server):
    """One batch slot. A client that hangs up after the first chunk of a long stream frees the slot at once:
    a short call behind it finishes in a fraction of the long decode's time."""
    _, client = locked_server
    started = time.perf_counter()
    full = client.generate("Once upon a time", max_new_tokens=900, temperature=0)
    full_s = time.perf_counter() - started
    assert full.usage.completion_tokens > 300, "the tiny model stopped early; the test needs a long decode"
    stream = client.stream("Once upon a time", max_new_tokens=900, temperature=0)
    next(stream)
    started = time.perf_counter()
    stream.cancel()
    short = client.generate("Hello", max_new_tokens=4, temperature=0)
    short_s = time.perf_counter() - started
    assert short.usage.completion_tokens >= 1
    assert short_s < full_s / 2, (short_s, full_s)  # ≈ full_s if the cancelled stream kept its slot


def test_http_api_needs_the_key_and_keeps_the_size_limit(locked_server):
    """The OpenAI API takes the same key (`Authorization: Bearer`) and the same max_request_bytes (413)."""
    config, _ = locked_server
    body = json.dumps({"model": config.model, "prompt": "hi", "max_tokens": 2}).encode()
    for key in (None, "wrong-key"):
        code, reply = http_json(config, "/v1/completions", body, key)
        assert code == 401 and reply["error"]["code"] == "invalid_api_key"
        assert http_json(config, "/v1/models", None, key)[0] == 401
    code, reply = http_json(config, "/v1/completions", body, KEY)
    assert code == 200 and reply["usage"]["completion_tokens"] >= 1
    huge = json.dumps({"model": config.model, "prompt": "x" * 3000}).encode()
    code, reply = http_json(config, "/v1/completions", huge, KEY)
    assert code == 413 and "at most 2048 (max_request_bytes)" in reply["error"]["message"]
    long_prompt = json.dumps({"model": config.model, "prompt": " ".join(["word"] * 40)}).encode()
    code, reply = http_json(config, "/v1/completions", long_prompt, KEY)
    assert code == 400 and "at most 32 prompt tokens (max_prompt_tokens)" in reply["error"]["message"]


def test_an_http_client_gone_mid_stream_frees_the_batch_slot(locked_server):
    """One batch slot. A client that closes its connection after the first server-sent event of a long
    completion frees the slot: a short call behind it finishes in a fraction of the long decode's time."""
    config, client = locked_server
    started = time.perf_counter()
    full = client.generate("Once upon a time", max_new_tokens=900, temperature=0)
    full_s = time.perf_counter() - started
    assert full.usage.completion_tokens > 300, "the tiny model stopped early; the test needs a long decode"
    connection = http_client.HTTPConnection("127.0.0.1", config.http_port, timeout=120)
    connection.request("POST", "/v1/completions", json.dumps(
        {"model": config.model, "prompt": "Once upon a time", "max_tokens": 900, "temperature": 0,
         "stream": True}), {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    reply = connection.getresponse()
    assert reply.status == 200 and reply.readline().startswith(b"data: {")
    started = time.perf_counter()
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    short = client.generate("Hello", max_new_tokens=4, temperature=0)
    short_s = time.perf_counter() - started
    assert short.usage.completion_tokens >= 1
    assert short_s < full_s / 2, (short_s, full_s)  # ≈ full_s if the abandoned stream kept its slot


def scrape(port: int) -> dict[str, float]:
    """Prometheus text → {'name{labels}': value} for the rayquant and vLLM-named series."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    series = {}
    for line in text.splitlines():
        if line.startswith(("ray_rayquant_", "ray_vllm_")):
            name, _, value = line.rpartition(" ")
            series[name] = float(value)
    return series


def total(series: dict[str, float], name: str, **labels: str) -> float:
    return sum(v for k, v in series.items() if k.split("{")[0] == name
               and all(f'{lk}="{lv}"' in k for lk, lv in labels.items()))


def test_metrics_are_exported_with_vllms_names(locked_server, ray_with_key_and_metrics):
    """What dashboards made for vLLM chart (Ray's export of vLLM's names, `:` as `_`), labelled by model and
    engine, for gRPC and HTTP calls alike; and our calls by method and status code."""
    config, client = locked_server
    before = scrape(ray_with_key_and_metrics)
    response = client.generate("Metrics count tokens", max_new_tokens=8, temperature=0)
    list(client.stream("Metrics count streams too", max_new_tokens=8, temperature=0))
    assert http_json(config, "/v1/completions", json.dumps({"model": config.model, "prompt": "and HTTP calls",
                                                       "max_tokens": 4}).encode(), KEY)[0] == 200
    unauthenticated = GenerationClient(f"127.0.0.1:{locked_server[0].grpc_port}")
    rpc_error(lambda: unauthenticated.generate("no key"))
    unauthenticated.close()
    deadline = time.time() + 60
    while True:
        after = scrape(ray_with_key_and_metrics)
        name = "ray_rayquant_requests_total"
        ok = total(after, name, code="OK") - total(before, name, code="OK")
        streamed = total(after, name, method="GenerateStream", code="OK") - total(
            before, name, method="GenerateStream", code="OK")
        if (ok >= 2 and streamed >= 1) or time.time() > deadline:  # metrics arrive late, in any order
            break
        time.sleep(1)
    assert ok >= 2
    assert total(after, "ray_rayquant_requests_total", code="UNAUTHENTICATED") >= 1
    assert streamed >= 1
    assert total(after, "ray_rayquant_requests_total", method="completions", code="OK") >= 1
    labels = {"model_name": config.model, "engine": "transformers"}
    name = "ray_vllm_generation_tokens_total"
    assert total(after, name, **labels) - total(before, name, **labels) >= response.usage.completion_tokens
    assert total(after, "ray_vllm_prompt_tokens_total", **labels) > total(before, "ray_vllm_prompt_tokens_total")
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert total(after, f"ray_vllm_{histogram}_count", **labels) >= 3, histogram
    assert total(after, "ray_vllm_inter_token_latency_seconds_count", **labels) >= 7
    gauges = ("ray_vllm_num_requests_running", "ray_vllm_num_requests_waiting")
    while any(total(after, g, **labels) for g in gauges) and time.time() < deadline:  # a gauge exports late too
        time.sleep(1)
        after = scrape(ray_with_key_and_metrics)
    for gauge in gauges:
        assert gauge in {k.split("{")[0] for k in after} and total(after, gauge, **labels) == 0
