"""The OpenAI-compatible HTTP API beside gRPC, through the official `openai` client and raw HTTP: completions
and chat, unary and streamed (SSE with `data: [DONE]` and the usage chunk), the same greedy text as gRPC,
errors in OpenAI's shape naming the field, the model list, and 503 while no replica is up. (The API key,
size limit, disconnects and metrics: tests/test_server_access.py.)"""

from __future__ import annotations

import pytest

from bench.common import free_port
from serving.config import ServeConfig
from tests.inline_job import quantize_inline
from tests.test_serving import http_json, running_server

openai = pytest.importorskip("openai")
PROMPT = "The history of the Royal Navy"


@pytest.fixture(scope="module")
def served(tiny_llama, tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("openai") / "tiny-gptq"
    quantize_inline(tiny_llama, out)
    config = ServeConfig(model=str(out), engine="transformers", served_model_name="tiny-gptq",
                         max_new_tokens_limit=64, max_batch_size=4, grpc_port=free_port(), http_port=free_port(),
                         autoscaling={"min_replicas": 1, "max_replicas": 1})
    with running_server(config) as grpc_client:
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{config.http_port}/v1", api_key="none", max_retries=0)
        yield config, grpc_client, api


def test_completions_unary_and_streamed_give_grpc_greedy_text(served):
    config, grpc_client, api = served
    expected = grpc_client.generate(PROMPT, max_new_tokens=12, temperature=0)
    unary = api.completions.create(model="tiny-gptq", prompt=PROMPT, max_tokens=12, temperature=0)
    assert unary.object == "text_completion" and unary.id.startswith("cmpl-") and unary.created > 0
    assert unary.choices[0].text == expected.text
    assert unary.choices[0].finish_reason in ("stop", "length")
    assert unary.usage.completion_tokens == expected.usage.completion_tokens
    assert unary.usage.prompt_tokens == expected.usage.prompt_tokens
    assert unary.usage.total_tokens == unary.usage.prompt_tokens + unary.usage.completion_tokens
    chunks = list(api.completions.create(model="tiny-gptq", prompt=PROMPT, max_tokens=12, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == expected.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_chat_unary_and_streamed_give_grpc_greedy_text(served):
    config, grpc_client, api = served
    messages = [{"role": "user", "content": "Name a sea."}]
    expected = grpc_client.generate(messages=messages, max_new_tokens=10, temperature=0)
    unary = api.chat.completions.create(model="tiny-gptq", messages=messages, max_completion_tokens=10,
                                        temperature=0, seed=3)
    assert unary.object == "chat.completion" and unary.choices[0].message.role == "assistant"
    assert unary.choices[0].message.content == expected.text
    stream = api.chat.completions.create(model="tiny-gptq", messages=messages, max_tokens=10, temperature=0,
                                         stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_what_load_tools_send_is_taken(served):
    """`vllm bench serve`'s payload: neutral vLLM options (repetition_penalty 1, logprobs null) are accepted,
    and ignore_eos gives exactly max_tokens tokens."""
    body = {"model": "tiny-gptq", "prompt": PROMPT, "max_tokens": 40, "repetition_penalty": 1.0, "logprobs": None,
            "ignore_eos": True, "temperature": 0}
    code, reply = http_json(served[0], "/v1/completions", body)
    assert code == 200 and reply["usage"]["completion_tokens"] == 40 and reply["choices"][0]["finish_reason"] == \
        "length"


def test_models_lists_the_served_name(served):
    assert [m.id for m in served[2].models.list()] == ["tiny-gptq"]


@pytest.mark.parametrize("body,status,param,message", [
    ({"temperature": -1}, 400, "temperature", "temperature must be ≥ 0 (0 = greedy), got -1.0"),
    ({"max_tokens": 1000}, 400, "max_tokens", "max_tokens must be between 1 and 64, got 1000"),
    ({"top_p": 0}, 400, "top_p", "top_p must be in (0, 1], got 0.0"),
    ({"n": 2}, 400, "n", "`n` must be 1"),
    ({"logit_bias": {"1": 5}}, 400, "logit_bias", "unsupported field(s) ['logit_bias']"),
    ({"repetition_penalty": 1.2}, 400, "repetition_penalty", "`repetition_penalty` is not supported: send 1.0"),
    ({"prompt": ""}, 400, "prompt", "the prompt is empty"),
    ({"model": "gpt-4"}, 404, "model", "the model `gpt-4` does not exist here"),
])
def test_bad_requests_get_openai_errors_naming_the_field(served, body, status, param, message):
    """Validation is gRPC's (same limits, same messages) with OpenAI's field names."""
    code, reply = http_json(served[0], "/v1/completions", {"model": "tiny-gptq", "prompt": PROMPT, **body})
    assert code == status and set(reply["error"]) == {"message", "type", "param", "code"}
    assert reply["error"]["param"] == param and message in reply["error"]["message"]
    with pytest.raises(openai.APIStatusError) as info:  # the client raises its typed errors from them
        served[2].completions.create(model="tiny-gptq", prompt=PROMPT, extra_body=body)
    assert info.value.status_code == status


def test_malformed_bodies_and_unknown_routes(served):
    config = served[0]
    assert http_json(config, "/v1/completions", b"{not json")[0] == 400
    assert http_json(config, "/v1/chat/completions", {"model": "tiny-gptq", "messages": "hi"})[1]["error"]["param"] == \
        "messages"
    code, reply = http_json(config, "/v1/embeddings", {"model": "tiny-gptq", "input": "x"})
    assert code == 404 and "POST /v1/completions" in reply["error"]["message"]


def test_no_replica_up_is_a_503_in_openai_shape(served):
    """Serve's proxies up, the application gone (as while it deploys): OpenAI clients are told to retry. (Last
    in this module: it removes the module's application.)"""
    from ray import serve

    config = served[0]
    serve.delete(config.app_name)
    code, reply = http_json(config, "/v1/completions", {"model": "tiny-gptq", "prompt": PROMPT})
    assert code == 503 and reply["error"]["code"] == 503 and "retry" in reply["error"]["message"]
