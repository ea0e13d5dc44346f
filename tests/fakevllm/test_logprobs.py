"""Logprobs and echo in vLLM's shapes: ChatCompletionLogProbs on chat choices, CompletionLogProbs on text
completion choices, in whole answers and in stream chunks, the same on every run."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.fakevllm.conftest import chat_body, stream_post

TOKENS = ["tok0 ", "tok1 ", "tok2 ", "tok3 ", "tok4 "]


def _chunks(client: httpx.Client, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    response, payloads = stream_post(client, path, {**body, "stream": True})
    assert response.status_code == 200
    assert payloads[-1] == b"[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def test_chat_logprobs_have_vllms_content_shape_with_the_top_alternatives(client: httpx.Client) -> None:
    body = chat_body(logprobs=True, top_logprobs=2)
    first = client.post("/v1/chat/completions", json=body).json()
    assert first == client.post("/v1/chat/completions", json=body).json() | {
        "id": first["id"],
        "created": first["created"],
    }
    [choice] = first["choices"]
    content = choice["logprobs"]["content"]
    assert [item["token"] for item in content] == TOKENS
    for item in content:
        assert list(item) == ["token", "logprob", "bytes", "top_logprobs"]
        assert item["bytes"] == list(item["token"].encode())
        assert isinstance(item["logprob"], float)
        assert item["logprob"] <= 0
        assert len(item["top_logprobs"]) == 2
        assert item["top_logprobs"][0] == {k: item[k] for k in ("token", "logprob", "bytes")}
        assert item["top_logprobs"][1]["logprob"] < item["logprob"]
    without_top = client.post("/v1/chat/completions", json=chat_body(logprobs=True)).json()
    assert all(item["top_logprobs"] == [] for item in without_top["choices"][0]["logprobs"]["content"])
    plain = client.post("/v1/chat/completions", json=chat_body()).json()
    assert plain["choices"][0]["logprobs"] is None


def test_streamed_chat_chunks_carry_the_logprobs_of_their_token(client: httpx.Client) -> None:
    whole = client.post("/v1/chat/completions", json=chat_body(logprobs=True, top_logprobs=1)).json()
    chunks = _chunks(client, "/v1/chat/completions", chat_body(logprobs=True, top_logprobs=1))
    role, *tokens = chunks
    assert role["choices"][0]["logprobs"] is None
    streamed = [item for c in tokens for item in c["choices"][0]["logprobs"]["content"]]
    assert streamed == whole["choices"][0]["logprobs"]["content"]
    assert [len(c["choices"][0]["logprobs"]["content"]) for c in tokens] == [1] * 5


def test_completion_logprobs_have_vllms_shape(client: httpx.Client) -> None:
    body = {"model": "alpha", "prompt": "say it", "logprobs": 2}
    [choice] = client.post("/v1/completions", json=body).json()["choices"]
    logprobs = choice["logprobs"]
    assert list(logprobs) == ["text_offset", "token_logprobs", "tokens", "top_logprobs"]
    assert logprobs["tokens"] == TOKENS
    assert logprobs["text_offset"] == [0, 5, 10, 15, 20]
    assert all(isinstance(lp, float) and lp <= 0 for lp in logprobs["token_logprobs"])
    for token, logprob, top in zip(TOKENS, logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True):
        assert len(top) == 2
        assert top[token] == logprob
    zero = client.post("/v1/completions", json={**body, "logprobs": 0}).json()["choices"][0]["logprobs"]
    assert [list(top) for top in zero["top_logprobs"]] == [[t] for t in TOKENS]
    plain = client.post("/v1/completions", json={"model": "alpha", "prompt": "say it"}).json()
    assert plain["choices"][0]["logprobs"] is None


def test_echo_prepends_the_prompt_and_its_logprobs_start_with_none(client: httpx.Client) -> None:
    body = {"model": "alpha", "prompt": "say it", "echo": True, "logprobs": 1, "max_tokens": 2}
    [choice] = client.post("/v1/completions", json=body).json()["choices"]
    assert choice["text"] == "say ittok0 tok1 "
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == ["say ", "it", "tok0 ", "tok1 "]
    assert logprobs["text_offset"] == [0, 4, 6, 11]
    assert logprobs["token_logprobs"][0] is None
    assert logprobs["top_logprobs"][0] is None
    assert all(isinstance(lp, float) for lp in logprobs["token_logprobs"][1:])
    echoed = client.post("/v1/completions", json={"prompt": ["a b", [7, 8]], "echo": True, "max_tokens": 1})
    assert [c["text"] for c in echoed.json()["choices"]] == ["a btok0 ", "tok7 tok8tok0 "]
    only = client.post("/v1/completions", json={"prompt": "a b", "echo": True, "max_tokens": 0}).json()
    assert only["choices"][0]["text"] == "a b"


def test_a_streamed_completion_echoes_in_its_first_chunk_with_offsets_running_on(
    client: httpx.Client,
) -> None:
    body = {"model": "alpha", "prompt": "say it", "echo": True, "logprobs": 1, "max_tokens": 3}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    chunks = [c["choices"][0] for c in _chunks(client, "/v1/completions", body)]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert chunks[0]["text"] == "say ittok0 "
    merged: dict[str, list[Any]] = {key: [] for key in whole["logprobs"]}
    for chunk in chunks:
        for key, values in chunk["logprobs"].items():
            merged[key].extend(values)
    assert merged == whole["logprobs"]
    empty = _chunks(client, "/v1/completions", {"prompt": "a b", "echo": True, "max_tokens": 0})
    assert empty[0]["choices"][0]["text"] == "a b"
