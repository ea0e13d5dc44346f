"""The fields of streamed chunks follow how vLLM serialises them: chat chunks leave unset fields out (no
`"usage": null`), text completion chunks carry every field (`"usage": null` on each, asked for or not), and
with `stream_options.continuous_usage_stats` every chunk carries the running usage of its own choice."""

from __future__ import annotations

import json

import httpx
import pytest

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
    # vLLM's include_usage defaults to false (vllm#36379): empty options ask for nothing
    for options, usage_chunks in (
        (None, 0),
        ({"include_usage": False}, 0),
        ({}, 0),
        ({"include_usage": 1}, 1),
    ):
        body = chat_body(stream=True, n=2)
        if options is not None:
            body["stream_options"] = options
        _, payloads = stream_post(client, "/v1/chat/completions", body)
        chunks = [json.loads(p) for p in payloads[:-1]]
        assert all(c.get("usage", "absent") is not None for c in chunks), options
        assert sum("usage" in c for c in chunks) == usage_chunks, options


RUNNING = {"include_usage": True, "continuous_usage_stats": True}


def test_continuous_usage_puts_each_chat_choices_running_count_in_every_chunk(client: httpx.Client) -> None:
    body = chat_body("a b c", stream=True, n=2, max_tokens=2, stream_options=RUNNING)
    _, payloads = stream_post(client, "/v1/chat/completions", body)
    *chunks, final = (json.loads(p) for p in payloads[:-1])
    # vLLM counts each choice apart (the role chunks: 0); only the final usage chunk sums them
    running = [(c["choices"][0]["index"], c["usage"]["completion_tokens"]) for c in chunks]
    assert running == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    assert {c["usage"]["prompt_tokens"] for c in chunks} == {3}
    assert all(c["usage"]["total_tokens"] == 3 + c["usage"]["completion_tokens"] for c in chunks)
    assert final["choices"] == []
    assert final["usage"] == {"prompt_tokens": 3, "total_tokens": 7, "completion_tokens": 4}
    # exclude_unset keeps the None completion_tokens_details vLLM sets; prompt_tokens_details is unset
    assert payloads[2].endswith(
        b'"finish_reason":null}],"usage":{"prompt_tokens":3,"total_tokens":4,"completion_tokens":1,'
        b'"completion_tokens_details":null}}'
    )


def test_continuous_usage_in_a_completions_batch_counts_each_prompt_and_choice_apart(
    client: httpx.Client,
) -> None:
    body = {"model": "alpha", "prompt": ["a", "b c"], "n": 2, "stream": True, "max_tokens": 2}
    _, payloads = stream_post(client, "/v1/completions", {**body, "stream_options": RUNNING})
    *chunks, final = (json.loads(p) for p in payloads[:-1])
    usages = {(c["choices"][0]["index"], c["usage"]["completion_tokens"]): c["usage"] for c in chunks}
    assert len(usages) == len(chunks) == 8  # 2 prompts x n=2, 2 tokens each
    assert usages[(1, 2)] == {"prompt_tokens": 1, "total_tokens": 3, "completion_tokens": 2}
    assert usages[(2, 1)] == {"prompt_tokens": 2, "total_tokens": 3, "completion_tokens": 1}
    assert final["usage"] == {"prompt_tokens": 3, "total_tokens": 11, "completion_tokens": 8}


@pytest.mark.parametrize(
    "options", [{"continuous_usage_stats": True}, {"include_usage": False, "continuous_usage_stats": True}]
)
def test_continuous_usage_without_include_usage_gives_no_usage_at_all(client: httpx.Client, options) -> None:
    _, payloads = stream_post(client, "/v1/chat/completions", chat_body(stream=True, stream_options=options))
    assert not any(b'"usage"' in p for p in payloads)
    body = {"model": "alpha", "prompt": "a", "stream": True, "stream_options": options}
    _, payloads = stream_post(client, "/v1/completions", body)
    assert all(json.loads(p)["usage"] is None for p in payloads[:-1])


def test_stream_options_are_booleans_read_as_pydantic_reads_them(client: httpx.Client) -> None:
    options = {"include_usage": "yes", "continuous_usage_stats": 1}
    _, payloads = stream_post(client, "/v1/chat/completions", chat_body(stream=True, stream_options=options))
    assert all(b'"usage"' in p for p in payloads[:-1])
    wrong = chat_body(stream=True, stream_options={"continuous_usage_stats": "sometimes"})
    response = client.post("/v1/chat/completions", json=wrong)
    assert response.status_code == 400
    assert "continuous_usage_stats: Input should be a valid boolean" in response.json()["error"]["message"]


def test_empty_stream_options_without_stream_are_accepted_as_vllm_checks_only_set_ones(
    client: httpx.Client,
) -> None:
    response = client.post("/v1/chat/completions", json=chat_body(stream_options={}))
    assert response.status_code == 200
    assert "usage" in response.json()
