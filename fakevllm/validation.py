"""Parse and check request bodies the way vLLM's pydantic models and serving layer do, with its messages.

Token counts are estimates (whitespace-separated words, or the length of a token-id list): the fake has no
tokenizer, but it rejects what overflows the context window exactly where vLLM would.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from fakevllm.config import MAX_MODEL_LEN
from fakevllm.errors import ApiError, bad_request, pydantic_errors, validation_error


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


def vllm_validation_error(message: str, parameter: str, value: Any = None) -> ApiError:
    """Return the 400 of a ``VLLMValidationError`` raised by a before-validator: no ValueError in vLLM 0.33,
    pydantic lets it through and vLLM answers a BadRequestError whose text ends in the error's
    ``(parameter=..., value=...)`` (see ``check_cache_salt``)."""
    extras = f"parameter={parameter}" if value is None else f"parameter={parameter}, value={value}"
    return bad_request(f"{message} ({extras})", parameter)


FULL_VOCABULARY_LOGPROBS = 20  # what top_logprobs=-1 ("the whole vocabulary") lists: the fake's vocabulary


def chat_logprobs(req: Mapping[str, Any]) -> int | None:
    """Check a chat request's `logprobs` and `top_logprobs` as vLLM's ``check_logprobs`` before-validator
    does; return how many top alternatives each token lists, or None when logprobs are off."""
    top = req.get("top_logprobs")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int):
            raise validation_error("top_logprobs: Input should be a valid integer", "top_logprobs")
        if top < -1:
            raise vllm_validation_error("`top_logprobs` must be a positive value or -1.", "top_logprobs", top)
        if top != 0 and not req.get("logprobs"):
            message = "when using `top_logprobs`, `logprobs` must be set to true."
            raise vllm_validation_error(message, "top_logprobs")
    if not _optional_bool(req, "logprobs"):
        return None
    return FULL_VOCABULARY_LOGPROBS if top == -1 else top or 0


def completion_logprobs(req: Mapping[str, Any]) -> int | None:
    """Check a text completion's `logprobs` (how many top alternatives per token) as vLLM's
    ``check_logprobs`` before-validator does; return it, or None when logprobs are off."""
    value = req.get("logprobs")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise vllm_validation_error("`logprobs` must be an integer.", "logprobs", value)
    if value < 0:
        raise vllm_validation_error("`logprobs` must be a positive value.", "logprobs", value)
    if not isinstance(value, int):
        raise validation_error("logprobs: Input should be a valid integer", "logprobs")
    return value


def _optional_bool(req: Mapping[str, Any], name: str) -> bool:
    """Return an optional boolean field (null is false), raising vLLM's 400 for another type."""
    value = req.get(name)
    if value is not None and not isinstance(value, bool):
        raise validation_error(f"{name}: Input should be a valid boolean", name)
    return bool(value)


def echo_requested(req: Mapping[str, Any]) -> bool:
    """Return a text completion's `echo` (prepend the prompt to each choice's text)."""
    return _optional_bool(req, "echo")


TOOL_CHOICE_USAGE = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'


def check_tool_usage(req: Mapping[str, Any]) -> None:
    """vLLM's ``ChatCompletionRequest.check_tool_usage`` before-validator. In 0.33 it raises
    ``VLLMValidationError``s, which pydantic lets through: BadRequestErrors whose text ends in their
    parameter (``vllm_validation_error``). `tools: []` is refused; a `tool_choice` other than "none" needs
    `tools`; a named choice must name one of the tools."""
    tools = req.get("tools")
    if tools == []:
        raise vllm_validation_error(
            "`tools` must not be an empty array. Either provide at least one tool or omit the field "
            "entirely.",
            "tools",
        )
    choice = req.get("tool_choice")
    if choice is None or choice == "none":
        return
    if tools is None:
        raise vllm_validation_error("When using `tool_choice`, `tools` must be set.", "tool_choice")
    if not isinstance(choice, dict):
        if choice in ("auto", "required"):
            return
        raise vllm_validation_error(
            f'Invalid value for `tool_choice`: {choice}! Only named tools, "none", "auto" or "required" are '
            "supported.",
            "tool_choice",
        )
    function = choice.get("function")
    parameter = "tool_choice.function.name"
    if not isinstance(function, dict):
        message = f"Invalid value for `function`: `{function}` in `tool_choice`! {TOOL_CHOICE_USAGE}"
        parameter = "tool_choice.function"
    elif "name" not in function:
        message = f"Expected field `name` in `function` in `tool_choice`! {TOOL_CHOICE_USAGE}"
    elif not isinstance(function["name"], str) or not function["name"]:
        message = f"Invalid `name` in `function`: `{function['name']}` in `tool_choice`! {TOOL_CHOICE_USAGE}"
    elif any(_tool_name(tool) == function["name"] for tool in tools if isinstance(tools, list)):
        return
    else:
        message = "The tool specified in `tool_choice` does not match any of the specified `tools`"
        parameter = "tool_choice"
    raise vllm_validation_error(message, parameter)


def _tool_name(tool: Any) -> Any:
    """Return a tool's function name, if it has one."""
    function = tool.get("function") if isinstance(tool, dict) else None
    return function.get("name") if isinstance(function, dict) else None


def check_generation_prompt(req: Mapping[str, Any]) -> None:
    """vLLM's ``check_generation_prompt`` before-validator: both set explicitly and truthy. Its
    ``VLLMValidationError`` names no parameter: a BadRequestError without param or suffix."""
    if req.get("continue_final_message") and req.get("add_generation_prompt"):
        raise bad_request("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")


MAX_COMPLETION_PROMPTS = 1024  # vLLM's VLLM_MAX_COMPLETION_PROMPTS default


def check_prompt_list_length(req: Mapping[str, Any]) -> None:
    """vLLM's ``validate_prompt_list_length`` before-validator: a list of prompts (not one prompt's token
    ids) longer than VLLM_MAX_COMPLETION_PROMPTS is refused."""
    prompt = req.get("prompt")
    if (
        isinstance(prompt, list)
        and len(prompt) > MAX_COMPLETION_PROMPTS
        and not all(type(item) is int for item in prompt)
    ):
        raise vllm_validation_error(
            f"prompt list length {len(prompt)} exceeds the maximum allowed count of "
            f"{MAX_COMPLETION_PROMPTS}. To increase this limit, set the VLLM_MAX_COMPLETION_PROMPTS "
            "environment variable.",
            "prompt",
        )


MAX_STOP_STRINGS = 4  # vLLM's VLLM_MAX_STOP_STRINGS default, the max_length of StopParam's list
_STRING_TYPE = "Input should be a valid string"


def check_stop(req: Mapping[str, Any]) -> Sequence[str]:
    """Check `stop` and `include_stop_str_in_output` as pydantic checks vLLM's fields; return the stop
    strings (none: empty).

    vLLM's StopParam is `str | list[str] (at most VLLM_MAX_STOP_STRINGS) | None`: a value of neither kind
    fails both branches of the union, a list too long fails only its length, and a list of up to four fails
    on each item that is no string. The rendered 400 is ``fakevllm.errors.pydantic_errors``'s.
    """
    stop = req.get("stop")
    flag = req.get("include_stop_str_in_output", False)
    if flag is not False and not _is_lax_bool(flag):
        raise pydantic_errors([_bool_error("body.include_stop_str_in_output", flag)])
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    root = {"type": "string_type", "loc": "body.stop", "msg": _STRING_TYPE, "input": stop}
    if not isinstance(stop, list):
        not_list = {
            "type": "list_type",
            "loc": "body.stop",
            "msg": "Input should be a valid list",
            "input": stop,
        }
        raise pydantic_errors([root, not_list])
    if len(stop) > MAX_STOP_STRINGS:
        too_long = {
            "type": "too_long",
            "loc": "body.stop",
            "msg": f"List should have at most {MAX_STOP_STRINGS} items after validation, not {len(stop)}",
            "input": stop,
            "ctx": {"field_type": "List", "max_length": MAX_STOP_STRINGS, "actual_length": len(stop)},
        }
        raise pydantic_errors([root, too_long])
    items = [
        {"type": "string_type", "loc": f"body.stop.{i}", "msg": _STRING_TYPE, "input": item}
        for i, item in enumerate(stop)
        if not isinstance(item, str)
    ]
    if items:
        raise pydantic_errors([root, *items])
    return stop


def _bool_error(loc: str, value: Any) -> dict[str, Any]:
    """Return pydantic's error for a value its lax mode does not take for a `bool`: text or a whole number
    other than 0 or 1 "unable to interpret", anything else (1.5 too) not a boolean."""
    if isinstance(value, str | int) or (isinstance(value, float) and value.is_integer()):
        message = "Input should be a valid boolean, unable to interpret input"
        return {"type": "bool_parsing", "loc": loc, "msg": message, "input": value}
    return {"type": "bool_type", "loc": loc, "msg": "Input should be a valid boolean", "input": value}


def _is_lax_bool(value: Any) -> bool:
    """Tell whether pydantic's lax mode takes value for a `bool`: a boolean, 0 or 1, or a word for one."""
    if isinstance(value, bool):
        return True
    if isinstance(value, int | float):
        return value in (0, 1)
    return isinstance(value, str) and value.lower() in _TRUE_WORDS | _FALSE_WORDS


def check_stop_strings(stop: Sequence[str]) -> None:
    """vLLM's ``SamplingParams._verify_args``, once the request passed its model and context checks: an
    empty stop string is refused (a ``VLLMValidationError`` without a parameter, so no param)."""
    if any(not string for string in stop):
        raise bad_request("stop cannot contain an empty string.")
