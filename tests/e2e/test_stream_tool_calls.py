"""End to end: a streamed chat whose tool_choice forces a call goes through the gateway to fakevllm (which
streams it as vLLM 0.33 does) and back, its tool-call chunks intact, and its usage is recorded."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from authserver.services import RegisteredClient, client_register
from gateway.services import policy_set
from tests.e2e.conftest import (
    FakeVllm,
    Server,
    client_token,
    stack_stop,
    start_fakevllm,
    start_server,
    start_worker,
    usage_row,
)

pytestmark = [pytest.mark.e2e, pytest.mark.django_db]

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
CALL_ID = re.compile(r"chatcmpl-tool-[0-9a-f]{16}")


@dataclass
class Stack:
    server: Server
    fake: FakeVllm
    app: RegisteredClient


@pytest.fixture(scope="module")
def stack(
    django_db_setup: None, django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("stream-tool-calls")
    fake = start_fakevllm(tmp, "m1", "--tokens", "4")
    with django_db_blocker.unblock():
        app = client_register(name="Tool app", grant_types=["client-credentials"])
        policy_set(client=app.client, actor="test", allowed_models=["m1"])
    server = start_server(tmp, VLLM_UPSTREAMS=fake.base)
    worker = start_worker(tmp)
    try:
        yield Stack(server, fake, app)
    finally:
        stack_stop(django_db_blocker, worker, server.process, fake.process)


def test_a_streamed_forced_tool_call_reaches_the_client_chunk_for_chunk_and_its_usage_is_recorded(
    stack, django_db_blocker
):
    token = client_token(stack.server, stack.app)
    body = {
        "model": "m1",
        "messages": [{"role": "user", "content": "weather in Paris please"}],
        "tools": [WEATHER],
        "tool_choice": "required",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream(
        "POST",
        f"{stack.server.base}/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {token}"},
        timeout=10,
    ) as response:
        assert response.status_code == 200, response.read()
        request_id = response.headers["x-request-id"]
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    role, *calls, usage = (json.loads(line.removeprefix("data: ")) for line in lines[:-1])
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [chunk["choices"][0]["delta"] for chunk in calls]
    first_call = deltas[0]["tool_calls"][0]
    assert list(first_call) == ["id", "type", "index", "function"]  # vLLM's DeltaToolCall order, kept
    assert CALL_ID.fullmatch(first_call.pop("id"))
    opening = {"name": "get_weather", "arguments": '{"text": "tok0 '}
    assert deltas == [
        {"tool_calls": [{"type": "function", "index": 0, "function": opening}]},
        {"tool_calls": [{"index": 0, "function": {"name": None, "arguments": "tok1 "}}]},
        {"tool_calls": [{"index": 0, "function": {"name": None, "arguments": "tok2 "}}]},
        {"tool_calls": [{"index": 0, "function": {"name": None, "arguments": 'tok3 "}'}}]},
    ]
    assert [chunk["choices"][0]["finish_reason"] for chunk in calls] == [None, None, None, "tool_calls"]
    arguments = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas)
    assert json.loads(arguments) == {"text": "tok0 tok1 tok2 tok3 "}
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 4
    sent = stack.fake.state()["last_bodies"][-1]
    assert (sent["tools"], sent["tool_choice"]) == ([WEATHER], "required")
    row = usage_row(django_db_blocker, request_id)
    assert (row.prompt_tokens, row.completion_tokens) == (usage["usage"]["prompt_tokens"], 4)
    assert row.stream is True
