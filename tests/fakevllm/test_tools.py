"""A forced tool call (a named tool_choice, or "required") comes back as vLLM 0.33 returns it: whole, content
"" and the call; streamed, the call's id, type and name with the first piece of its arguments, then argument
pieces ("required" naming null), and finish_reason "tool_calls" for "required" but "stop" for a named call.
Under "auto" the fake's model answers text, as before."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest

from tests.fakevllm.conftest import chat_body, configure, stream_post

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
NAMED = {"type": "function", "function": {"name": "get_time"}}
CALL_ID = re.compile(r"chatcmpl-tool-[0-9a-f]{16}")
ARGUMENTS = '{"text": "tok0 tok1 tok2 tok3 tok4 "}'  # the conftest's fake generates 5 tokens
CHUNK_HEAD = b'{"id":"chatcmpl-r1","object":"chat.completion.chunk","created":0,"model":"alpha","choices":['


def _tool_chat(choice: Any, **extra: Any) -> dict[str, Any]:
    return chat_body(tools=[WEATHER, TIME], tool_choice=choice, **extra)


def _chunks(payloads: list[bytes]) -> list[dict[str, Any]]:
    assert payloads[-1] == b"[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


@pytest.mark.parametrize(
    ("choice", "name", "finish"), [(NAMED, "get_time", "stop"), ("required", "get_weather", "tool_calls")]
)
def test_a_forced_call_comes_whole_as_vllms_tool_calls_with_empty_content(
    client: httpx.Client, choice: Any, name: str, finish: str
) -> None:
    body = client.post("/v1/chat/completions", json=_tool_chat(choice)).json()
    [answer] = body["choices"]
    message = answer["message"]
    assert list(message) == [
        "role", "content", "refusal", "annotations", "audio", "function_call", "tool_calls", "reasoning"
    ]  # fmt: skip
    assert message["content"] == ""
    [call] = message["tool_calls"]
    assert list(call) == ["id", "type", "function"]
    assert CALL_ID.fullmatch(call["id"])
    assert call["type"] == "function"
    assert call["function"] == {"name": name, "arguments": ARGUMENTS}
    assert json.loads(call["function"]["arguments"]) == {"text": "tok0 tok1 tok2 tok3 tok4 "}
    assert answer["finish_reason"] == finish  # OpenAI's: "stop" when the caller named the function
    assert body["usage"]["completion_tokens"] == 5


def test_a_named_call_streams_its_id_and_name_with_the_first_arguments_then_the_rest(
    client: httpx.Client,
) -> None:
    body = _tool_chat(NAMED, stream=True, request_id="r1", max_tokens=3)
    configure(client, tokens=3)
    response, payloads = stream_post(client, "/v1/chat/completions", body)
    assert response.status_code == 200
    frames = [re.sub(rb'"created":\d+', b'"created":0', p) for p in payloads]
    first = re.sub(rb"chatcmpl-tool-[0-9a-f]{16}", b"ID", frames[1])
    assert first == CHUNK_HEAD + (
        b'{"index":0,"delta":{"tool_calls":[{"id":"ID","type":"function","index":0,"function":'
        b'{"name":"get_time","arguments":"{\\"text\\": \\"tok0 "}}]},"logprobs":null,"finish_reason":null,'
        b'"token_ids":null}],"kv_transfer_params":null}'
    )
    assert frames[2] == CHUNK_HEAD + (
        b'{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"tok1 "}}]},"logprobs":null,'
        b'"finish_reason":null,"token_ids":null}],"kv_transfer_params":null}'
    )
    assert frames[3].startswith(
        CHUNK_HEAD + b'{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"tok2 \\"}"}}]},'
        b'"logprobs":null,"finish_reason":"stop","stop_reason":null,"token_ids":null,"weight_versions":null}],'
        b'"system_fingerprint":'
    )
    assert frames[4:] == [b"[DONE]"]


def test_a_required_call_streams_null_names_after_the_first_and_finishes_with_tool_calls(
    client: httpx.Client,
) -> None:
    stream_options = {"include_usage": True}
    _, payloads = stream_post(
        client,
        "/v1/chat/completions",
        _tool_chat("required", stream=True, n=2, stream_options=stream_options),
    )
    *chunks, usage = _chunks(payloads)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    calls: dict[int, list[dict[str, Any]]] = {0: [], 1: []}
    for chunk in chunks[2:]:  # after the two role chunks
        [choice] = chunk["choices"]
        [delta_call] = choice["delta"]["tool_calls"]
        calls[choice["index"]].append(delta_call)
    for index, deltas in calls.items():
        first, *rest = deltas
        assert list(first) == ["id", "type", "index", "function"]
        assert CALL_ID.fullmatch(first["id"])
        assert first["function"] == {"name": "get_weather", "arguments": '{"text": "tok0 '}
        assert first["index"] == 0  # the call's place among the choice's calls, not the choice's
        assert all(
            d == {"index": 0, "function": {"name": None, "arguments": d["function"]["arguments"]}}
            for d in rest
        )
        assert "".join(d["function"]["arguments"] for d in deltas) == ARGUMENTS, index
    assert calls[0][0]["id"] != calls[1][0]["id"]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert finishes == ["tool_calls", "tool_calls"]
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 10


def test_streamed_arguments_join_into_the_whole_answers_arguments(client: httpx.Client) -> None:
    for choice in (NAMED, "required"):
        whole = client.post("/v1/chat/completions", json=_tool_chat(choice)).json()
        _, payloads = stream_post(client, "/v1/chat/completions", _tool_chat(choice, stream=True))
        pieces = [
            call["function"]["arguments"]
            for chunk in _chunks(payloads)
            for call in chunk["choices"][0]["delta"].get("tool_calls", [])
        ]
        assert "".join(pieces) == whole["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]


def test_a_call_cut_short_by_max_tokens_finishes_with_length_and_a_required_array_is_no_call(
    client: httpx.Client,
) -> None:
    named = client.post("/v1/chat/completions", json=_tool_chat(NAMED, max_tokens=2)).json()["choices"][0]
    assert named["message"]["tool_calls"][0]["function"]["arguments"] == '{"text": "tok0 tok1 '
    assert named["finish_reason"] == "length"
    required = client.post("/v1/chat/completions", json=_tool_chat("required", max_tokens=2)).json()
    assert required["choices"][0]["message"]["content"] == ""
    assert "tool_calls" not in required["choices"][0]["message"]  # the unclosed array does not parse
    assert required["choices"][0]["finish_reason"] == "length"
    _, payloads = stream_post(
        client, "/v1/chat/completions", _tool_chat("required", max_tokens=2, stream=True)
    )
    last = _chunks(payloads)[-1]["choices"][0]
    assert last["delta"] == {"tool_calls": [{"index": 0, "function": {"name": None, "arguments": "tok1 "}}]}
    assert last["finish_reason"] == "length"


def test_logprobs_of_a_forced_call_are_of_the_tokens_the_model_wrote(client: httpx.Client) -> None:
    body = client.post("/v1/chat/completions", json=_tool_chat("required", logprobs=True)).json()
    tokens = [item["token"] for item in body["choices"][0]["logprobs"]["content"]]
    assert "".join(tokens) == '[{"name": "get_weather", "parameters": ' + ARGUMENTS + "}]"
    _, payloads = stream_post(client, "/v1/chat/completions", _tool_chat(NAMED, logprobs=True, stream=True))
    streamed = [
        item["token"]
        for chunk in _chunks(payloads)[1:]
        for item in chunk["choices"][0]["logprobs"]["content"]
    ]
    assert "".join(streamed) == ARGUMENTS


@pytest.mark.parametrize("choice", ["auto", None, "none"])
def test_a_call_left_to_the_model_or_refused_is_answered_with_text(
    client: httpx.Client, choice: str | None
) -> None:
    body = chat_body(tools=[WEATHER], **({} if choice is None else {"tool_choice": choice}))
    message = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert message["content"] == "tok0 tok1 tok2 tok3 tok4 "
    assert "tool_calls" not in message
    _, payloads = stream_post(client, "/v1/chat/completions", {**body, "stream": True})
    assert b"tool_calls" not in b"".join(payloads)


def test_a_required_call_with_no_named_tool_is_refused(client: httpx.Client) -> None:
    body = chat_body(tools=[{"type": "function", "function": {}}], tool_choice="required")
    answer = client.post("/v1/chat/completions", json=body)
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "tools"
