"""The stream relay tells a client that left from an upstream that failed, and charges what was sent."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.http1 import Disconnected
from gateway.streaming import StreamRelay


def _event(text: str) -> bytes:
    return b'data: {"choices":[{"delta":{"content":"%s"}}]}\n\n' % text.encode()


USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}\n\n'


class _Content:
    """Stands in for ``gateway.http1.Response``: hands out its chunks, then b"" (or breaks first)."""

    def __init__(self, chunks: list[bytes], fail_after: int | None = None) -> None:
        self.chunks, self.fail_after = list(chunks), fail_after
        self.handed = 0

    async def chunk(self) -> bytes:
        if self.fail_after is not None and self.handed == self.fail_after:
            raise Disconnected("upstream connection broke")
        self.handed += 1
        return self.chunks.pop(0) if self.chunks else b""


class _Sink:
    def __init__(self, breaks_after: int | None = None) -> None:
        self.sent: list[tuple[bytes, bool]] = []
        self.breaks_after = breaks_after

    async def send_body(self, body: bytes, *, more_body: bool = False) -> None:
        if self.breaks_after is not None and len(self.sent) >= self.breaks_after:
            raise ConnectionResetError("the client's connection was reset")
        self.sent.append((body, more_body))


async def _never_disconnects() -> dict[str, Any]:
    await asyncio.sleep(3600)
    return {"type": "http.disconnect"}


def _relay(sink: _Sink, content: _Content, *, wants_usage: bool = False) -> tuple[str, StreamRelay]:
    relay = StreamRelay(sink, content, wants_usage=wants_usage)  # type: ignore[arg-type]
    return asyncio.run(relay.run(_never_disconnects)), relay


def test_a_completed_stream_is_relayed_and_the_unasked_usage_event_dropped():
    sink = _Sink()
    how, relay = _relay(sink, _Content([_event("a"), _event("b") + USAGE, b"data: [DONE]\n\n"]))
    assert how == "completed"
    body = b"".join(chunk for chunk, _more in sink.sent)
    assert body == _event("a") + _event("b") + b"data: [DONE]\n\n"
    assert (relay.prompt_tokens, relay.completion_tokens) == (7, 3)


def test_a_client_whose_connection_breaks_is_client_gone_not_an_upstream_error():
    sink = _Sink(breaks_after=1)
    how, relay = _relay(sink, _Content([_event("a"), _event("b"), _event("c"), b"data: [DONE]\n\n"]))
    assert how == "client_gone"
    assert sink.sent == [(_event("a"), True)]  # nothing more is attempted, no error event
    assert relay.completion_tokens == 2  # cut short, no usage: what the upstream produced, sent or not


def test_an_upstream_that_breaks_mid_stream_ends_it_with_one_error_event_and_no_done():
    sink = _Sink()
    how, _relay_ = _relay(sink, _Content([_event("a"), _event("b"), b"data: [DONE]\n\n"], fail_after=2))
    assert how == "upstream_error"
    assert sink.sent[:2] == [(_event("a"), True), (_event("b"), True)]
    last, more = sink.sent[-1]
    assert b'"code": "upstream_error"' in last
    assert more is False
    assert all(b"[DONE]" not in chunk for chunk, _more in sink.sent)


@pytest.mark.parametrize("breaks_after", [0, 2])
def test_a_send_failure_is_never_reported_as_the_upstreams(breaks_after):
    sink = _Sink(breaks_after=breaks_after)
    how, relay = _relay(sink, _Content([_event("a"), _event("b"), _event("c")]))
    assert how == "client_gone"
    assert not relay.upstream_error
    assert len(sink.sent) == breaks_after  # and no error event after the failed send
