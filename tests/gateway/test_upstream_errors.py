"""How an upstream's error answer becomes the gateway's: the client's fault or not, and no internals."""

from __future__ import annotations

import json
import logging

import pytest

from gateway import errors
from gateway.runtime import Runtime


def vllm_error(status: int, message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "BadRequestError", "code": status}}).encode()


def test_a_request_vllm_refuses_is_the_clients_400_with_vllms_message():
    mapped = Runtime.upstream_error(400, vllm_error(400, "max_tokens is too large for this context"))
    assert (mapped.status, mapped.code) == (400, "upstream_rejected")
    assert mapped.detail == "max_tokens is too large for this context"


@pytest.mark.parametrize("status", [401, 403])
def test_vllm_refusing_the_gateways_own_key_is_a_502_and_an_error_for_the_operator(status, caplog):
    with caplog.at_level(logging.ERROR, logger="gateway.runtime"):
        mapped = Runtime.upstream_error(status, vllm_error(status, "Unauthorized"))
    assert isinstance(mapped, errors.UpstreamFailed)
    assert mapped.status == 502
    assert "Unauthorized" not in mapped.detail  # nothing of the upstream's answer reaches the client
    assert "VLLM_API_KEY" in caplog.text


def test_a_model_gone_from_the_upstream_is_the_gateways_404():
    mapped = Runtime.upstream_error(404, vllm_error(404, "The model `m1` does not exist."))
    assert (mapped.status, mapped.code, mapped.param) == (404, "model_not_found", "model")


def test_an_upstream_5xx_is_a_502_without_its_message():
    mapped = Runtime.upstream_error(500, vllm_error(500, "CUDA out of memory at /opt/vllm/worker.py"))
    assert mapped.status == 502
    assert "CUDA" not in mapped.detail


def test_an_upstream_at_capacity_is_a_503_to_retry_without_its_message():
    # it was the client's 400 upstream_rejected, with the upstream's text: final, where it is to be retried
    mapped = Runtime.upstream_error(429, vllm_error(429, "engine queue full on node gpu-7.internal"))
    assert (mapped.status, mapped.code) == (503, "upstream_busy")
    assert mapped.headers["retry-after"] == "1"
    assert "gpu-7" not in mapped.detail


@pytest.mark.parametrize(
    "body",
    [
        b"<html>oops internal at /srv/vllm</html>",
        b'{"id":"x","object":"',  # cut short: a Content-Length shorter than the answer
        b'{"usage":{"prompt_tokens":NaN,"completion_tokens":1}}',  # no client can read NaN
        b"[1]",
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
def test_an_upstream_200_that_is_no_json_object_is_no_answer(body):
    assert Runtime.answer_parse(body) is None


@pytest.mark.parametrize(
    "body",
    [b'{"error": {"message": "internal /opt/vllm/x.py", "type": "x"}}', b'{"object": "error", "error": "x"}'],
)
def test_an_upstream_200_that_is_an_error_object_is_no_answer(body):
    # a router or proxy before vLLM may say an error with a 200: relayed, the client got its internals
    assert Runtime.answer_parse(body) is None


def test_an_upstream_200_that_is_a_json_object_is_its_answer():
    assert Runtime.answer_parse(b'{"usage":{"prompt_tokens":3}}') == {"usage": {"prompt_tokens": 3}}


@pytest.mark.parametrize(
    ("headers", "stream"),
    [
        ([(b"Content-Type", b"text/event-stream; charset=utf-8")], True),  # vLLM's
        ([(b"content-type", b"TEXT/EVENT-STREAM")], True),
        ([(b"content-type", b"application/json")], False),  # an error body, or a whole answer
        ([(b"content-type", b"text/html")], False),
        ([], False),
    ],
)
def test_only_an_answer_labelled_an_event_stream_is_relayed_as_one(headers, stream):
    from gateway.consumers.inference import event_stream

    assert event_stream(headers) is stream
