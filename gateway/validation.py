"""Strict request validation: bodies are parsed and checked against an allowlist before anything is sent.

Only OpenAI's fields and the vLLM extras we chose are accepted, recursively, with caps; an unknown field is
an error naming it, never silently dropped. Fields that pick a chat template, prompt embeddings, remote
media or guided-decoding grammars are refused (they have crashed or compromised vLLM), as are duplicate
keys, NaN, numbers beyond a float's range, deep nesting and anything but a JSON object. An optional field
sent as ``null`` means what leaving it out means (OpenAI's API, and the SDKs, send ``null`` for "not set"),
so it is left out of what goes upstream; so are the response-only fields of an assistant message that the
SDKs send back when a reply is appended to the conversation.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from gateway.errors import InvalidRequest

MAX_DEPTH = 32
MAX_MESSAGES = 1024
MAX_CONTENT_CHARS = 1_000_000
MAX_N = 8
MAX_TOP_LOGPROBS = 20
MAX_STOP = 8
MAX_TOOLS = 64
MAX_INPUTS = 2048

Check = Callable[[Any, str], Any]  # raises InvalidRequest; returns DROP for a value not to send upstream


def _fail(path: str, message: str) -> NoReturn:
    raise InvalidRequest(f"{message} ({path})", param=path)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):  # a key repeats: name the first one that does
        seen: set[str] = set()
        for key, _value in pairs:
            if key in seen:
                raise InvalidRequest(f"Duplicate key {key!r} in the JSON body.", param=key)
            seen.add(key)
    return result


def _no_constants(name: str) -> None:
    raise InvalidRequest(f"{name} is not valid JSON.")


def _finite_float(text: str) -> float:
    value = float(text)
    # 1e999: valid JSON, but no float holds it (it would go upstream as Infinity)
    if not math.isfinite(value):
        raise InvalidRequest(f"The number {text[:32]} is too large.")
    return value


def _depth_ok(value: Any) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            return False
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return True


def body_parse(body: bytes) -> dict[str, Any]:
    """Parse a JSON object body: no duplicate keys, no NaN/Infinity (nor 1e999), bounded nesting."""
    try:
        value = json.loads(
            body, object_pairs_hook=_no_duplicates, parse_constant=_no_constants, parse_float=_finite_float
        )
    except InvalidRequest:
        raise
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("The body is not valid JSON.") from None
    except RecursionError:
        raise InvalidRequest(f"The JSON body is nested deeper than {MAX_DEPTH} levels.") from None
    if not isinstance(value, dict):
        raise InvalidRequest("The body must be a JSON object.")
    # Nesting cannot be deeper than the number of brackets in the body (those inside strings included; in
    # UTF-8, -16 and -32 alike each is a byte of that value), so a body with few (most are) is not walked.
    if body.count(b"{") + body.count(b"[") > MAX_DEPTH and not _depth_ok(value):
        raise InvalidRequest(f"The JSON body is nested deeper than {MAX_DEPTH} levels.")
    return value


# --- small checkers -------------------------------------------------------------------------------------


def string(max_len: int = 256, choices: frozenset[str] | None = None) -> Check:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, str):
            _fail(path, "must be a string")
        if len(value) > max_len:
            _fail(path, f"must be at most {max_len} characters")
        if choices is not None and value not in choices:
            _fail(path, f"must be one of {', '.join(sorted(choices))}")

    return check


MODEL_NAME_CHARS = 200  # the usage record's column (audit.UsageRecord.model)
_model_string = string(MODEL_NAME_CHARS)
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def model_name(value: Any, path: str) -> None:
    """A model id: a string that fits the usage record, with no control characters (no NUL)."""
    _model_string(value, path)
    if CONTROL_CHARACTERS.search(value) is not None:
        _fail(path, "must not contain control characters")


def integer(low: int, high: int) -> Check:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            _fail(path, "must be an integer")
        if not low <= value <= high:
            _fail(path, f"must be between {low} and {high}")

    return check


def number(low: float, high: float) -> Check:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, int | float) or isinstance(value, bool):
            _fail(path, "must be a number")
        if not low <= value <= high:  # exact for an int of any size (float() of one may overflow)
            _fail(path, f"must be between {low} and {high}")

    return check


def boolean(value: Any, path: str) -> None:
    if not isinstance(value, bool):
        _fail(path, "must be true or false")


KEEPS_NULL: set[Check] = set()  # checkers for which null is a value of its own (it goes upstream as sent)


def nullable(inner: Check) -> Check:
    """Null is a value of its own here (a message's content: an assistant turn that only calls tools)."""

    def check(value: Any, path: str) -> None:
        if value is not None:
            inner(value, path)

    KEEPS_NULL.add(check)
    return check


class _Drop:
    """What a checker returns for a value that is accepted but not sent upstream."""


DROP = _Drop()


def absent(description: str) -> Check:
    """A field accepted only as null (then left out, like any null): a response field sent back."""

    def check(value: Any, path: str) -> None:
        _fail(path, f"is accepted only as null ({description})")

    return check


def empty_list(description: str) -> Check:
    """A field accepted only as null or [] (then left out): a response field sent back."""

    def check(value: Any, path: str) -> Any:
        if value != []:
            _fail(path, f"is accepted only as null or [] ({description})")
        return DROP

    return check


def any_json(value: Any, path: str) -> None:
    """Accept any JSON value (depth and size are bounded for the whole body)."""


def list_of(item: Check, max_items: int, min_items: int = 0) -> Check:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, list):
            _fail(path, "must be a list")
        if not min_items <= len(value) <= max_items:
            _fail(path, f"must have between {min_items} and {max_items} items")
        for index, element in enumerate(value):
            item(element, f"{path}[{index}]")

    return check


def one_of(*checks: Check, message: str) -> Check:
    def check(value: Any, path: str) -> Any:
        for candidate in checks:
            try:
                return candidate(value, path)
            except InvalidRequest:
                continue
        _fail(path, message)

    return check


def obj(fields: dict[str, Check], required: frozenset[str] = frozenset()) -> Check:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, dict):
            _fail(path, "must be an object")
        fields_check(value, fields, required, path)

    return check


def fields_check(
    value: dict[str, Any], fields: dict[str, Check], required: frozenset[str], path: str = ""
) -> None:
    """Check an object's keys against an allowlist and each value against its checker; leave out the
    fields sent as null (unless null is a value of their own) and those their checker drops."""
    dropped: list[str] = []
    for key, element in value.items():
        where = f"{path}.{key}" if path else key
        checker = fields.get(key)
        if checker is None:
            _fail(where, "is not a supported field")
        if element is None and checker not in KEEPS_NULL:
            dropped.append(key)
        elif checker(element, where) is DROP:
            dropped.append(key)
    for key in dropped:
        del value[key]
    for key in required - value.keys():
        _fail(f"{path}.{key}" if path else key, "is required")


MAX_TOKEN_ID = 2**31  # stop_token_ids and logit_bias keys share one bound
TOKEN_ID_KEY = re.compile(r"[0-9]{1,10}")  # ASCII only: str.isdigit() also takes "²" and "١٢"


def logit_bias(value: Any, path: str) -> None:
    if not isinstance(value, dict) or len(value) > 300:
        _fail(path, "must be an object of at most 300 token ids")
    for key, bias in value.items():
        if TOKEN_ID_KEY.fullmatch(key) is None or int(key) > MAX_TOKEN_ID:
            _fail(f"{path}.{key}", f"keys must be token ids from 0 to {MAX_TOKEN_ID}")
        number(-100, 100)(bias, f"{path}.{key}")


# --- the endpoints ----------------------------------------------------------------------------------

STOP = one_of(string(1024), list_of(string(1024), MAX_STOP), message="must be a string or a list of strings")
TEXT_PART = obj(
    {"type": string(16, frozenset({"text"})), "text": string(MAX_CONTENT_CHARS)}, frozenset({"type", "text"})
)
CONTENT = one_of(
    string(MAX_CONTENT_CHARS),
    list_of(TEXT_PART, 256),
    message="must be text or a list of text parts (remote media is not allowed)",
)
TOOL_CALLS = "an assistant message's tool calls, empty in a reply that called none"
TOOL_CALL = obj(
    {
        "id": string(256),
        "type": string(16, frozenset({"function"})),
        "function": obj(
            {"name": string(256), "arguments": string(MAX_CONTENT_CHARS)}, frozenset({"name", "arguments"})
        ),
    },
    frozenset({"type", "function"}),
)
MESSAGE = obj(
    {
        "role": string(16, frozenset({"system", "developer", "user", "assistant", "tool"})),
        "content": nullable(CONTENT),
        "name": string(256),
        "tool_calls": one_of(
            empty_list(TOOL_CALLS),
            list_of(TOOL_CALL, 128, min_items=1),
            message="must be a list of tool calls",
        ),
        "tool_call_id": string(256),
        # What an OpenAI SDK sends back when a reply is appended to the conversation as it came (vLLM's
        # ChatMessage): text fields go on, the rest only as null or empty, and then not upstream.
        "refusal": string(MAX_CONTENT_CHARS),
        "reasoning_content": string(MAX_CONTENT_CHARS),
        "reasoning": string(MAX_CONTENT_CHARS),
        "annotations": empty_list("a reply's annotations"),
        "audio": absent("a reply's audio"),
        "function_call": absent("the deprecated function call of a reply"),
    },
    frozenset({"role"}),
)
TOOL = obj(
    {
        "type": string(16, frozenset({"function"})),
        "function": obj(
            {"name": string(256), "description": string(4096), "parameters": any_json, "strict": boolean},
            frozenset({"name"}),
        ),
    },
    frozenset({"type", "function"}),
)
SAMPLING: dict[str, Check] = {
    "model": model_name,
    "stream": boolean,
    "stream_options": obj({"include_usage": boolean}),
    "n": integer(1, MAX_N),
    "stop": STOP,
    "temperature": number(0, 2),
    "top_p": number(0, 1),
    "frequency_penalty": number(-2, 2),
    "presence_penalty": number(-2, 2),
    "seed": integer(-(2**63), 2**63 - 1),
    "user": string(256),
    "logit_bias": logit_bias,
    # vLLM sampling extras we allow: they only shape sampling, bounded like the rest.
    "top_k": integer(-1, 1000),
    "min_p": number(0, 1),
    "repetition_penalty": number(0.01, 2),
    "stop_token_ids": list_of(integer(0, MAX_TOKEN_ID), 64),
    "skip_special_tokens": boolean,
    "include_stop_str_in_output": boolean,
}
CHAT_FIELDS: dict[str, Check] = {
    **SAMPLING,
    "messages": list_of(MESSAGE, MAX_MESSAGES, min_items=1),
    "max_tokens": integer(1, 10**7),
    "max_completion_tokens": integer(1, 10**7),
    "min_tokens": integer(0, 10**7),
    "logprobs": boolean,
    "top_logprobs": integer(0, MAX_TOP_LOGPROBS),
    "response_format": obj({"type": string(16, frozenset({"text", "json_object"}))}, frozenset({"type"})),
    "tools": list_of(TOOL, MAX_TOOLS),
    "tool_choice": one_of(
        string(16, frozenset({"none", "auto", "required"})),
        obj(
            {
                "type": string(16, frozenset({"function"})),
                "function": obj({"name": string(256)}, frozenset({"name"})),
            },
            frozenset({"type", "function"}),  # OpenAI: a named tool choice names its function
        ),
        message="must be none, auto, required or a function",
    ),
    "parallel_tool_calls": boolean,
}
COMPLETION_FIELDS: dict[str, Check] = {
    **SAMPLING,
    "prompt": one_of(
        string(MAX_CONTENT_CHARS),
        list_of(string(MAX_CONTENT_CHARS), 64, min_items=1),
        list_of(integer(0, 2**31), 1_000_000, min_items=1),
        message="must be text, a list of texts or a list of token ids",
    ),
    "max_tokens": integer(1, 10**7),
    "min_tokens": integer(0, 10**7),
    "echo": boolean,
    "logprobs": integer(0, 5),
}
EMBEDDING_FIELDS: dict[str, Check] = {
    "model": model_name,
    "input": one_of(
        string(MAX_CONTENT_CHARS),
        list_of(string(MAX_CONTENT_CHARS), MAX_INPUTS, min_items=1),
        list_of(integer(0, 2**31), 1_000_000, min_items=1),
        list_of(list_of(integer(0, 2**31), 100_000, min_items=1), MAX_INPUTS, min_items=1),
        message="must be text, a list of texts or token ids",
    ),
    "encoding_format": string(16, frozenset({"float", "base64"})),
    "dimensions": integer(1, 65_536),
    "user": string(256),
}


# A forced tool choice ("required", or a named function) makes vLLM constrain the output with the tools'
# parameter schemas: guided decoding by another door, and schemas have crashed vLLM's engine when compiled
# (an invalid regex, a bound past 32 bits: vllm#17248, #17894, #47312). Those schemas must then keep to
# plain structure: these keywords, local $refs, bounded numbers; regexes and formats are refused.
SCHEMA_KEYWORDS = frozenset(
    {
        "type", "properties", "required", "items", "enum", "const", "description", "title", "default",
        "examples", "additionalProperties", "anyOf", "oneOf", "allOf", "$defs", "definitions", "$ref",
        "minItems", "maxItems", "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum",
        "exclusiveMaximum", "minProperties", "maxProperties", "nullable", "strict",
    }
)  # fmt: skip
SCHEMA_SUBSCHEMAS = ("items", "additionalProperties")  # a schema (or a boolean, for additionalProperties)
SCHEMA_MAPS = ("properties", "$defs", "definitions")  # name -> schema
SCHEMA_LISTS = ("anyOf", "oneOf", "allOf")
SCHEMA_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
SCHEMA_COUNTS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties")
SCHEMA_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
SCHEMA_TYPE = one_of(
    string(16, SCHEMA_TYPES),
    list_of(string(16, SCHEMA_TYPES), 7, min_items=1),
    message="must be a JSON type or a list of them",
)
SCHEMA_BOUND = 2**31 - 1
SCHEMA_MAX_COUNT = 4096
LOCAL_REF = re.compile(r"#/(\$defs|definitions)/[A-Za-z0-9_.-]{1,128}")


def forced_schema(value: Any, path: str) -> None:
    """A tool's parameters when vLLM will compile them into a grammar (see SCHEMA_KEYWORDS)."""
    if isinstance(value, bool):
        return
    if not isinstance(value, dict):
        _fail(path, "must be a JSON schema object")
    for key, item in value.items():
        where = f"{path}.{key}"
        if key not in SCHEMA_KEYWORDS:
            _fail(where, "is not accepted in a schema that a forced tool_choice compiles into a grammar")
        if key in SCHEMA_SUBSCHEMAS:
            forced_schema(item, where)
        elif key in SCHEMA_MAPS:
            if not isinstance(item, dict):
                _fail(where, "must map names to schemas")
            for name, sub in item.items():
                forced_schema(sub, f"{where}.{name}")
        elif key in SCHEMA_LISTS:
            list_of(forced_schema, 64, min_items=1)(item, where)
        elif key in SCHEMA_BOUNDS:
            number(-SCHEMA_BOUND, SCHEMA_BOUND)(item, where)
        elif key in SCHEMA_COUNTS:
            integer(0, SCHEMA_MAX_COUNT)(item, where)
        elif key == "$ref" and (not isinstance(item, str) or LOCAL_REF.fullmatch(item) is None):
            _fail(where, "must be a local reference (#/$defs/<name>)")
        elif key == "type":
            SCHEMA_TYPE(item, where)
        elif key == "required":
            list_of(string(256), 1024)(item, where)


def tools_forced_check(payload: dict[str, Any]) -> None:
    """With a forced tool_choice, every tool's parameters must be a schema vLLM can compile safely."""
    choice = payload.get("tool_choice")
    if choice is None or choice in ("none", "auto"):
        return
    for index, tool in enumerate(payload.get("tools") or ()):
        parameters = tool["function"].get("parameters")
        if parameters is not None:
            forced_schema(parameters, f"tools[{index}].function.parameters")


@dataclass(frozen=True)
class Validated:
    """A checked request: the body to send upstream and what the limits need to know."""

    payload: dict[str, Any]
    model: str
    stream: bool
    wants_usage: bool
    max_tokens: int | None  # None: bounded only by the model's context (vLLM's default)
    n: int
    prompt_token_ids: int | None = None  # a prompt (or input) sent as token ids: how many, exactly


ENDPOINT_FIELDS: dict[str, tuple[dict[str, Check], frozenset[str]]] = {
    "chat": (CHAT_FIELDS, frozenset({"model", "messages"})),
    "completions": (COMPLETION_FIELDS, frozenset({"model", "prompt"})),
    "embeddings": (EMBEDDING_FIELDS, frozenset({"model", "input"})),
}


def request_validate(kind: str, body: bytes, *, max_tokens_cap: int | None) -> Validated:
    """Validate a body for an endpoint kind (``chat``, ``completions``, ``embeddings``)."""
    payload = body_parse(body)
    fields, required = ENDPOINT_FIELDS[kind]
    fields_check(payload, fields, required)
    if "tool_choice" in payload:
        tools_forced_check(payload)
    stream = payload.get("stream") is True
    if "stream_options" in payload and not stream:
        _fail("stream_options", "is only allowed with stream: true")
    if kind == "embeddings":
        return Validated(payload, payload["model"], False, False, 0, 1, _token_ids(payload["input"]))
    key = "max_completion_tokens" if "max_completion_tokens" in payload else "max_tokens"
    requested = payload.get(key)
    if max_tokens_cap is not None:
        if requested is not None and requested > max_tokens_cap:
            _fail(key, f"must be at most {max_tokens_cap} for this client")
        if requested is None:
            requested = payload["max_tokens"] = max_tokens_cap  # the client's cap bounds every generation
    wants_usage = bool(payload.get("stream_options", {}).get("include_usage"))
    if stream:
        # Always ask vLLM for the final usage chunk, so a stream is charged what it really used.
        payload["stream_options"] = {**payload.get("stream_options", {}), "include_usage": True}
    return Validated(
        payload,
        payload["model"],
        stream,
        wants_usage,
        requested,
        payload.get("n", 1),
        _token_ids(payload["prompt"]) if kind == "completions" else None,
    )


def _token_ids(prompt: Any) -> int | None:
    """How many token ids a validated prompt or input holds, when it is token ids (None for text): about 2
    bytes of the body a token for small ids, so the estimate from the body's size would fall short."""
    if not isinstance(prompt, list) or not prompt:
        return None
    if isinstance(prompt[0], int):
        return len(prompt)
    if isinstance(prompt[0], list):
        return sum(len(ids) for ids in prompt)
    return None
