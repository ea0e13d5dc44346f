"""Strict request validation: bodies are parsed and checked against an allowlist before anything is sent.

Only OpenAI's fields and the vLLM extras we chose are accepted, recursively, with caps; an unknown field is
an error naming it, never silently dropped. Fields that pick a chat template, prompt embeddings, remote
media or guided-decoding grammars are refused (they have crashed or compromised vLLM), as are duplicate
keys, NaN, numbers beyond a float's range, deep nesting and anything but a JSON object. An optional field
sent as ``null`` means what leaving it out means (OpenAI's API, and the SDKs, send ``null`` for "not set"),
so it is left out of what goes upstream; so are the response-only fields of an assistant message that the
SDKs send back when a reply is appended to the conversation. A few values go on in the form vLLM reads them
in: an integral float where an integer is expected as that integer, a tool (or a named tool choice) without
a ``type`` as a function. A field of several shapes is checked as the one its JSON type picks, so an error
names the real fault.

The endpoints' tables and ``request_validate`` are here; the parsing is in
``gateway.validation.json_body``, the checkers they are built of in ``gateway.validation.checks``, and what a
forced ``tool_choice`` allows in a tool's parameters in ``gateway.validation.schema``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gateway.validation.checks import (
    DROP,
    Check,
    absent,
    any_json,
    any_object,
    boolean,
    dropped,
    empty_list,
    fields_check,
    integer,
    list_of,
    nullable,
    number,
    obj,
    one_of,
    reject,
    string,
)
from gateway.validation.json_body import body_parse
from gateway.validation.schema import compiled_schema, tools_forced_check

MAX_MESSAGES = 1024
MAX_CONTENT_CHARS = 1_000_000
MAX_N = 8
MAX_TOP_LOGPROBS = 20
MAX_STOP = 8
MAX_TOOLS = 64
MAX_INPUTS = 2048
MAX_PROMPTS = 64  # a completions batch: each prompt is a generation of its own (n each)
COMPLETION_DEFAULT_MAX_TOKENS = 16  # vLLM's and OpenAI's default for /v1/completions (chat has none)

MODEL_NAME_CHARS = 200  # the usage record's column (audit.UsageRecord.model)
_model_string = string(MODEL_NAME_CHARS)
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def model_name(value: Any, path: str) -> None:
    """A model id: a string that fits the usage record, with no control characters (no NUL)."""
    _model_string(value, path)
    if CONTROL_CHARACTERS.search(value) is not None:
        reject(path, "must not contain control characters")


MAX_TOKEN_ID = 2**31  # stop_token_ids and logit_bias keys share one bound
TOKEN_ID_KEY = re.compile(r"[0-9]{1,10}")  # ASCII only: str.isdigit() also takes "²" and "١٢"


_bias = number(-100, 100)


def logit_bias(value: Any, path: str) -> None:
    if not isinstance(value, dict) or len(value) > 300:
        reject(path, "must be an object of at most 300 token ids")
    for key, bias in value.items():
        if TOKEN_ID_KEY.fullmatch(key) is None or int(key) > MAX_TOKEN_ID:
            reject(f"{path}.{key}", f"keys must be token ids from 0 to {MAX_TOKEN_ID}")
        _bias(bias, f"{path}.{key}")


def metadata(value: Any, path: str) -> None:
    """OpenAI's ``metadata``: at most 16 string pairs (keys up to 64 characters, values up to 512)."""
    if not isinstance(value, dict) or len(value) > 16:
        reject(path, "must be an object of at most 16 strings")
    for key, item in value.items():
        if len(key) > 64 or not isinstance(item, str) or len(item) > 512:
            reject(f"{path}.{key}", "keys must be at most 64 characters and values strings of at most 512")


JSON_SCHEMA_FORMAT = obj(
    {"name": string(64), "description": string(4096), "schema": compiled_schema, "strict": boolean},
    frozenset({"name"}),
)
RESPONSE_FORMAT = obj(
    {
        "type": string(16, frozenset({"text", "json_object", "json_schema"})),
        "json_schema": JSON_SCHEMA_FORMAT,
    },
    frozenset({"type"}),
)


def modalities(value: Any, path: str) -> None:
    """OpenAI's output modalities: text only (the gateway serves text models)."""
    if value != ["text"]:
        reject(path, 'must be ["text"]')


def response_format(value: Any, path: str) -> None:
    """Text, any JSON object, or JSON following a schema: vLLM compiles that schema into a grammar, so it
    keeps to what a forced tool_choice's schemas may hold (``gateway.validation.schema``)."""
    RESPONSE_FORMAT(value, path)
    if (value["type"] == "json_schema") != ("json_schema" in value):
        reject(f"{path}.json_schema", "is required with type json_schema, and allowed only with it")


# --- the endpoints ----------------------------------------------------------------------------------


def texts_or_token_ids(max_items: int, message: str) -> Check:
    """A completions prompt or an embeddings input: a text, up to ``max_items`` texts, token ids, or up to
    ``max_items`` lists of token ids."""
    token_ids = integer(0, 2**31)
    return one_of(
        {
            "string": string(MAX_CONTENT_CHARS),
            "list of strings": list_of(string(MAX_CONTENT_CHARS), max_items),
            "list of integers": list_of(token_ids, 1_000_000),
            "list of lists": list_of(list_of(token_ids, 100_000, min_items=1), max_items),
        },
        message=message,
    )


TRUNCATE = integer(-1, 10**7)  # vLLM keeps the prompt's last N tokens (-1: as many as the model takes)
_stops = list_of(string(1024), MAX_STOP)
STOP = one_of(
    {"string": string(1024), "list of strings": _stops, "list": _stops},
    message="must be a string or a list of strings",
)
# A text part may carry Anthropic-style prompt caching hints (Cline, Roo Code and LiteLLM-style clients add
# them); vLLM ignores them (its parts are TypedDicts), so they are checked as objects and not sent on.
TEXT_PART = obj(
    {
        "type": string(16, frozenset({"text"})),
        "text": string(MAX_CONTENT_CHARS),
        "cache_control": dropped(any_object),
    },
    frozenset({"type", "text"}),
)
# A reply's refusal, as a part: vLLM reads it as text (chat_utils' MM_PARSER_MAP); OpenAI allows it in an
# assistant message only, and so does ``message`` below.
REFUSAL_PART = obj(
    {"type": string(16, frozenset({"refusal"})), "refusal": string(MAX_CONTENT_CHARS)},
    frozenset({"type", "refusal"}),
)
CONTENT_PARTS: dict[str, Check] = {"text": TEXT_PART, "refusal": REFUSAL_PART}
NOT_TEXT = "must be text (or, in an assistant message, refusal): no images, audio or video, by URL or inline"


def content_part(value: Any, path: str) -> Any:
    """A part of a message's content: text, or a reply's refusal. Media parts (and anything else) are
    refused by name, whatever else they hold."""
    if type(value) is not dict:
        reject(path, "must be a content part object")
    kind = value.get("type")
    part = CONTENT_PARTS.get(kind) if type(kind) is str else None
    if part is None:
        reject(f"{path}.type", NOT_TEXT)
    return part(value, path)


_parts = list_of(content_part, 256)
CONTENT = one_of(
    {"string": string(MAX_CONTENT_CHARS), "list of objects": _parts, "list": _parts},
    message="must be text or a list of text parts (no images, audio or video, by URL or inline)",
)
_text_parts = list_of(TEXT_PART, 256)
TEXT_CONTENT = one_of(  # text only: a predicted output
    {"string": string(MAX_CONTENT_CHARS), "list of objects": _text_parts, "list": _text_parts},
    message="must be text or a list of text parts",
)
TOOL_CALLS = "an assistant message's tool calls, empty in a reply that called none"
TOOL_CALL = obj(
    {
        "id": string(256),
        "type": string(16, frozenset({"function"})),
        "function": obj(
            {
                "name": string(256),
                "arguments": string(MAX_CONTENT_CHARS),
                "parsed_arguments": dropped(any_json),  # the SDK's parse() adds it to a reply's tool calls
            },
            frozenset({"name", "arguments"}),
        ),
        # A streamed reply's position of the call (the SDK's stream helper, and accumulated
        # ChoiceDeltaToolCalls, keep it): not part of a request's tool call, so not sent on.
        "index": dropped(integer(0, 2**31 - 1)),
    },
    frozenset({"type", "function"}),
)
_MESSAGE = obj(
    {
        "role": string(16, frozenset({"system", "developer", "user", "assistant", "tool"})),
        "content": nullable(CONTENT),
        "name": string(256),
        "tool_calls": one_of(
            {"list": empty_list(TOOL_CALLS), "list of objects": list_of(TOOL_CALL, 128)},
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
        "parsed": dropped(any_json),  # what the SDK's parse() read from a reply's content
    },
    frozenset({"role"}),
)


def message(value: Any, path: str) -> None:
    """A message of the conversation; a refusal part only in an assistant's."""
    _MESSAGE(value, path)
    content = value.get("content")
    if type(content) is list and value["role"] != "assistant":
        for index, part in enumerate(content):
            if part["type"] == "refusal":
                reject(f"{path}.content[{index}].type", "may be refusal only in an assistant message")


_TOOL = obj(
    {
        "type": string(16, frozenset({"function"})),
        "function": obj(
            {"name": string(256), "description": string(4096), "parameters": any_json, "strict": boolean},
            frozenset({"name"}),
        ),
    },
    frozenset({"function"}),
)


def function_typed(check: Check) -> Check:
    """A tool, or a named tool choice, whose ``type`` defaults to ``function`` as in vLLM's models
    (ChatCompletionToolsParam, ChatCompletionNamedToolChoiceParam): it is written in before the body goes
    on, so vLLM reads what was checked here."""

    def typed(value: Any, path: str) -> None:
        check(value, path)
        value.setdefault("type", "function")

    return typed


_TOOLS = list_of(function_typed(_TOOL), MAX_TOOLS)


def tools(value: Any, path: str) -> Any:
    """Function tools; an empty list is left out (vLLM refuses one), and so, then, is a tool_choice that
    only said auto or none (``request_validate``)."""
    _TOOLS(value, path)
    return DROP if value == [] else None


SAMPLING: dict[str, Check] = {
    "model": model_name,
    "stream": boolean,
    # continuous_usage_stats: vLLM's running counts in every chunk (request_validate says when they go on);
    # include_obfuscation: OpenAI's padding of stream events, which vLLM does not do
    # (and request_validate leaves out options with nothing set when stream is not true)
    "stream_options": obj(
        {"include_usage": boolean, "continuous_usage_stats": boolean, "include_obfuscation": dropped(boolean)}
    ),
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
    "spaces_between_special_tokens": boolean,
    "include_stop_str_in_output": boolean,
    "ignore_eos": boolean,  # benchmarks' fixed-length outputs; still bounded by max_tokens and the context
    "thinking_token_budget": integer(-1, 10**7),  # of the reasoning's tokens (-1: no budget)
}
CHAT_FIELDS: dict[str, Check] = {
    **SAMPLING,
    "messages": list_of(message, MAX_MESSAGES, min_items=1),
    "max_tokens": integer(1, 10**7),
    "max_completion_tokens": integer(1, 10**7),
    "min_tokens": integer(0, 10**7),
    "logprobs": boolean,
    "top_logprobs": integer(0, MAX_TOP_LOGPROBS),
    "response_format": response_format,
    "reasoning_effort": string(16, frozenset({"none", "minimal", "low", "medium", "high", "xhigh", "max"})),
    "include_reasoning": boolean,  # vLLM's: false leaves the reasoning out of the reply
    # Variables for the model's own chat template: only the thinking switches (Qwen3's enable_thinking,
    # DeepSeek's thinking), as booleans; the template itself, or anything else it might read, is refused.
    "chat_template_kwargs": obj({"enable_thinking": boolean, "thinking": boolean}),
    "add_generation_prompt": boolean,
    "continue_final_message": boolean,  # vLLM refuses it together with add_generation_prompt
    "truncate_prompt_tokens": TRUNCATE,
    "tools": tools,
    "tool_choice": one_of(
        {
            "string": string(16, frozenset({"none", "auto", "required"})),
            "object": function_typed(
                obj(
                    {
                        "type": string(16, frozenset({"function"})),
                        "function": obj({"name": string(256)}, frozenset({"name"})),
                    },
                    frozenset({"function"}),  # OpenAI: a named tool choice names its function
                )
            ),
        },
        message="must be none, auto, required or a function",
    ),
    "parallel_tool_calls": boolean,
    # OpenAI's own bookkeeping, which vLLM ignores: accepted, checked, and not sent on
    "store": dropped(boolean),
    "metadata": dropped(metadata),
    "service_tier": dropped(string(32)),
    "prompt_cache_key": dropped(string(1024)),
    "safety_identifier": dropped(string(256)),
    "modalities": dropped(modalities),
    "verbosity": dropped(string(16, frozenset({"low", "medium", "high"}))),
    "prediction": dropped(
        obj(
            {"type": string(16, frozenset({"content"})), "content": TEXT_CONTENT},
            frozenset({"type", "content"}),
        )
    ),
}
COMPLETION_FIELDS: dict[str, Check] = {
    **SAMPLING,
    "prompt": texts_or_token_ids(
        MAX_PROMPTS, "must be text, a list of texts, token ids or a list of token id lists"
    ),
    "max_tokens": integer(0, 10**7),  # 0 only with echo (request_validate): the prompt scored, nothing more
    "min_tokens": integer(0, 10**7),
    "echo": boolean,
    "logprobs": integer(0, 5),
    "truncate_prompt_tokens": TRUNCATE,
}
EMBEDDING_FIELDS: dict[str, Check] = {
    "model": model_name,
    "input": texts_or_token_ids(MAX_INPUTS, "must be text, a list of texts or token ids"),
    "encoding_format": string(16, frozenset({"float", "base64"})),
    "dimensions": integer(1, 65_536),
    "user": string(256),
    "truncate_prompt_tokens": TRUNCATE,
    "add_special_tokens": boolean,  # vLLM's: false leaves out the tokenizer's BOS/EOS
}


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
    prompts: int = 1  # a completions batch: how many prompts, each generating n answers
    truncate: int | None = None  # truncate_prompt_tokens: vLLM keeps at most this many of the prompt's
    cap_filled: bool = False  # max_tokens is the client's cap, written in for a chat that set none


ENDPOINT_FIELDS: dict[str, tuple[dict[str, Check], frozenset[str]]] = {
    "chat": (CHAT_FIELDS, frozenset({"model", "messages"})),
    "completions": (COMPLETION_FIELDS, frozenset({"model", "prompt"})),
    "embeddings": (EMBEDDING_FIELDS, frozenset({"model", "input"})),
}


def request_validate(
    kind: str, body: bytes, *, max_tokens_cap: int | None, strict_tools: bool = False
) -> Validated:
    """Validate a body for an endpoint kind (``chat``, ``completions``, ``embeddings``); ``strict_tools``:
    the upstream compiles every tool's schema (``PORTCULLIS_UPSTREAM_STRICT_TOOLS``)."""
    payload = body_parse(body)
    fields, required = ENDPOINT_FIELDS[kind]
    fields_check(payload, fields, required)
    if "tools" in payload:
        tools_forced_check(payload, every_tool_compiled=strict_tools)
    elif "tool_choice" in payload:  # no tools (or an empty list, left out): vLLM refuses a choice then
        if payload["tool_choice"] not in ("auto", "none"):
            reject("tool_choice", "needs tools to choose from")
        del payload["tool_choice"]
    if payload.get("add_generation_prompt") and payload.get("continue_final_message"):
        reject("continue_final_message", "cannot be true together with add_generation_prompt")
    stream = payload.get("stream") is True
    if "stream_options" in payload and not stream:
        if payload["stream_options"]:  # vLLM refuses options with stream off only when they set something
            reject("stream_options", "is only allowed with stream: true")
        del payload["stream_options"]
    if kind == "embeddings":
        return Validated(payload, payload["model"], False, False, 0, 1, _token_ids(payload["input"]))
    key = "max_completion_tokens" if "max_completion_tokens" in payload else "max_tokens"
    requested = payload.get(key)
    if requested == 0 and payload.get("echo") is not True:  # completions: vLLM echoes the prompt for 0
        reject(key, "must be at least 1, or 0 with echo: true (the prompt scored, nothing generated)")
    cap_filled = False
    if max_tokens_cap is not None:
        if requested is not None and requested > max_tokens_cap:
            reject(key, f"must be at most {max_tokens_cap} for this client")
        if requested is None and kind == "chat":
            # the client's cap bounds every generation; where prompt and cap overflow the model's context,
            # the chat is sent again with what the context leaves (gateway.consumers.inference._fitted)
            requested = payload["max_tokens"] = max_tokens_cap
            cap_filled = True
    if requested is None and kind == "completions":  # said here, so the reservation is what vLLM writes
        default = COMPLETION_DEFAULT_MAX_TOKENS
        requested = payload["max_tokens"] = (
            default if max_tokens_cap is None else min(default, max_tokens_cap)
        )
    options = payload.get("stream_options", {})
    wants_usage = bool(options.get("include_usage"))
    if stream:
        # Always ask vLLM for the final usage chunk, so a stream is charged what it really used. vLLM puts
        # running counts in every chunk only with include_usage too (should_include_usage), so they go on
        # only for a client that asked for usage: the include_usage forced here must not turn them on.
        upstream = {"include_usage": True}
        if wants_usage and options.get("continuous_usage_stats"):
            upstream["continuous_usage_stats"] = True
        payload["stream_options"] = upstream
    return Validated(
        payload,
        payload["model"],
        stream,
        wants_usage,
        requested,
        payload.get("n", 1),
        _token_ids(payload["prompt"]) if kind == "completions" else None,
        _prompts(payload["prompt"]) if kind == "completions" else 1,
        payload.get("truncate_prompt_tokens"),
        cap_filled,
    )


def _prompts(prompt: Any) -> int:
    """How many prompts a validated completions prompt holds: a list of texts or of token id lists is a
    batch, each generating its own answers."""
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


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
