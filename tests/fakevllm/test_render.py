"""The fields of streamed chunks follow how vLLM serialises them: chat chunks leave unset fields out (no
`"usage": null`), text completion chunks carry every field (`"usage": null` on each, asked for or not)."""

from __future__ import annotations

import json

import httpx

from tests.fakevllm.conftest import chat_body, stream_post


def test_text_completion_chunks_carry_usage_null_with_or_without_include_usage(client: httpx.Client) -> None:
    plain = {"model": "alpha", "prompt": ["a", "b c"], "stream": True, "max_tokens": 2}
    _, payloads = stream_post(client, "/v1/completions", plain)
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert len(chunks) == 4
    assert all(c["usage"] is None for c in chunks)
    _, payloads = stream_post(client, "/v1/completions", {**plain, "stream_options": {"include_usage": True}})
    *content, usage = (json.loads(p) for p in payloads[:-1])
    assert all(c["usage"] is None for c in content)
    assert usage == {
        "id": content[0]["id"],
        "object": "text_completion",
        "created": content[0]["created"],
        "model": "alpha",
        "choices": [],
        "usage": {"prompt_tokens": 3, "total_tokens": 7, "completion_tokens": 4},
    }


def test_chat_chunks_never_carry_usage_null(client: httpx.Client) -> None:
    for options, usage_chunks in ((None, 0), ({"include_usage": False}, 0), ({}, 1)):
        body = chat_body(stream=True, n=2)
        if options is not None:
            body["stream_options"] = options
        _, payloads = stream_post(client, "/v1/chat/completions", body)
        chunks = [json.loads(p) for p in payloads[:-1]]
        assert all(c.get("usage", "absent") is not None for c in chunks), options
        assert sum("usage" in c for c in chunks) == usage_chunks, options
