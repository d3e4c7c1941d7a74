"""What a generation request is, once validated, and what each decode step gives back: shared by the
transformers and vLLM engines so both accept and refuse exactly the same requests."""

from __future__ import annotations

from dataclasses import dataclass


class InvalidRequest(ValueError):
    """A request the server refuses; the message says what to change (gRPC INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()


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
                    max_new_tokens_limit: int, max_context: int) -> PreparedRequest:
    """Validate and tokenize a request (messages go through the chat template); raises InvalidRequest
    naming the problem and the fix."""
    if messages:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not prompt or not prompt.strip():
        raise InvalidRequest("the prompt is empty: send a non-empty `prompt` or `messages`")
    if not 1 <= params.max_new_tokens <= max_new_tokens_limit:
        raise InvalidRequest(f"max_new_tokens must be between 1 and {max_new_tokens_limit}, "
                             f"got {params.max_new_tokens}")
    if params.temperature < 0:
        raise InvalidRequest(f"temperature must be ≥ 0 (0 = greedy), got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise InvalidRequest(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise InvalidRequest(f"top_k must be ≥ 0 (0 = off), got {params.top_k}")
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    if len(ids) + params.max_new_tokens > max_context:
        raise InvalidRequest(
            f"the prompt has {len(ids)} tokens; with max_new_tokens={params.max_new_tokens} it exceeds the "
            f"context of {max_context} tokens: shorten the prompt or lower max_new_tokens")
    return PreparedRequest(ids, params)


def eos_token_ids(tokenizer, generation_config) -> set[int]:
    """The ids that end a completion: the generation config's eos ids, else the tokenizer's."""
    eos = generation_config.eos_token_id if generation_config is not None else None
    eos = eos if eos is not None else tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])
