"""What a generation request is, once validated, and what each decode step gives back: shared by the
transformers and vLLM engines, and by the gRPC and OpenAI APIs, so that every combination accepts and refuses
exactly the same requests with the same messages (each API's field names in them)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# canonical field → its name in each API (messages and an error's `param` use the caller's names)
GRPC_FIELDS = {"max_new_tokens": "max_new_tokens", "prompt": "prompt", "messages": "messages",
               "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "stop": "stop", "seed": "seed"}
OPENAI_FIELDS = {**GRPC_FIELDS, "max_new_tokens": "max_tokens"}


class InvalidRequest(ValueError):
    """A request the server refuses; the message says what to change (gRPC INVALID_ARGUMENT, HTTP 400).
    `param`: the field at fault, in the caller's API's names."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class RequestTooLarge(InvalidRequest):
    """A request over the server's max_request_bytes (gRPC INVALID_ARGUMENT, HTTP 413)."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int | None = 128  # None: as many as the context leaves (capped by the server's limit)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep generating past end-of-sequence (fixed-length load tests; vLLM's option)


@dataclass
class PreparedRequest:
    prompt_ids: list[int]
    params: SamplingParams
    closed: bool = False  # set once the caller is gone (finished, cancelled, deadline passed): stop decoding it


@dataclass
class StepOutput:
    text: str  # text added by this step (may be empty while a stop string could still match)
    token_ids: list[int]  # tokens added by this step (the end-of-sequence token is never included)
    finish_reason: str | None = None  # "length", "stop" or "eos" on the last step
    prompt_tokens: int = 0
    completion_tokens: int = 0


def prepare_request(tokenizer, prompt: str, messages: list[dict[str, str]], params: SamplingParams,
                    max_new_tokens_limit: int, max_context: int, fields: dict[str, str] = GRPC_FIELDS
                    ) -> PreparedRequest:
    """Validate and tokenize a request (messages go through the chat template); raises InvalidRequest
    naming the problem (in `fields`' names) and the fix."""
    name = fields.get
    if messages:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not prompt or not prompt.strip():
        raise InvalidRequest(f"the prompt is empty: send a non-empty `{name('prompt')}` or `{name('messages')}`",
                             name("messages") if messages else name("prompt"))
    if params.max_new_tokens is not None and not 1 <= params.max_new_tokens <= max_new_tokens_limit:
        raise InvalidRequest(f"{name('max_new_tokens')} must be between 1 and {max_new_tokens_limit}, "
                             f"got {params.max_new_tokens}", name("max_new_tokens"))
    if params.temperature < 0:
        raise InvalidRequest(f"{name('temperature')} must be ≥ 0 (0 = greedy), got {params.temperature}",
                             name("temperature"))
    if not 0 < params.top_p <= 1:
        raise InvalidRequest(f"{name('top_p')} must be in (0, 1], got {params.top_p}", name("top_p"))
    if params.top_k < 0:
        raise InvalidRequest(f"{name('top_k')} must be ≥ 0 (0 = off), got {params.top_k}", name("top_k"))
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    if params.max_new_tokens is None:
        room = min(max_new_tokens_limit, max_context - len(ids))
        if room < 1:
            raise InvalidRequest(f"the prompt has {len(ids)} tokens, leaving no room for a completion in the "
                                 f"context of {max_context} tokens: shorten the prompt", name("prompt"))
        params = dataclasses.replace(params, max_new_tokens=room)
    if len(ids) + params.max_new_tokens > max_context:
        raise InvalidRequest(
            f"the prompt has {len(ids)} tokens; with {name('max_new_tokens')}={params.max_new_tokens} it exceeds "
            f"the context of {max_context} tokens: shorten the prompt or lower {name('max_new_tokens')}",
            name("max_new_tokens"))
    return PreparedRequest(ids, params)


def eos_token_ids(tokenizer, generation_config) -> set[int]:
    """The ids that end a completion: the generation config's eos ids, else the tokenizer's."""
    eos = generation_config.eos_token_id if generation_config is not None else None
    eos = eos if eos is not None else tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])
