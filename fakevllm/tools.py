"""Forced tool calls: what the fake model writes for a named `tool_choice` or "required", and the JSON of
vLLM 0.33's tool calls, whole and streamed (read from the 0.33.0 wheel).

The fake stands for a vLLM started with `--enable-auto-tool-choice --tool-call-parser ...` (without them
vLLM refuses every tool_choice but "none": `OnlineRenderer.render_chat`). Under "auto" (the default with
tools) its model never chooses to call one: it answers text, since how a model spells a call it chose is
its tool parser's own markup. A named choice or "required" makes vLLM force the call through structured
outputs, and parse it with the generic code every tool parser that `supports_required_and_named` shares:
- named: the model writes the function's arguments, a JSON object (`DelegatingParser._extract_tool_calls`);
- "required": it writes `[{"name": ..., "parameters": {...}}]`; the fake's model calls the first tool.
The arguments are `{"text": "tok0 tok1 ... "}`: generated token k is `tok<k> ` as in text, the first token
also opening the JSON and the last closing it, so counts and max_tokens work as for text. A call cut short by
max_tokens stays unclosed, as vLLM leaves it: named, the raw text is the arguments; "required", the array no
longer parses, and the message has no tool call (streamed, its pieces were already sent).

Whole (`assemble_chat_message_fields`): `content` "" (a forced call's None content becomes ""), then
`tool_calls` of `ToolCall(id="chatcmpl-tool-<16 hex>", type, function{name, arguments})`. Streamed
(`ChatStreamProcessor.step`, `DelegatingParser.parse_delta`, vllm/tool_parsers/streaming.py), each token a
chunk, dumped with exclude_unset: the first `{"id","type":"function","index":0,"function":{"name",
"arguments":<that token's argument text>}}` (`DeltaToolCall` field order; the arguments are not ""); then
`{"index":0,"function":{"arguments":...}}` for a named call, where "required" also sets `"name":null`
(`extract_required_tool_call_streaming` passes name=None), and its `]` and the object's `}` are not
arguments. `index` is the call's place in the choice's calls, not the choice's. `finish_reason`
(`resolve_finish_reason`): "tool_calls" for "required" when the model stopped on its own, "stop" for a named
call (OpenAI's), "length" for a call cut short.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fakevllm.asgi import encode
from fakevllm.errors import validation_error

ARGUMENTS_OPEN = '{"text": "'  # json.dumps's separators: vLLM re-dumps "required"'s parameters with them
ARGUMENTS_CLOSE = '"}'
CALL_ID_PREFIX = "chatcmpl-tool-"  # vllm/renderers/chat_utils/tool_call.py make_tool_call_id ("random")

TOOL_CALL = '{"id":"%s","type":"function","function":{"name":%s,"arguments":%s}}'
FIRST_CALL_DELTA = '{"id":"%s","type":"function","index":0,"function":{"name":%s,"arguments":%s}}'
NAMED_ARGUMENTS_DELTA = '{"index":0,"function":{"arguments":%s}}'
REQUIRED_ARGUMENTS_DELTA = '{"index":0,"function":{"name":null,"arguments":%s}}'


@dataclass(frozen=True, slots=True)
class ForcedCall:
    """The tool call a request's tool_choice forces, one per choice, with the ids of those calls."""

    name_json: str  # the function's name, a JSON string
    required: bool  # tool_choice "required" (else a named function)
    ids: tuple[str, ...]  # one call id per choice


def forced_call(req: Mapping[str, Any], choices: int) -> ForcedCall | None:
    """Return the call a chat request's tool_choice forces, or None (no tools, "none", "auto").

    Runs after ``check_tool_usage``, so a named choice names one of the tools.
    """
    choice = req.get("tool_choice")
    if choice == "required":
        name = _first_tool_name(req.get("tools"))
        required = True
    elif isinstance(choice, dict):
        name, required = choice["function"]["name"], False
    else:
        return None
    ids = tuple(CALL_ID_PREFIX + os.urandom(8).hex() for _ in range(choices))  # vLLM's random_uuid: 16 hex
    return ForcedCall(encode(name), required, ids)


def _first_tool_name(tools: Any) -> str:
    """Return the name of the first tool, the one the fake's model calls when a call is required."""
    first = tools[0] if isinstance(tools, list) and tools else None
    function = first.get("function") if isinstance(first, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise validation_error("tools.0.function.name: Field required", "tools")
    return name


def arguments_piece(k: int, last: int, closed: bool) -> str:
    """Return the argument text of generated token k of a call whose last token is `last` (closed: the
    model ended the call itself, not max_tokens)."""
    piece = f"tok{k} "
    if k == 0:
        piece = ARGUMENTS_OPEN + piece
    if k == last and closed:
        piece += ARGUMENTS_CLOSE
    return piece


def output_token(call: ForcedCall, k: int, last: int, closed: bool) -> str:
    """Return generated token k as the model wrote it: its argument text, within the array and object of a
    required call (which the streamed and whole answers leave out)."""
    piece = arguments_piece(k, last, closed)
    if call.required:
        if k == 0:
            piece = '[{"name": ' + call.name_json + ', "parameters": ' + piece
        if k == last and closed:
            piece += "}]"
    return piece


def arguments(ntok: int, closed: bool) -> str:
    """Return the whole arguments text of a call of ntok tokens."""
    return "".join(arguments_piece(k, ntok - 1, closed) for k in range(ntok))


def message_tool_calls_json(call: ForcedCall, choice: int, ntok: int, closed: bool) -> str | None:
    """Return the JSON of a whole answer's tool calls (without brackets), or None when it has none: no
    output, or a "required" array cut short that no longer parses."""
    if ntok == 0 or (call.required and not closed):
        return None
    return TOOL_CALL % (call.ids[choice], call.name_json, encode(arguments(ntok, closed)))


def delta_tool_calls_json(call: ForcedCall, choice: int, k: int, last: int, closed: bool) -> str:
    """Return the JSON of the streamed tool-call delta of token k (without brackets)."""
    piece = encode(arguments_piece(k, last, closed))
    if k == 0:
        return FIRST_CALL_DELTA % (call.ids[choice], call.name_json, piece)
    return (REQUIRED_ARGUMENTS_DELTA if call.required else NAMED_ARGUMENTS_DELTA) % piece


def finish_reason(call: ForcedCall, engine_finish: str, called: bool) -> str:
    """Return a chat choice's finish_reason as vLLM's ``resolve_finish_reason`` does: "tool_calls" only for
    calls made when the model stopped on its own, and never for a named function (OpenAI says "stop")."""
    if called and engine_finish == "stop" and call.required:
        return "tool_calls"
    return engine_finish
