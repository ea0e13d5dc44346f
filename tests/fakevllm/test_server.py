"""Tests of fakevllm: a real uvicorn server (httptools + uvloop) in a thread, driven over HTTP with httpx.

They check that the fake speaks vLLM's OpenAI API (bodies, SSE framing, error shapes, the /v1-only API-key
rule) and that its test controls work: runtime config, state, reset, refuse mode and abort counting.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import math
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from fakevllm.server import FakeConfig, create_app
from tests.fakevllm.conftest import (
    DEFAULTS,
    ENGINE_ERROR,
    RunningFake,
    chat_body,
    configure,
    sse_payloads,
    state,
    stream_post,
    wait_for,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_health_answers_200_with_an_empty_body(client: httpx.Client) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.content == b""


def test_models_list_has_a_vllm_model_card_for_every_served_name(client: httpx.Client) -> None:
    response = client.get("/v1/models")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    listing = response.json()
    assert listing["object"] == "list"
    assert [card["id"] for card in listing["data"]] == ["alpha", "beta"]
    for card in listing["data"]:
        assert card["object"] == "model"
        assert card["owned_by"] == "vllm"
        assert isinstance(card["created"], int)
        assert card["root"] == card["id"]
        assert card["parent"] is None
        assert card["max_model_len"] == 4096
        assert card["permission"][0]["object"] == "model_permission"


def test_chat_completion_has_vllm_shape_and_usage(client: httpx.Client) -> None:
    response = client.post("/v1/chat/completions", json=chat_body("one two three four"))
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("chatcmpl-")
    assert len(body["id"]) == len("chatcmpl-") + 32
    assert body["object"] == "chat.completion"
    assert body["model"] == "alpha"
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "tok0 tok1 tok2 tok3 tok4 "
    assert choice["message"]["reasoning"] is None
    assert "tool_calls" not in choice["message"]  # vLLM's ChatMessage drops an empty list
    assert choice["finish_reason"] == "stop"
    assert choice["stop_reason"] is None
    assert choice["logprobs"] is None
    assert body["usage"] == {
        "prompt_tokens": 4,
        "total_tokens": 9,
        "completion_tokens": 5,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }


def test_chat_completion_honours_n_and_max_tokens_with_length_finish_reason(client: httpx.Client) -> None:
    body = client.post("/v1/chat/completions", json=chat_body("a b", n=3, max_tokens=2)).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert {c["message"]["content"] for c in body["choices"]} == {"tok0 tok1 "}
    assert {c["finish_reason"] for c in body["choices"]} == {"length"}
    assert body["usage"]["completion_tokens"] == 6
    assert body["usage"]["total_tokens"] == 8


def test_max_completion_tokens_takes_precedence_over_max_tokens(client: httpx.Client) -> None:
    body = client.post("/v1/chat/completions", json=chat_body(max_tokens=4, max_completion_tokens=1)).json()
    assert body["choices"][0]["message"]["content"] == "tok0 "
    assert body["usage"]["completion_tokens"] == 1


def test_max_tokens_at_least_the_configured_tokens_finishes_with_stop(client: httpx.Client) -> None:
    body = client.post("/v1/chat/completions", json=chat_body(max_tokens=50)).json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 5


def test_missing_model_defaults_to_the_first_served_model(client: httpx.Client) -> None:
    body = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}).json()
    assert body["model"] == "alpha"


def test_text_completion_has_vllm_shape_and_one_choice_per_prompt_and_n(client: httpx.Client) -> None:
    response = client.post("/v1/completions", json={"model": "beta", "prompt": ["a b c", "d"], "n": 2})
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("cmpl-")
    assert body["object"] == "text_completion"
    assert body["model"] == "beta"
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert {c["text"] for c in body["choices"]} == {"tok0 tok1 tok2 tok3 tok4 "}
    assert {c["finish_reason"] for c in body["choices"]} == {"stop"}
    assert body["usage"] == {
        "prompt_tokens": 4,
        "total_tokens": 24,
        "completion_tokens": 20,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }


def test_text_completion_defaults_to_16_max_tokens_like_vllm(client: httpx.Client) -> None:
    configure(client, tokens=20)
    body = client.post("/v1/completions", json={"model": "alpha", "prompt": [1, 2, 3]}).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 16
    assert body["usage"]["prompt_tokens"] == 3


def test_embeddings_return_one_deterministic_unit_vector_per_input(client: httpx.Client) -> None:
    request = {"model": "alpha", "input": ["hello world", "bye"]}
    first = client.post("/v1/embeddings", json=request).json()
    second = client.post("/v1/embeddings", json=request).json()
    assert first["id"].startswith("embd-")
    assert first["object"] == "list"
    assert first["model"] == "alpha"
    assert [item["index"] for item in first["data"]] == [0, 1]
    assert {item["object"] for item in first["data"]} == {"embedding"}
    vectors = [item["embedding"] for item in first["data"]]
    assert all(len(v) == 8 for v in vectors)
    assert all(math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, rel_tol=1e-6) for v in vectors)  # float32
    assert vectors[0] != vectors[1]
    assert vectors == [item["embedding"] for item in second["data"]]
    assert first["usage"] == {
        "prompt_tokens": 3,
        "total_tokens": 3,
        "completion_tokens": 0,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,  # vLLM 0.33's UsageInfo, dumped whole
    }


def test_embeddings_base64_encoding_is_little_endian_float32(client: httpx.Client) -> None:
    configure(client, embedding_dim=4)
    floats = client.post("/v1/embeddings", json={"model": "alpha", "input": "x"})
    encoded = client.post(
        "/v1/embeddings", json={"model": "alpha", "input": "x", "encoding_format": "base64"}
    )
    decoded = struct.unpack("<4f", base64.b64decode(encoded.json()["data"][0]["embedding"]))
    listed = floats.json()["data"][0]["embedding"]
    assert struct.unpack("<4f", struct.pack("<4f", *listed)) == decoded  # the same float32s both ways
    # written as orjson writes vLLM's float32 array: the shortest digits that read back as the float32
    # (0.35355338), not a double's seventeen (0.35355339059327373)
    written = re.search(rb'"embedding":\[([^\]]*)\]', floats.content)
    assert written is not None
    for text in written.group(1).split(b","):
        digits = text.lstrip(b"-").replace(b".", b"").lstrip(b"0")
        assert 1 <= len(digits) <= 9, text
        shorter = float(f"{float(text):.{len(digits) - 1}g}") if len(digits) > 1 else None
        assert shorter is None or struct.pack("<f", shorter) != struct.pack("<f", float(text)), text


def test_streaming_chat_sends_role_chunk_then_one_chunk_per_token_then_done(client: httpx.Client) -> None:
    response, payloads = stream_post(client, "/v1/chat/completions", chat_body(stream=True))
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert payloads[-1] == b"[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["id"].startswith("chatcmpl-")
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert all("usage" not in c for c in chunks)
    assert chunks[0]["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    deltas = [c["choices"][0]["delta"]["content"] for c in chunks[1:]]
    assert deltas == ["tok0 ", "tok1 ", "tok2 ", "tok3 ", "tok4 "]
    assert [c["choices"][0]["finish_reason"] for c in chunks[1:]] == [None, None, None, None, "stop"]
    unstreamed = client.post("/v1/chat/completions", json=chat_body()).json()
    assert "".join(deltas) == unstreamed["choices"][0]["message"]["content"]


def test_streaming_with_include_usage_ends_with_usage_chunk_and_done(client: httpx.Client) -> None:
    body = chat_body("a b c", stream=True, stream_options={"include_usage": True}, max_tokens=3)
    _, payloads = stream_post(client, "/v1/chat/completions", body)
    assert payloads[-1] == b"[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    *content_chunks, usage_chunk = chunks
    # vLLM serialises chat chunks with exclude_unset=True: no "usage": null before the usage chunk
    assert all("usage" not in c for c in content_chunks)
    assert content_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage_chunk["choices"] == []
    assert usage_chunk["object"] == "chat.completion.chunk"
    assert usage_chunk["id"] == content_chunks[0]["id"]
    assert usage_chunk["usage"] == {"prompt_tokens": 3, "total_tokens": 6, "completion_tokens": 3}


def test_streaming_with_n_interleaves_choices_per_token(client: httpx.Client) -> None:
    _, payloads = stream_post(client, "/v1/chat/completions", chat_body(stream=True, n=2, max_tokens=2))
    chunks = [json.loads(p) for p in payloads[:-1]]
    indexes = [c["choices"][0]["index"] for c in chunks]
    assert indexes == [0, 1, 0, 1, 0, 1]
    assert [c["choices"][0]["delta"] for c in chunks[2:4]] == [{"content": "tok0 "}] * 2


def test_streaming_text_completion_sends_text_chunks_then_done(client: httpx.Client) -> None:
    body = {"model": "alpha", "prompt": "hi", "stream": True, "max_tokens": 2}
    _, payloads = stream_post(client, "/v1/completions", body)
    assert payloads[-1] == b"[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert chunks[0]["id"].startswith("cmpl-")
    assert [c["choices"][0]["text"] for c in chunks] == ["tok0 ", "tok1 "]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, "length"]


def test_stream_options_without_stream_is_rejected(client: httpx.Client) -> None:
    response = client.post("/v1/chat/completions", json=chat_body(stream_options={"include_usage": True}))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == 400


def test_fail_after_chunks_ends_stream_with_error_frame_then_done_like_vllm(client: httpx.Client) -> None:
    configure(client, fail_after_chunks=2)
    response, payloads = stream_post(client, "/v1/chat/completions", chat_body(stream=True))
    assert response.status_code == 200
    assert payloads[-1] == b"[DONE]"
    assert json.loads(payloads[-2]) == ENGINE_ERROR
    contents = [json.loads(p)["choices"][0]["delta"].get("content") for p in payloads[1:-2]]
    assert contents == ["tok0 ", "tok1 "]


def test_failing_text_completion_stream_also_sends_done_after_the_error_frame(client: httpx.Client) -> None:
    configure(client, fail_after_chunks=0)
    _, payloads = stream_post(client, "/v1/completions", {"model": "alpha", "prompt": "x", "stream": True})
    assert [json.loads(p) for p in payloads[:-1]] == [ENGINE_ERROR]
    assert payloads[-1] == b"[DONE]"


def test_fail_without_done_variant_ends_with_the_error_frame(client: httpx.Client) -> None:
    configure(client, fail_after_chunks=1, fail_sends_done=False)
    _, payloads = stream_post(client, "/v1/completions", {"model": "alpha", "prompt": "x", "stream": True})
    assert b"[DONE]" not in payloads
    assert json.loads(payloads[-1]) == ENGINE_ERROR
    assert [json.loads(p)["choices"][0]["text"] for p in payloads[:-1]] == ["tok0 "]


def test_api_key_guards_v1_routes_with_vllms_exact_401(client: httpx.Client) -> None:
    configure(client, api_key="sekrit")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic sekrit"}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/nope")):
            response = client.request(method, path, json=chat_body(), headers=headers)
            assert response.status_code == 401, (method, path, headers)
            assert response.content == b'{"error":"Unauthorized"}'
    for scheme in ("Bearer", "bearer"):
        response = client.post(
            "/v1/chat/completions", json=chat_body(), headers={"Authorization": f"{scheme} sekrit"}
        )
        assert response.status_code == 200


def test_api_key_leaves_invocations_tokenize_and_admin_routes_open_like_vllm(client: httpx.Client) -> None:
    configure(client, api_key="sekrit")
    invocation = client.post("/invocations", json=chat_body())
    assert invocation.status_code == 200
    assert invocation.json()["object"] == "chat.completion"
    tokenized = client.post("/tokenize", json={"model": "alpha", "prompt": "three little words"})
    assert tokenized.status_code == 200
    assert tokenized.json()["count"] == 3
    assert len(tokenized.json()["tokens"]) == 3
    assert tokenized.json()["max_model_len"] == 4096
    for path in ("/health", "/metrics", "/version", "/ping", "/load", "/is_sleeping"):
        assert client.get(path).status_code == 200, path
    for path in ("/pause", "/resume", "/sleep", "/wake_up", "/collective_rpc", "/reset_prefix_cache"):
        assert client.post(path, json={}).status_code == 200, path
    assert client.post("/detokenize", json={"tokens": [1, 2]}).json() == {"prompt": "tok1 tok2"}


def test_invocations_dispatch_on_the_body_like_vllm(client: httpx.Client) -> None:
    assert client.post("/invocations", json=chat_body()).json()["object"] == "chat.completion"
    completion = client.post("/invocations", json={"model": "alpha", "prompt": "x"}).json()
    assert completion["object"] == "text_completion"
    embedding = client.post("/invocations", json={"model": "alpha", "input": "x"}).json()
    assert embedding["data"][0]["object"] == "embedding"


def test_admin_routes_answer_empty_object_and_are_counted(client: httpx.Client) -> None:
    for path in ("/pause", "/update_weights", "/scale_elastic_ep", "/pause"):
        response = client.post(path, json={})
        assert response.status_code == 200
        assert response.json() == {}
    by_path = state(client)["requests_by_path"]
    assert by_path["/pause"] == 2
    assert by_path["/update_weights"] == 1
    assert by_path["/scale_elastic_ep"] == 1


def test_unknown_model_is_a_404_not_found_error_in_vllms_shape(client: httpx.Client) -> None:
    expected = {
        "error": {
            "message": "The model `nope` does not exist.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }
    for path, body in (
        ("/v1/chat/completions", {**chat_body(), "model": "nope"}),
        ("/v1/completions", {"model": "nope", "prompt": "x"}),
        ("/v1/embeddings", {"model": "nope", "input": "x"}),
    ):
        response = client.post(path, json=body)
        assert response.status_code == 404, path
        assert response.json() == expected


def test_invalid_json_is_a_400_bad_request(client: httpx.Client) -> None:
    response = client.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == 400
    assert error["type"] == "Bad Request"
    assert "JSON decode error" in error["message"]


def test_missing_messages_and_bad_n_are_400s(client: httpx.Client) -> None:
    assert client.post("/v1/chat/completions", json={"model": "alpha"}).status_code == 400
    response = client.post("/v1/chat/completions", json=chat_body(n=0))
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "n"


def test_max_tokens_beyond_the_context_window_is_rejected_like_vllm(client: httpx.Client) -> None:
    response = client.post("/v1/chat/completions", json=chat_body("a b", max_tokens=5000))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "BadRequestError"
    assert error["param"] == "max_tokens"
    assert error["message"].startswith("'max_tokens' or 'max_completion_tokens' is too large: 5000.")


def test_unknown_path_is_404_and_wrong_method_is_405(client: httpx.Client) -> None:
    missing = client.get("/v2/whatever")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == 404
    wrong = client.get("/v1/chat/completions")
    assert wrong.status_code == 405
    assert wrong.json()["error"]["code"] == 405


def test_client_disconnect_mid_stream_is_counted_as_aborted_within_one_second(fake: RunningFake) -> None:
    with httpx.Client(base_url=fake.url, timeout=10) as control:
        configure(control, tokens=50, chunk_delay_s=2.0)
        control.post("/_fake/reset")
        with httpx.Client(base_url=fake.url, timeout=10) as streamer:
            with streamer.stream("POST", "/v1/chat/completions", json=chat_body(stream=True)) as response:
                chunks = response.iter_raw()  # keep a reference: dropping the iterator closes the connection
                received = b""
                while received.count(b"\n\n") < 2:
                    received += next(chunks)
                assert state(control)["running"] == 1
                time.sleep(0.3)
                assert state(control)["running"] == 1
        closed_at = time.monotonic()
        assert wait_for(lambda: state(control)["aborted"] == 1, timeout=1.0)
        assert time.monotonic() - closed_at < 1.0
        after = state(control)
        assert after["running"] == 0
        assert after["finished"] == 0


def test_client_disconnect_during_non_streaming_delay_is_counted_as_aborted(fake: RunningFake) -> None:
    with httpx.Client(base_url=fake.url, timeout=10) as control:
        configure(control, first_chunk_delay_s=3.0)
        control.post("/_fake/reset")
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{fake.url}/v1/chat/completions", json=chat_body(), timeout=httpx.Timeout(5, read=0.3)
            )
        assert wait_for(lambda: state(control)["aborted"] == 1, timeout=1.0)
        assert state(control)["finished"] == 0


def test_first_chunk_delay_delays_the_first_token_but_not_the_headers(client: httpx.Client) -> None:
    configure(client, first_chunk_delay_s=0.4)
    started = time.monotonic()
    with client.stream("POST", "/v1/chat/completions", json=chat_body(stream=True)) as response:
        headers_after = time.monotonic() - started
        chunks = response.iter_raw()
        first = next(chunks)
        first_after = time.monotonic() - started
        rest = b"".join(chunks)
    assert first.startswith(b"data: ")
    assert sse_payloads(first + rest)[-1] == b"[DONE]"
    assert headers_after < 0.3
    assert first_after >= 0.4


def test_chunk_delay_spaces_the_token_chunks(client: httpx.Client) -> None:
    configure(client, tokens=4, chunk_delay_s=0.15)
    started = time.monotonic()
    _, payloads = stream_post(client, "/v1/completions", {"model": "alpha", "prompt": "x", "stream": True})
    assert len(payloads) == 5
    assert time.monotonic() - started >= 0.45


def test_fake_config_changes_behaviour_at_runtime_and_rejects_bad_values(client: httpx.Client) -> None:
    assert configure(client, tokens=2)["tokens"] == 2
    body = client.post("/v1/chat/completions", json=chat_body()).json()
    assert body["choices"][0]["message"]["content"] == "tok0 tok1 "
    bad_updates: list[dict[str, Any]] = [
        {"tokens": -1},
        {"tokens": "3"},
        {"refuse": "yes"},
        {"no_such_field": 1},
        {"models": []},
    ]
    for bad in bad_updates:
        response = client.post("/_fake/config", json=bad)
        assert response.status_code == 400, bad
    assert client.get("/_fake/config").json() == {**DEFAULTS, "tokens": 2}


def test_fake_config_can_change_the_served_models(client: httpx.Client) -> None:
    configure(client, models=["gamma"])
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["gamma"]
    assert client.post("/v1/chat/completions", json=chat_body()).status_code == 404


def test_fake_state_records_paths_headers_and_bodies_of_recent_requests(client: httpx.Client) -> None:
    request = chat_body("remember me")
    client.post("/v1/chat/completions", json=request, headers={"X-Trace": "abc", "Authorization": "Bearer t"})
    client.get("/health")
    current = state(client)
    assert current["requests_total"] == 2
    assert current["requests_by_path"] == {"/v1/chat/completions": 1, "/health": 1}
    assert current["finished"] == 2
    assert current["running"] == 0
    assert current["last_headers"][0]["x-trace"] == "abc"
    assert current["last_headers"][0]["authorization"] == "Bearer t"
    assert current["last_bodies"] == [request]
    for _ in range(60):
        client.get("/health")
    assert len(state(client)["last_headers"]) == 50


def test_fake_reset_clears_counters_and_history(client: httpx.Client) -> None:
    client.post("/v1/chat/completions", json=chat_body())
    assert client.post("/_fake/reset").status_code == 200
    current = state(client)
    assert current["requests_total"] == 0
    assert current["requests_by_path"] == {}
    assert current["finished"] == 0
    assert current["last_headers"] == []
    assert current["last_bodies"] == []


def test_refuse_mode_closes_the_connection_without_a_response(
    client: httpx.Client, fake: RunningFake
) -> None:
    configure(client, refuse=True)
    # Closed with no response: a clean close, or a reset when the close found request bytes unread.
    closed = (httpx.RemoteProtocolError, httpx.ReadError)
    with pytest.raises(closed):
        httpx.post(f"{fake.url}/v1/chat/completions", json=chat_body(), timeout=5)
    with pytest.raises(closed):
        httpx.get(f"{fake.url}/health", timeout=5)
    current = state(client)
    assert current["refused"] == 2
    assert current["requests_by_path"] == {"/v1/chat/completions": 1, "/health": 1}
    configure(client, refuse=False)
    assert client.post("/v1/chat/completions", json=chat_body()).status_code == 200


def test_metrics_expose_vllm_series_and_fakevllm_counters(client: httpx.Client) -> None:
    client.post("/v1/chat/completions", json=chat_body("a b c"))
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    lines = response.text.splitlines()
    assert 'vllm:num_requests_running{model_name="alpha"} 0.0' in lines
    assert 'vllm:prompt_tokens_total{model_name="alpha"} 3.0' in lines
    assert 'vllm:generation_tokens_total{model_name="alpha"} 5.0' in lines
    assert 'fakevllm_requests_total{path="/v1/chat/completions"} 1.0' in lines
    assert 'fakevllm_requests_total{path="/metrics"} 1.0' in lines
    assert "fakevllm_requests_running 1.0" in lines
    assert "fakevllm_requests_aborted_total 0.0" in lines
    assert "fakevllm_requests_finished_total 1.0" in lines
    assert "# TYPE fakevllm_requests_total counter" in lines


def test_vllm_running_gauge_counts_a_stream_in_flight(fake: RunningFake, client: httpx.Client) -> None:
    configure(client, tokens=20, chunk_delay_s=0.5)
    with httpx.Client(base_url=fake.url, timeout=10) as streamer:
        with streamer.stream("POST", "/v1/chat/completions", json=chat_body(stream=True)) as response:
            chunks = response.iter_raw()  # keep a reference: dropping the iterator closes the connection
            next(chunks)
            metrics = client.get("/metrics").text.splitlines()
    assert 'vllm:num_requests_running{model_name="alpha"} 1.0' in metrics
    assert 'vllm:num_requests_running{model_name="beta"} 0.0' in metrics


def test_app_is_a_plain_asgi_callable_usable_without_a_server() -> None:
    app = create_app(FakeConfig(models=["m"], tokens=1))
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        return {"type": "http.request", "body": b'{"prompt": "x"}', "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 200
    assert json.loads(sent[1]["body"])["choices"][0]["text"] == "tok0 "
    assert app.stats.finished == 1


def test_fake_config_rejects_invalid_values() -> None:
    with pytest.raises(ValueError, match="models"):
        FakeConfig(models=[])
    with pytest.raises(ValueError, match="tokens"):
        FakeConfig(tokens=True)
    with pytest.raises(ValueError, match="chunk_delay_s"):
        FakeConfig(chunk_delay_s=-1)
    assert FakeConfig(first_chunk_delay_s=1).first_chunk_delay_s == 1.0


def test_server_module_imports_without_django() -> None:
    code = "import sys, fakevllm.server; assert 'django' not in sys.modules, 'django was imported'"
    result = subprocess.run(  # noqa: S603 - our own interpreter and a fixed snippet
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_management_command_parses_options_into_a_fake_config() -> None:
    from fakevllm.management.commands.fakevllm import Command
    from fakevllm.server import config_from_options

    parser = Command().create_parser("manage.py", "fakevllm")
    argv = ["--models", "a, b", "--api-key", "k", "--chunk-delay-ms", "250", "--fail-after-chunks", "3"]
    options = vars(parser.parse_args(argv))
    assert (options["host"], options["port"]) == ("127.0.0.1", 8001)
    config = config_from_options(options)
    assert config == FakeConfig(
        models=["a", "b"], api_key="k", tokens=16, chunk_delay_s=0.25, fail_after_chunks=3, embedding_dim=8
    )


def test_the_fidelity_switches_default_to_vllms_behaviour_and_parse_into_the_config() -> None:
    from fakevllm.management.commands.fakevllm import Command
    from fakevllm.server import config_from_options

    parser = Command().create_parser("manage.py", "fakevllm")
    default = config_from_options(vars(parser.parse_args([])))
    assert (default.fail_sends_done, default.engine_dead, default.enable_request_id_headers) == (
        True,
        False,
        False,
    )
    argv = ["--fail-without-done", "--engine-dead", "--enable-request-id-headers"]
    switched = config_from_options(vars(parser.parse_args(argv)))
    assert (switched.fail_sends_done, switched.engine_dead, switched.enable_request_id_headers) == (
        False,
        True,
        True,
    )


def test_the_api_key_comes_from_vllm_api_key_as_vllm_reads_it_unless_given(monkeypatch) -> None:
    from fakevllm.management.commands.fakevllm import Command
    from fakevllm.server import config_from_options

    parser = Command().create_parser("manage.py", "fakevllm")
    monkeypatch.setenv("VLLM_API_KEY", "from-the-environment")
    assert config_from_options(vars(parser.parse_args([]))).api_key == "from-the-environment"
    assert config_from_options(vars(parser.parse_args(["--api-key", "k"]))).api_key == "k"
    monkeypatch.delenv("VLLM_API_KEY")
    assert config_from_options(vars(parser.parse_args([]))).api_key is None


def test_module_entry_point_serves_with_uvicorn_until_terminated() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "fakevllm", "--port", str(port), "--models", "solo", "--tokens", "2"]
    process = subprocess.Popen(  # noqa: S603 - our own interpreter and fixed arguments
        command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_for(lambda: _healthy(url), timeout=15), "python -m fakevllm did not come up"
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["solo"]
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=15)
    assert b"Traceback" not in stderr, stderr.decode()


def _healthy(url: str) -> bool:
    """Tell whether GET /health answers 200."""
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
def test_a_cache_salt_is_checked_as_vllm_0_33_checks_it(client: httpx.Client, path: str) -> None:
    body: dict[str, Any] = {"model": "alpha"}
    if "chat" in path:
        body["messages"] = [{"role": "user", "content": "hi"}]
    elif "embeddings" in path:
        body["input"] = "hi"
    else:
        body["prompt"] = "hi"
    for good in ("a1b2", None, "x" * 128):
        assert client.post(path, json={**body, "cache_salt": good}).status_code == 200, good
    empty = "Parameter 'cache_salt' must be a non-empty string if provided. (parameter=cache_salt)"
    shape = (
        "Parameter 'cache_salt' must be at most 128 characters and must not contain '@', '/', '\\\\', "
        "or NUL. (parameter=cache_salt)"
    )
    cases = [("", empty), (7, empty), ("x" * 129, shape), ("a/b", shape), ("a@b", shape), ("a\\b", shape)]
    cases.append(("a\x00b", shape))
    for bad, message in cases:
        answer = client.post(path, json={**body, "cache_salt": bad})
        assert answer.status_code == 400, bad
        assert answer.json()["error"] == {
            "message": message,
            "type": "BadRequestError",
            "param": "cache_salt",
            "code": 400,
        }
    # a model validator that runs before the fields are checked: it speaks first
    answer = client.post(path, json={"cache_salt": "", "max_tokens": "many"})
    assert answer.json()["error"]["message"] == empty
    if "embeddings" not in path:  # but after the stream options' own, defined after it (pydantic: last first)
        answer = client.post(path, json={**body, "stream_options": {"include_usage": True}, "cache_salt": ""})
        assert answer.json()["error"]["param"] == "stream_options"


def test_a_configured_api_key_is_never_logged_only_said_to_be_required(
    client: httpx.Client, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn
    from django.core.management import call_command

    from fakevllm import server

    secret = "sekrit-key-4f1a"
    with caplog.at_level(logging.INFO, logger="fakevllm"):
        configure(client, api_key=secret, tokens=3)  # logged by the server's thread, in this process
        configure(client, api_key=None)
        monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: None)
        server.serve(FakeConfig(api_key=secret), "127.0.0.1", 8001)
    assert secret not in caplog.text
    assert "'api_key': '<required>', 'tokens': 3" in caplog.text
    assert "'api_key': None" in caplog.text
    assert (
        "fakevllm: serving fake-model on http://127.0.0.1:8001 (an API key is required on /v1)" in caplog.text
    )
    assert secret not in repr(FakeConfig(api_key=secret))
    printed = io.StringIO()
    monkeypatch.setattr(server, "serve", lambda *args: None)
    call_command("fakevllm", "--api-key", secret, stdout=printed)
    assert printed.getvalue() == (
        "fakevllm: serving fake-model on http://127.0.0.1:8001 (an API key is required on /v1)\n"
    )
    printed = io.StringIO()
    call_command("fakevllm", stdout=printed)
    assert printed.getvalue().endswith("(no API key)\n")
