"""Parse and check request bodies the way vLLM's pydantic models and serving layer do, with its messages.

Token counts are estimates (whitespace-separated words, or the length of a token-id list): the fake has no
tokenizer, but it rejects what overflows the context window exactly where vLLM would.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from fakevllm.config import MAX_MODEL_LEN
from fakevllm.errors import ApiError, bad_request, validation_error


def parse_object(body: bytes) -> dict[str, Any]:
    """Parse a JSON object request body, raising vLLM's 400 otherwise."""
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise validation_error(f"JSON decode error: {exc}") from exc
    if not isinstance(value, dict):
        raise validation_error("Input should be a valid dictionary or object to extract fields from")
    return value


def resolve_model(req: Mapping[str, Any], served: Mapping[str, str]) -> str:
    """Return the requested served model (the first one if omitted), or raise vLLM's 404."""
    model = req.get("model")
    if model is None or model == "":
        return next(iter(served))
    if not isinstance(model, str):
        raise validation_error("model: Input should be a valid string", "model")
    if model not in served:
        raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
    return model


def optional_int(req: Mapping[str, Any], name: str, minimum: int) -> int | None:
    """Return an optional integer field, raising vLLM-style 400s for bad values."""
    value = req.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise validation_error(f"{name}: Input should be a valid integer", name)
    if value < minimum:
        raise bad_request(f"{name} must be at least {minimum}, got {value}.", name)
    return value


def count_words(value: Any) -> int:
    """Estimate tokens as whitespace-separated words in message contents / text parts."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, dict):
        return count_words(value.get("content")) + count_words(value.get("text"))
    if isinstance(value, list):
        return sum(count_words(item) for item in value)
    return 0


def _is_token_ids(value: Any) -> bool:
    """Tell whether value is a non-empty list of token ids."""
    return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)


def split_inputs(value: Any, name: str) -> list[str | list[int]]:
    """Split a prompt/input (string, strings, token ids, lists of token ids) into single prompts."""
    if isinstance(value, str):
        return [value]
    if _is_token_ids(value):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) or _is_token_ids(v) for v in value):
        return list(value)
    if value is None:
        raise validation_error(f"{name}: Field required", name)
    raise validation_error(f"{name}: must be a string, a list of strings or a list of token ids", name)


def input_tokens(item: str | list[int]) -> int:
    """Estimate the token count of one prompt."""
    return len(item) if isinstance(item, list) else max(1, len(item.split()))


def check_context(prompt_tokens: int, max_tokens: int | None) -> None:
    """Reject prompts and max_tokens that overflow the context, with vLLM's messages."""
    if prompt_tokens >= MAX_MODEL_LEN:
        raise bad_request(
            f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, your request has "
            f"{prompt_tokens} input tokens. Please reduce the length of the input messages.",
            "input_tokens",
        )
    if max_tokens is not None and prompt_tokens + max_tokens > MAX_MODEL_LEN:
        raise bad_request(
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum "
            f"context length is {MAX_MODEL_LEN} tokens and your request has {prompt_tokens} input tokens "
            f"({max_tokens} > {MAX_MODEL_LEN} - {prompt_tokens}).",
            "max_tokens",
        )


def stream_flags(req: Mapping[str, Any]) -> tuple[bool, bool, bool]:
    """Return (stream, include_usage, continuous_usage_stats) as vLLM reads them.

    vLLM's StreamOptions default both to false (include_usage since vllm#36379: `{}` asks for nothing), and
    its `should_include_usage` gives the running counts of `continuous_usage_stats` only with include_usage.
    Options set (truthy) without `stream` are refused before, by ``check_stream_options_need_stream``, which
    ``generation.plan`` calls ahead of every field's check, as vLLM's before-validator runs.
    """
    stream = req.get("stream") in (True, 1)
    options = req.get("stream_options")
    if options is None:
        return stream, False, False
    if not isinstance(options, dict):
        raise validation_error("stream_options: Input should be a valid dictionary", "stream_options")
    include_usage = _option_flag(options, "include_usage")
    continuous = _option_flag(options, "continuous_usage_stats")
    return stream, include_usage, include_usage and continuous


def check_stream_options_need_stream(req: Mapping[str, Any]) -> None:
    """vLLM's ``validate_stream_options``, a before-validator: stream options set (truthy) without
    ``stream`` are refused, ahead of any field's own check."""
    if req.get("stream_options") and req.get("stream") not in (True, 1):
        raise validation_error("Stream options can only be defined when `stream=True`.", "stream_options")


_TRUE_WORDS = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE_WORDS = frozenset({"0", "off", "f", "false", "n", "no"})


def _option_flag(options: Mapping[str, Any], name: str) -> bool:
    """Read a `bool | None` of stream_options as pydantic's lax mode does: null is false, and 0/1 and
    words such as "true" or "no" pass as booleans."""
    value = options.get(name)
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _TRUE_WORDS | _FALSE_WORDS:
        return value.lower() in _TRUE_WORDS
    raise validation_error(f"stream_options.{name}: Input should be a valid boolean", "stream_options")


def content_texts(messages: Any) -> list[str]:
    """Return the text pieces of chat messages (string contents and text parts)."""
    texts: list[str] = []
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return texts


CACHE_SALT_MAX = 128
CACHE_SALT_FORBIDDEN = frozenset("@/\\\x00")


def check_cache_salt(req: Mapping[str, Any]) -> None:
    """vLLM 0.33's ``validate_cache_salt``, a before-validator of the chat, completion and pooling requests
    (so it speaks before any field is checked, but after the before-validators defined after it, which
    pydantic runs first: of those the fake has ``check_stream_options_need_stream``): absent, null, or a
    string of 1 to 128 characters without '@', '/', '\\' or NUL. It raises a ``VLLMValidationError``, which
    is no ValueError: pydantic lets it through, and vLLM's error handler answers a ``BadRequestError`` naming
    the parameter, the error's text ending in its ``(parameter=cache_salt)``."""
    salt = req.get("cache_salt")
    if salt is None:
        return
    if not isinstance(salt, str) or not salt:
        message = "Parameter 'cache_salt' must be a non-empty string if provided."
    elif len(salt) > CACHE_SALT_MAX or not CACHE_SALT_FORBIDDEN.isdisjoint(salt):
        message = (
            "Parameter 'cache_salt' must be at most 128 characters and must not contain "
            "'@', '/', '\\\\', or NUL."
        )
    else:
        return
    raise bad_request(f"{message} (parameter=cache_salt)", "cache_salt")
