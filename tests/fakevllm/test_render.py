"""The bodies and chunks are vLLM 0.33's, byte for byte: its models' field order, every field of a
non-streamed answer (`model_dump`), the set ones of a streamed chunk (`exclude_unset`, chat and text
completion alike: no `"usage": null`), no None in a usage chunk, and the server's `system_fingerprint`; with
`stream_options.continuous_usage_stats` every chunk carries the running usage of its own choice."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from tests.fakevllm.conftest import chat_body, configure, stream_post

FINGERPRINT = re.compile(rb'"system_fingerprint":"vllm-0\.0\.0\+fakevllm-[0-9a-f]{8}"')
CHAT_HEAD = b'{"id":"chatcmpl-r1","object":"chat.completion.chunk","created":0,"model":"alpha","choices":['
TEXT_HEAD = b'{"id":"cmpl-r1","object":"text_completion","created":0,"model":"alpha","choices":['
RUNNING = {"include_usage": True, "continuous_usage_stats": True}


def _pinned(payloads: list[bytes]) -> list[bytes]:
    """Return bodies or frame payloads with their clock and fingerprint (checked apart) made constant."""
    return [
        FINGERPRINT.sub(b'"system_fingerprint":"FP"', re.sub(rb'"created":\d+', b'"created":0', p))
        for p in payloads
    ]


def test_a_chat_answer_has_vllm_033s_fields_with_reasoning_and_without_empty_tool_calls(
    client: httpx.Client,
) -> None:
    response = client.post("/v1/chat/completions", json=chat_body("a b c", max_tokens=1, request_id="r1"))
    assert _pinned([response.content]) == [
        b'{"id":"chatcmpl-r1","object":"chat.completion","created":0,"model":"alpha","choices":[{"index":0,'
        b'"message":{"role":"assistant","content":"tok0 ","refusal":null,"annotations":null,"audio":null,'
        b'"function_call":null,"reasoning":null},"logprobs":null,"finish_reason":"length","stop_reason":null,'
        b'"token_ids":null,"routed_experts":null,"weight_versions":null}],"service_tier":null,'
        b'"system_fingerprint":"FP","usage":{"prompt_tokens":3,"total_tokens":4,"completion_tokens":1,'
        b'"prompt_tokens_details":null,"completion_tokens_details":null},"prompt_logprobs":null,'
        b'"prompt_token_ids":null,"prompt_text":null,"kv_transfer_params":null,"ec_transfer_params":null,'
        b'"metrics":null}'
    ]


def test_a_text_completion_answer_has_vllm_033s_fields(client: httpx.Client) -> None:
    body = {"model": "alpha", "prompt": "a b", "max_tokens": 1, "request_id": "r1"}
    response = client.post("/v1/completions", json=body)
    assert _pinned([response.content]) == [
        b'{"id":"cmpl-r1","object":"text_completion","created":0,"model":"alpha","choices":[{"index":0,'
        b'"text":"tok0 ","logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":null,'
        b'"prompt_logprobs":null,"prompt_token_ids":null,"routed_experts":null,"weight_versions":null}],'
        b'"service_tier":null,"system_fingerprint":"FP","usage":{"prompt_tokens":2,"total_tokens":3,'
        b'"completion_tokens":1,"prompt_tokens_details":null,"completion_tokens_details":null},'
        b'"kv_transfer_params":null,"ec_transfer_params":null,"metrics":null}'
    ]


def test_a_chat_stream_has_vllm_033s_chunks_field_for_field(client: httpx.Client) -> None:
    """The role chunk names the prompt's token ids and text (null), every other chunk the KV transfer
    parameters; a choice names its token ids, on its last chunk its weight versions, and that chunk the
    system fingerprint when no usage chunk follows; a delta has only its content (reasoning comes only from
    a reasoning parser)."""
    body = chat_body("a b c", stream=True, max_tokens=2, request_id="r1")
    _, payloads = stream_post(client, "/v1/chat/completions", body)
    assert _pinned(payloads) == [
        CHAT_HEAD + b'{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
        b'"finish_reason":null}],"prompt_token_ids":null,"prompt_text":null}',
        CHAT_HEAD + b'{"index":0,"delta":{"content":"tok0 "},"logprobs":null,"finish_reason":null,'
        b'"token_ids":null}],"kv_transfer_params":null}',
        CHAT_HEAD + b'{"index":0,"delta":{"content":"tok1 "},"logprobs":null,"finish_reason":"length",'
        b'"stop_reason":null,"token_ids":null,"weight_versions":null}],"system_fingerprint":"FP",'
        b'"kv_transfer_params":null}',
        b"[DONE]",
    ]


def test_a_chat_stream_with_running_usage_puts_it_before_the_prompt_fields_and_ends_with_the_fingerprint(
    client: httpx.Client,
) -> None:
    body = chat_body("a b c", stream=True, max_tokens=1, request_id="r1", stream_options=RUNNING)
    _, payloads = stream_post(client, "/v1/chat/completions", body)
    assert _pinned(payloads) == [
        CHAT_HEAD + b'{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
        b'"finish_reason":null}],"usage":{"prompt_tokens":3,"total_tokens":3,"completion_tokens":0,'
        b'"completion_tokens_details":null},"prompt_token_ids":null,"prompt_text":null}',
        CHAT_HEAD + b'{"index":0,"delta":{"content":"tok0 "},"logprobs":null,"finish_reason":"length",'
        b'"stop_reason":null,"token_ids":null,"weight_versions":null}],"usage":{"prompt_tokens":3,'
        b'"total_tokens":4,"completion_tokens":1,"completion_tokens_details":null},"kv_transfer_params":null}',
        CHAT_HEAD + b'],"usage":{"prompt_tokens":3,"total_tokens":4,"completion_tokens":1},'
        b'"system_fingerprint":"FP"}',
        b"[DONE]",
    ]


def test_a_text_completion_stream_has_vllm_033s_chunks_field_for_field(client: httpx.Client) -> None:
    body = {"model": "alpha", "prompt": "a b", "stream": True, "max_tokens": 2, "request_id": "r1"}
    choice = (
        b'"logprobs":null,"finish_reason":%s,"stop_reason":null,"prompt_token_ids":null,"token_ids":null,'
    )
    first = TEXT_HEAD + b'{"index":0,"text":"tok0 ",' + choice % b"null" + b'"weight_versions":null}],'
    last = TEXT_HEAD + b'{"index":0,"text":"tok1 ",' + choice % b'"length"' + b'"weight_versions":null}],'
    _, payloads = stream_post(client, "/v1/completions", body)
    assert _pinned(payloads) == [
        first + b'"kv_transfer_params":null}',
        last + b'"system_fingerprint":"FP","kv_transfer_params":null}',
        b"[DONE]",
    ]
    _, payloads = stream_post(client, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert _pinned(payloads) == [
        first + b'"kv_transfer_params":null}',
        last + b'"kv_transfer_params":null}',
        TEXT_HEAD + b'],"usage":{"prompt_tokens":2,"total_tokens":4,"completion_tokens":2},'
        b'"system_fingerprint":"FP"}',
        b"[DONE]",
    ]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_the_fingerprint_rides_each_choices_last_chunk_unless_a_usage_chunk_follows_to_carry_it(
    client: httpx.Client, path: str
) -> None:
    body = chat_body(stream=True, n=2) if "chat" in path else {"prompt": "x", "stream": True, "n": 2}
    _, payloads = stream_post(client, path, body)
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks if "system_fingerprint" in c] == ["stop"] * 2
    _, payloads = stream_post(client, path, {**body, "stream_options": {"include_usage": True}})
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert [c["choices"] for c in chunks if "system_fingerprint" in c] == [[]]


def test_every_answer_carries_the_fingerprint_of_the_servers_version_and_models(client: httpx.Client) -> None:
    version = client.get("/version").json()["version"]
    chat = client.post("/v1/chat/completions", json=chat_body()).json()["system_fingerprint"]
    assert re.fullmatch(rf"vllm-{re.escape(version)}-[0-9a-f]{{8}}", chat)
    assert (
        client.post("/v1/completions", json={"model": "beta", "prompt": "x"}).json()["system_fingerprint"]
        == chat
    )
    configure(client, models=["gamma"])
    other = client.post("/v1/chat/completions", json={**chat_body(), "model": "gamma"}).json()
    assert other["system_fingerprint"].startswith(f"vllm-{version}-")
    assert other["system_fingerprint"] != chat  # vLLM's hashes its engine configuration, the model with it


def test_a_chat_choice_that_ends_without_output_sends_an_empty_delta(client: httpx.Client) -> None:
    configure(client, tokens=0)
    _, payloads = stream_post(client, "/v1/chat/completions", chat_body(stream=True, n=2))
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks] == [{"role": "assistant", "content": ""}] * 2 + [{}] * 2
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "stop", "stop"]
    _, payloads = stream_post(client, "/v1/completions", {"prompt": "x", "stream": True})
    assert [json.loads(p)["choices"][0]["text"] for p in payloads[:-1]] == [""]  # a text choice keeps its ""


def test_a_failed_generation_is_a_compact_event_in_a_chat_stream_and_a_spaced_one_in_a_text_stream(
    client: httpx.Client,
) -> None:
    configure(client, fail_after_chunks=1)
    _, payloads = stream_post(client, "/v1/chat/completions", chat_body(stream=True))
    assert payloads[-2:] == [
        b'{"error":{"message":"Internal server error","type":"InternalServerError","param":null,"code":500}}',
        b"[DONE]",
    ]
    _, payloads = stream_post(client, "/v1/completions", {"prompt": "x", "stream": True})
    assert payloads[-2:] == [
        b'{"error": {"message": "Internal server error", "type": "InternalServerError", "param": null, '
        b'"code": 500}}',
        b"[DONE]",
    ]


def test_text_completion_chunks_never_carry_usage_null_with_or_without_include_usage(
    client: httpx.Client,
) -> None:
    plain = {"model": "alpha", "prompt": ["a", "b c"], "stream": True, "max_tokens": 2}
    _, payloads = stream_post(client, "/v1/completions", plain)
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert len(chunks) == 4
    assert all("usage" not in c for c in chunks)  # vllm#40537: exclude_unset, as for chat chunks
    _, payloads = stream_post(client, "/v1/completions", {**plain, "stream_options": {"include_usage": True}})
    *content, usage = (json.loads(p) for p in payloads[:-1])
    assert all("usage" not in c for c in content)
    assert usage == {
        "id": content[0]["id"],
        "object": "text_completion",
        "created": content[0]["created"],
        "model": "alpha",
        "choices": [],
        "usage": {"prompt_tokens": 3, "total_tokens": 7, "completion_tokens": 4},
        "system_fingerprint": usage["system_fingerprint"],
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
        b'"token_ids":null}],"usage":{"prompt_tokens":3,"total_tokens":4,"completion_tokens":1,'
        b'"completion_tokens_details":null},"kv_transfer_params":null}'
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
    assert not any(b'"usage"' in p for p in payloads)


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
