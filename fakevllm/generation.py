"""Plan a chat or text completion: validate the request like vLLM and fix everything its answer needs.

The plan (a Generation) is made when the request arrives, from the request and the configuration of that
moment, so a later POST /_fake/config never changes an answer half-way.

Every answer carries vLLM's `system_fingerprint`: vLLM 0.33 (vllm#40537) stamps `vllm-<version>-<hash8>` on
it by default (`--fingerprint-mode full`, vllm/entrypoints/serve/utils/fingerprint.py), the hash a prefix of
the engine configuration's; the fake hashes the models it serves, with the version GET /version answers.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fakevllm.asgi import encode
from fakevllm.config import VERSION, FakeConfig
from fakevllm.errors import bad_request, validation_error
from fakevllm.request_ids import base_request_id
from fakevllm.tools import ForcedCall, forced_call
from fakevllm.validation import (
    chat_logprobs,
    check_cache_salt,
    check_context,
    check_generation_prompt,
    check_prompt_list_length,
    check_stop,
    check_stop_strings,
    check_stream_options_need_stream,
    check_tool_usage,
    completion_logprobs,
    count_words,
    echo_requested,
    input_tokens,
    optional_int,
    resolve_model,
    split_inputs,
    stream_flags,
)

MAX_CHOICES = 1024  # n * prompts: a bound on the work one request can ask for
COMPLETION_DEFAULT_MAX_TOKENS = 16  # vLLM's CompletionRequest.max_tokens default


@dataclass(slots=True)
class Generation:
    """Everything needed to answer one completion-like request, fixed when the request arrives."""

    kind: str
    id_json: str  # the response's "id", a JSON string: chatcmpl-<base id> or cmpl-<base id>
    created: int
    model: str
    model_json: str
    fingerprint_json: str  # the system_fingerprint, a JSON string
    choices: int
    ntok: int
    finish: str
    prompt_tokens: int
    stream: bool
    include_usage: bool
    continuous_usage: bool  # stream_options.continuous_usage_stats, with include_usage: usage in every chunk
    prompt_tokens_each: tuple[int, ...]  # per prompt of a completions batch (one prompt for chat)
    first_delay: float
    chunk_delay: float
    fail_after: int | None
    fail_sends_done: bool
    logprobs: int | None = None  # top alternatives per token when logprobs are asked for (fakevllm.logprobs)
    echo: tuple[str, ...] | None = None  # a text completion's echoed prompt text, per prompt
    tool: ForcedCall | None = None  # the tool call a chat's tool_choice forces (fakevllm.tools)

    @property
    def completion_tokens(self) -> int:
        """Tokens generated over all choices."""
        return self.ntok * self.choices


def plan(
    kind: str,
    req: Mapping[str, Any],
    config: FakeConfig,
    model_json: Mapping[str, str],
    request_id_header: str | None = None,
) -> Generation:
    """Validate a chat ("chat") or text ("completion") request and fix its generation parameters.

    The response id is vLLM's: the X-Request-Id header, else the body's request_id, else random, after
    `chatcmpl-` or `cmpl-` (fakevllm.request_ids).
    """
    # vLLM's before-validators, in the order pydantic runs them (the last defined first), ahead of every
    # field's own check
    check_stream_options_need_stream(req)
    check_cache_salt(req)
    if kind == "chat":
        check_generation_prompt(req)
        check_tool_usage(req)
        logprobs = chat_logprobs(req)
        per_prompt, max_tokens = _chat_prompt(req)
        echo = None
    else:
        check_prompt_list_length(req)
        logprobs = completion_logprobs(req)
        per_prompt, max_tokens = _completion_prompts(req)
        echo = _echo_texts(req) if echo_requested(req) else None
    # two membership tests, not calls, on the benchmark's plain requests
    stop = check_stop(req) if "stop" in req or "include_stop_str_in_output" in req else ()
    model = resolve_model(req, model_json)
    n = optional_int(req, "n", 1) or 1
    if n * len(per_prompt) > MAX_CHOICES:
        raise bad_request(f"n * number of prompts must be at most {MAX_CHOICES}.", "n")
    for count in per_prompt:
        check_context(count, max_tokens)
    if stop:
        check_stop_strings(stop)  # vLLM's SamplingParams, made once the prompt is rendered
    stream, include_usage, continuous_usage = stream_flags(req)
    base_id = base_request_id(request_id_header, req)
    ntok, finish = _length(max_tokens, config.tokens)
    return Generation(
        kind=kind,
        id_json=encode(("chatcmpl-" if kind == "chat" else "cmpl-") + base_id),
        created=int(time.time()),
        model=model,
        model_json=model_json[model],
        fingerprint_json=system_fingerprint_json(tuple(config.models)),
        choices=n * len(per_prompt),
        ntok=ntok,
        finish=finish,
        prompt_tokens=sum(per_prompt),
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous_usage,
        prompt_tokens_each=tuple(per_prompt),
        first_delay=config.first_chunk_delay_s,
        chunk_delay=config.chunk_delay_s,
        fail_after=config.fail_after_chunks,
        fail_sends_done=config.fail_sends_done,
        logprobs=logprobs,
        echo=echo,
        tool=forced_call(req, n) if kind == "chat" and "tool_choice" in req else None,
    )


@functools.lru_cache(maxsize=16)
def system_fingerprint_json(models: tuple[str, ...]) -> str:
    """Return the system_fingerprint of a server of these models, as a JSON string."""
    digest = hashlib.sha256("\n".join(models).encode()).hexdigest()[:8]
    return encode(f"vllm-{VERSION}-{digest}")


def _length(max_tokens: int | None, tokens: int) -> tuple[int, str]:
    """Return how many tokens each choice gets, and why it stops: at max_tokens, or at its natural end."""
    if max_tokens is not None and max_tokens < tokens:
        return max_tokens, "length"
    return tokens, "stop"


def _completion_prompts(req: Mapping[str, Any]) -> tuple[list[int], int]:
    """Return each prompt's token estimate and max_tokens (vLLM's default when absent)."""
    per_prompt = [input_tokens(p) for p in split_inputs(req.get("prompt"), "prompt")]
    max_tokens = optional_int(req, "max_tokens", 0)
    return per_prompt, COMPLETION_DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens


def _echo_texts(req: Mapping[str, Any]) -> tuple[str, ...]:
    """Return the text `echo` prepends for each prompt: the prompt itself, or its token ids detokenized as
    POST /detokenize does."""
    prompts = split_inputs(req.get("prompt"), "prompt")
    return tuple(p if isinstance(p, str) else " ".join(f"tok{t}" for t in p) for p in prompts)


def _chat_prompt(req: Mapping[str, Any]) -> tuple[list[int], int | None]:
    """Return the prompt's token estimate (one prompt) and max_completion_tokens, else max_tokens."""
    messages = req.get("messages")
    if not isinstance(messages, list):
        message = "messages: Field required" if messages is None else "messages: Input should be a valid list"
        raise validation_error(message, "messages")
    max_tokens = optional_int(req, "max_completion_tokens", 0)
    if max_tokens is None:
        max_tokens = optional_int(req, "max_tokens", 0)
    return [max(1, count_words(messages))], max_tokens
