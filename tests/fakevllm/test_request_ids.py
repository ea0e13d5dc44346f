"""fakevllm forms response ids as vLLM does: `chatcmpl-` / `cmpl-` / `embd-` and the request's X-Request-Id
header, else (chat and text completions) the body's `request_id`, else a random id; and it echoes the header
only when asked to, like vLLM's --enable-request-id-headers.
"""

from __future__ import annotations

import json
import re

import httpx

from tests.fakevllm.conftest import chat_body, configure, stream_post

RANDOM_ID = re.compile(r"[0-9a-f]{32}")


def test_the_x_request_id_header_becomes_the_chat_completion_id(client: httpx.Client) -> None:
    headers = {"X-Request-Id": "trace-42"}
    body = client.post("/v1/chat/completions", json=chat_body(), headers=headers).json()
    assert body["id"] == "chatcmpl-trace-42"
    with client.stream("POST", "/v1/chat/completions", json=chat_body(stream=True), headers=headers) as r:
        raw = r.read()
    chunks = [
        json.loads(line[len(b"data: ") :]) for line in raw.split(b"\n\n") if line.startswith(b"data: {")
    ]
    assert {c["id"] for c in chunks} == {"chatcmpl-trace-42"}


def test_the_x_request_id_header_becomes_the_text_completion_and_embedding_ids(client: httpx.Client) -> None:
    headers = {"X-Request-Id": "trace-43"}
    completion = client.post("/v1/completions", json={"model": "alpha", "prompt": "x"}, headers=headers)
    assert completion.json()["id"] == "cmpl-trace-43"
    embedding = client.post("/v1/embeddings", json={"model": "alpha", "input": "x"}, headers=headers)
    assert embedding.json()["id"] == "embd-trace-43"
    invocation = client.post("/invocations", json=chat_body(), headers=headers)
    assert invocation.json()["id"] == "chatcmpl-trace-43"


def test_without_the_header_the_body_request_id_is_used_else_a_random_one(client: httpx.Client) -> None:
    from_body = client.post("/v1/completions", json={"prompt": "x", "request_id": "mine"}).json()
    assert from_body["id"] == "cmpl-mine"
    _, payloads = stream_post(client, "/v1/chat/completions", chat_body(stream=True, request_id="mine"))
    assert json.loads(payloads[0])["id"] == "chatcmpl-mine"
    first, second = (client.post("/v1/completions", json={"prompt": "x"}).json()["id"] for _ in range(2))
    assert RANDOM_ID.fullmatch(first.removeprefix("cmpl-"))
    assert first != second
    # embeddings take no id from the body, as vLLM's pooling servers
    embedding = client.post("/v1/embeddings", json={"input": "x", "request_id": "mine"}).json()
    assert RANDOM_ID.fullmatch(embedding["id"].removeprefix("embd-"))


def test_the_header_wins_over_the_body_and_may_be_empty(client: httpx.Client) -> None:
    body = chat_body(request_id="from-body")
    assert client.post("/v1/chat/completions", json=body, headers={"X-Request-Id": "h"}).json()["id"] == (
        "chatcmpl-h"
    )
    assert client.post("/v1/chat/completions", json=body, headers={"X-Request-Id": ""}).json()["id"] == (
        "chatcmpl-"
    )


def test_a_body_request_id_that_is_not_a_string_is_rejected_even_beside_the_header(
    client: httpx.Client,
) -> None:
    response = client.post(
        "/v1/chat/completions", json=chat_body(request_id=7), headers={"X-Request-Id": "h"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "request_id"


def test_an_id_with_json_special_characters_stays_valid_json(client: httpx.Client) -> None:
    awkward = 'say "hi" \\ bye'
    body = client.post("/v1/chat/completions", json=chat_body(), headers={"X-Request-Id": awkward}).json()
    assert body["id"] == f"chatcmpl-{awkward}"
    _, payloads = stream_post(
        client, "/v1/completions", {"prompt": "x", "stream": True, "request_id": awkward}
    )
    assert json.loads(payloads[0])["id"] == f"cmpl-{awkward}"


def test_no_x_request_id_response_header_unless_enabled(client: httpx.Client) -> None:
    response = client.post("/v1/chat/completions", json=chat_body(), headers={"X-Request-Id": "h"})
    assert "x-request-id" not in response.headers


def test_enabled_request_id_headers_echo_the_header_or_a_random_id_on_every_response(
    client: httpx.Client,
) -> None:
    configure(client, enable_request_id_headers=True)
    echoed = client.post("/v1/chat/completions", json=chat_body(), headers={"X-Request-Id": "h"})
    assert echoed.headers["x-request-id"] == "h"
    streamed, _ = stream_post(client, "/v1/chat/completions", chat_body(stream=True))
    assert RANDOM_ID.fullmatch(streamed.headers["x-request-id"])
    for response in (client.get("/health"), client.get("/no/such/path")):
        assert RANDOM_ID.fullmatch(response.headers["x-request-id"])
    configure(client, api_key="k")
    unauthorized = client.get("/v1/models", headers={"X-Request-Id": "h"})
    assert (unauthorized.status_code, unauthorized.headers["x-request-id"]) == (401, "h")
