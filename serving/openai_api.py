"""The OpenAI-compatible HTTP API, served by the same replicas as the gRPC API.

Routes (as vLLM's server and Ray Serve LLM's OpenAI app have them): `POST /v1/completions`,
`POST /v1/chat/completions` (unary, or server-sent events ending in `data: [DONE]`, with
`stream_options.include_usage`), `GET /v1/models`. Request bodies become the same validated requests the
gRPC API makes (serving/requests.py: same limits, same messages, OpenAI's field names in them); outputs
become OpenAI's JSON objects and chunks; every error is `{"error": {"message", "type", "param", "code"}}`.

This module is pure translation; the deployment (serving/deployment.py) owns keys, limits and decoding.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from serving.requests import InvalidRequest, SamplingParams, StepOutput

# options rayquant does not implement, accepted at the value that changes nothing (what clients and load tools
# such as `vllm bench serve` send by default), refused by name at any other value (a silently ignored option
# would mislead)
NEUTRAL = {"frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "repetition_penalty": (1, 1.0),
           "length_penalty": (1, 1.0), "min_p": (0, 0.0), "min_tokens": (0,), "logprobs": (None, False, 0),
           "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1), "skip_special_tokens": (True,),
           "spaces_between_special_tokens": (True,), "include_stop_str_in_output": (False,)}
COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream",
                 "stream_options", "user", "ignore_eos", *NEUTRAL}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt"}
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


class OpenAIError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.code = code if code is not None else status

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def invalid(cls, exc: InvalidRequest) -> "OpenAIError":
        return cls(400, str(exc), param=exc.param)


@dataclass
class OpenAIRequest:
    """A parsed completion or chat request."""
    chat: bool
    model: str
    prompt: str
    messages: list[dict[str, str]]
    params: SamplingParams
    stream: bool
    include_usage: bool


def _number(body: dict, key: str, kind: type, default):
    value = body.get(key, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise OpenAIError(400, f"`{key}` must be {'a number' if kind is float else 'an integer'}, got {value!r}",
                          param=key)
    return value


def _messages(raw: Any) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise OpenAIError(400, "`messages` must be a non-empty list of {role, content}", param="messages")
    messages = []
    for m in raw:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise OpenAIError(400, "each message needs a `role` and a `content`", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
                raise OpenAIError(400, "only text content parts are supported", param="messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise OpenAIError(400, "a message's `content` must be a string or a list of text parts",
                              param="messages")
        messages.append({"role": m["role"], "content": content})
    return messages


def parse_request(body: Any, chat: bool) -> OpenAIRequest:
    """A JSON body → OpenAIRequest; raises OpenAIError (400) naming the field at fault."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - (CHAT_FIELDS if chat else COMPLETION_FIELDS))
    if unknown:
        raise OpenAIError(400, f"unsupported field(s) {unknown}", param=unknown[0])
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise OpenAIError(400, "`model` is required: one of the names GET /v1/models lists", param="model")
    n = _number(body, "n", int, 1)
    if n != 1:
        raise OpenAIError(400, f"`n` must be 1 (one choice per request; send {n} requests instead)", param="n")
    for key, neutral in NEUTRAL.items():
        if key in body and not any(body[key] == v and type(body[key]) in (type(v), int, float) for v in neutral):
            raise OpenAIError(400, f"`{key}` is not supported: send {neutral[-1]!r} or leave it out", param=key)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise OpenAIError(400, "`stop` must be a string or a list of at most 4 strings", param="stop")
    max_tokens = body.get("max_completion_tokens") if chat and body.get("max_completion_tokens") is not None \
        else body.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)):
        raise OpenAIError(400, f"`max_tokens` must be an integer, got {max_tokens!r}", param="max_tokens")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise OpenAIError(400, f"`seed` must be an integer, got {seed!r}", param="seed")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
        raise OpenAIError(400, "`stream_options` takes `include_usage`", param="stream_options")
    if chat:
        messages, prompt = _messages(body.get("messages")), ""
    else:
        prompt, messages = body.get("prompt"), []
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise OpenAIError(400, "`prompt` must be a string (one prompt per request)", param="prompt")
    params = SamplingParams(max_new_tokens=max_tokens, temperature=_number(body, "temperature", float, 1.0),
                            top_p=_number(body, "top_p", float, 1.0), top_k=max(0, _number(body, "top_k", int, 0)),
                            seed=seed, stop=tuple(stop), ignore_eos=bool(body.get("ignore_eos", False)))
    return OpenAIRequest(chat, model, prompt, messages, params, bool(body.get("stream", False)),
                         bool(options.get("include_usage", False)))


def models_response(names: list[str], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "rayquant"}
                                       for name in names]}


class Completion:
    """Turns one request's StepOutputs into OpenAI's response or chunks."""

    def __init__(self, request: OpenAIRequest, model: str) -> None:
        self.request, self.model = request, model
        self.id = ("chatcmpl-" if request.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _usage(self, last: StepOutput) -> dict[str, int]:
        return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
                "total_tokens": last.prompt_tokens + last.completion_tokens}

    def response(self, outputs: list[StepOutput]) -> dict[str, Any]:
        text, last = "".join(o.text for o in outputs), outputs[-1]
        reason = FINISH_REASONS.get(last.finish_reason or "", "stop")
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                   "finish_reason": reason} if self.request.chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
        return {"id": self.id, "object": "chat.completion" if self.request.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice], "usage": self._usage(last)}

    def _chunk(self, delta: dict | str | None, reason: str | None) -> dict[str, Any]:
        if self.request.chat:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": reason}
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.request.chat else "text_completion",
                 "created": self.created, "model": self.model, "choices": [choice]}
        if self.request.include_usage:
            chunk["usage"] = None
        return chunk

    async def events(self, outputs: AsyncIterator[StepOutput]) -> AsyncIterator[str]:
        """Server-sent events: one chunk per output with text or an end, the usage chunk if asked, [DONE]."""
        if self.request.chat:
            yield _sse(self._chunk({"role": "assistant", "content": ""}, None))
        last = None
        async for out in outputs:
            last = out
            reason = FINISH_REASONS.get(out.finish_reason) if out.finish_reason else None
            if out.text or reason:
                delta = ({"content": out.text} if out.text else {}) if self.request.chat else out.text
                yield _sse(self._chunk(delta, reason))
        if self.request.include_usage and last is not None:
            yield _sse({"id": self.id, "object": "chat.completion.chunk" if self.request.chat else "text_completion",
                        "created": self.created, "model": self.model, "choices": [], "usage": self._usage(last)})
        yield "data: [DONE]\n\n"


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
