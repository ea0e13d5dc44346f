"""The stream relay tells a client that left from an upstream that failed, and charges what was sent; with
vLLM's running usage in every chunk it still charges the final usage."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from fakevllm.config import FakeConfig
from fakevllm.generation import plan
from fakevllm.render import stream_frames
from gateway.http1 import Disconnected
from gateway.runtime import Runtime
from gateway.streaming import UPSTREAM_FAILED, StreamRelay, usage_counts
from gateway.validation import Validated, request_validate


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


class _Live:
    """Stands in for a ``Response`` being read: ``feed`` is one read from the upstream, which goes to
    ``on_data`` when that takes it and to ``chunk()`` otherwise; ``end`` is the body's end."""

    def __init__(self) -> None:
        self.on_data: Any = None
        self._parts: list[bytes] = []
        self._ended = False
        self._arrived = asyncio.Event()

    def take(self) -> bytes:
        data, self._parts = b"".join(self._parts), []
        return data

    def feed(self, data: bytes) -> None:
        """As ``gateway.http1.connection.Connection.data_received`` does: a taker that raises is dropped,
        and the reader woken."""
        self._parts.append(data)
        if self.on_data is not None:
            try:
                if self.on_data(self):
                    return
            except Exception:
                self.on_data = None
        self._arrived.set()

    def end(self) -> None:
        self._ended = True
        self._arrived.set()

    async def chunk(self) -> bytes:
        while not self._parts:
            if self._ended:
                return b""
            self._arrived.clear()
            await self._arrived.wait()
        return self.take()


class _Connection:
    """The client's side: ``write_now`` as the server's extension offers it, and ``send_body``."""

    def __init__(self) -> None:
        self.out: list[tuple[str, bytes]] = []  # how each part went: "now" or "send"
        self.paused = False
        self.send_gate: asyncio.Event | None = None  # when set up, a send waits for it

    def write_now(self, body: bytes) -> bool:
        if self.paused:
            return False
        if body:
            self.out.append(("now", body))
        return True

    async def send_body(self, body: bytes, *, more_body: bool = False) -> None:
        if self.send_gate is not None:
            await self.send_gate.wait()
        self.out.append(("send", body))


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def _started(
    write_now: Callable[[bytes], bool] | None = None,
) -> tuple[_Live, _Connection, StreamRelay, asyncio.Task[str]]:
    """A relay running with ``write_now`` (the client's own by default), its first event (a) sent the
    usual way: it arrived before the relay's first step."""
    live, client = _Live(), _Connection()
    write_now = write_now or client.write_now
    relay = StreamRelay(client, live, wants_usage=False, write_now=write_now)  # type: ignore[arg-type]
    running = asyncio.create_task(relay.run(_never_disconnects))
    live.feed(_event("a"))
    await _settle()
    return live, client, relay, running


def test_events_that_arrive_while_the_relay_runs_are_written_in_the_read_that_brought_them():
    async def test() -> tuple[str, list[tuple[str, bytes]]]:
        live, client, relay, running = await _started()
        live.feed(_event("b"))  # written in the feed itself, before any other task runs
        live.feed(_event("c") + USAGE)
        written_at_once = list(client.out)
        live.feed(b"data: [DONE]\n\n")
        live.end()
        how = await running
        assert written_at_once[1:] == [("now", _event("b")), ("now", _event("c"))]
        assert (relay.written_now, relay.sent) == (3, 1)  # b, c and [DONE] at once; a by the task
        return how, client.out

    how, out = asyncio.run(test())
    assert how == "completed"
    assert out == [
        ("send", _event("a")),
        ("now", _event("b")),
        ("now", _event("c")),  # the usage event the client did not ask for is dropped here too
        ("now", b"data: [DONE]\n\n"),
        ("send", b""),  # the end goes through send
    ]


def test_the_first_event_too_is_written_in_its_read_when_the_relay_is_waiting_for_it():
    async def test() -> tuple[list[tuple[str, bytes]], str, list[tuple[str, bytes]]]:
        live, client = _Live(), _Connection()
        relay = StreamRelay(client, live, wants_usage=False, write_now=client.write_now)  # type: ignore[arg-type]
        running = asyncio.create_task(relay.run(_never_disconnects))
        await _settle()  # the headers are out and the relay waits for the upstream's first event
        live.feed(_event("a"))
        written_at_once = list(client.out)
        live.feed(b"data: [DONE]\n\n")
        live.end()
        return written_at_once, await running, client.out

    written_at_once, how, out = asyncio.run(test())
    assert written_at_once == [("now", _event("a"))]  # no task switch before the first token either
    assert how == "completed"
    assert out == [("now", _event("a")), ("now", b"data: [DONE]\n\n"), ("send", b"")]


@pytest.mark.parametrize("last", [b"", b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n'])
def test_a_stream_that_ends_without_done_ends_with_an_error_event_and_is_no_completed_stream(last):
    # an upstream gone with a FIN on an answer its close frames, or a chunked one ended between events:
    # it was relayed as a whole stream and recorded as completed
    async def test() -> tuple[str, list[tuple[str, bytes]]]:
        live, client, _relay, running = await _started()
        live.feed(_event("b") + last)
        live.end()
        return await running, client.out

    how, out = asyncio.run(test())
    assert how == "upstream_error"
    body = b"".join(body for _how, body in out)
    assert body.startswith(_event("a") + _event("b") + last)
    assert b'"type": "api_error"' in body.removeprefix(_event("a") + _event("b") + last)
    assert b"[DONE]" not in body


def test_a_paused_client_gets_its_events_through_send_in_order_and_no_write_overtakes_a_send():
    async def test() -> list[tuple[str, bytes]]:
        live, client, relay, running = await _started()
        client.paused = True  # the client reads slowly: its connection is paused
        client.send_gate = asyncio.Event()
        live.feed(_event("b"))  # declined: the task sends it, and waits in that send
        await _settle()
        client.paused = False
        live.feed(_event("c"))  # writable again, but a send is in progress: it must not overtake b
        client.send_gate.set()
        await _settle()
        live.feed(_event("d"))
        live.feed(b"data: [DONE]\n\n")
        live.end()
        await running
        assert relay.sent == 3  # a, b while paused, and c behind b's send
        return client.out

    out = asyncio.run(test())
    events = _event("a") + _event("b") + _event("c") + _event("d") + b"data: [DONE]\n\n"
    assert b"".join(body for _how, body in out) == events
    assert ("send", _event("b")) in out
    assert ("now", _event("d")) in out


def test_once_cut_a_stream_writes_nothing_more_at_once():
    async def test() -> tuple[str, list[tuple[str, bytes]]]:
        live, client, relay, running = await _started()
        relay.revoked()
        live.feed(_event("b"))
        how = await running
        return how, client.out

    how, out = asyncio.run(test())
    assert how == "revoked"
    assert out[0] == ("send", _event("a"))
    assert all(_event("b") not in body for _how, body in out)
    assert b'"code": "token_revoked"' in out[-1][1]


def test_a_write_now_that_fails_is_dropped_for_good_and_the_stream_completes_through_send():
    calls: list[bytes] = []

    def broken(body: bytes) -> bool:
        calls.append(body)
        raise AttributeError("a renamed attribute of the server")

    async def test() -> tuple[str, list[tuple[str, bytes]]]:
        live, client, _relay, running = await _started(broken)
        for text in "bcd":
            live.feed(_event(text))
            await _settle()
        live.feed(b"data: [DONE]\n\n")
        live.end()
        return await running, client.out

    how, out = asyncio.run(test())
    assert how == "completed"
    assert b"".join(body for _how, body in out) == b"".join(_event(t) for t in "abcd") + b"data: [DONE]\n\n"
    assert len(calls) == 1  # tried once, not once a read


def test_a_stream_cut_short_charges_tool_call_and_reasoning_events_too():
    tool_call = (
        b'data: {"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\\"a"}}]}}]}\n\n'
    )
    reasoning = b'data: {"choices":[{"delta":{"reasoning_content":"hmm"}}]}\n\n'
    sink = _Sink(breaks_after=3)  # the client's connection breaks before the fourth event
    how, relay = _relay(sink, _Content([reasoning, reasoning, tool_call, tool_call, _event("a") + USAGE]))
    assert how == "client_gone"
    assert relay.usage_seen is False
    assert relay.completion_tokens == 4  # what vLLM produced, sent or not; the caller charges the prompt


async def _receive_never_called() -> dict[str, Any]:
    raise AssertionError("with the server's extension nothing listens on receive")


def test_with_the_servers_disconnect_extension_a_lost_connection_cuts_the_stream_without_a_listener():
    async def test() -> tuple[str, list[tuple[str, bytes]], dict[str, Any], int]:
        live, client = _Live(), _Connection()
        relay = StreamRelay(client, live, wants_usage=False, write_now=client.write_now)  # type: ignore[arg-type]
        told: dict[str, Any] = {"lost": False, "on_lost": None}
        tasks_before = len(asyncio.all_tasks())
        running = asyncio.create_task(relay.run(_receive_never_called, told))
        live.feed(_event("a"))
        await _settle()
        tasks_during = len(asyncio.all_tasks()) - tasks_before  # the relay's own task, and no listener
        told["lost"] = True
        told["on_lost"]()  # as the protocol's connection_lost does
        live.feed(_event("b"))
        return await running, client.out, told, tasks_during

    how, out, told, tasks_during = asyncio.run(test())
    assert how == "client_gone"
    assert out == [("send", _event("a"))]
    assert told["on_lost"] is None  # nothing is called back once the relay is over
    assert tasks_during == 1


def test_a_connection_lost_before_the_relay_began_relays_nothing_and_leaves_no_cancellation_behind():
    async def test() -> tuple[str, list[tuple[str, bytes]], str]:
        live, client = _Live(), _Connection()
        relay = StreamRelay(client, live, wants_usage=False, write_now=client.write_now)  # type: ignore[arg-type]
        live.feed(_event("a"))
        how = await relay.run(_receive_never_called, {"lost": True, "on_lost": None})
        await asyncio.sleep(0)  # the request's task goes on (records its usage) uncancelled
        return how, client.out, "still running"

    how, out, after = asyncio.run(test())
    assert (how, out, after) == ("client_gone", [], "still running")


def test_the_upstreams_error_event_is_replaced_by_the_gateways_own_and_nothing_after_it_is_relayed():
    vllm_error = (
        b'data: {"error": {"message": "CUDA error: an illegal memory access at /opt/vllm/worker.py:812", '
        b'"type": "InternalServerError", "param": null, "code": 500}}\n\n'
    )
    sink = _Sink()
    how, relay = _relay(sink, _Content([_event("a"), vllm_error + vllm_error, b"data: [DONE]\n\n"]))
    assert how == "upstream_error"
    relayed = b"".join(body for body, _more in sink.sent)
    assert b"CUDA" not in relayed
    assert b"worker.py" not in relayed
    assert relayed.count(b'"code": "upstream_error"') == 1
    assert b"[DONE]" not in relayed
    assert relay.upstream_error_type == "InternalServerError"


@pytest.mark.parametrize(
    "event",
    [
        b'data: {"error": "text"}\n\n',
        b'data: {"error"\n\n',
        b'data: {"error": {}}\n\n',
        # another writer's spacing, or an event named "error": relayed as they were, CUDA text and all
        b'data:{"error":{"message":"CUDA OOM on gpu-7.internal"}}\n\n',
        b'data:{"object":"error","message":"CUDA OOM on gpu-7.internal"}\n\n',
        b'event: error\ndata: {"message":"CUDA OOM on gpu-7.internal"}\n\n',
    ],
)
def test_an_upstream_error_event_of_any_shape_ends_the_stream_the_same_way(event):
    sink = _Sink()
    how, relay = _relay(sink, _Content([_event("a"), event]))
    assert how == "upstream_error"
    relayed = b"".join(body for body, _more in sink.sent)
    assert relayed.endswith(UPSTREAM_FAILED)
    assert b"gpu-7" not in relayed
    assert relay.upstream_error_type == ""


def test_an_older_vllms_flat_error_event_is_replaced_too_and_nothing_after_any_error_is_relayed():
    flat = b'data: {"object": "error", "message": "/opt/vllm/x.py failed", "type": "InternalServerError"}\n\n'
    sink = _Sink()
    how, relay = _relay(sink, _Content([_event("a"), flat, _event("b"), b"data: [DONE]\n\n"]))
    relayed = b"".join(body for body, _more in sink.sent)
    assert how == "upstream_error"
    assert relayed == _event("a") + UPSTREAM_FAILED
    assert relay.upstream_error_type == "InternalServerError"


def test_an_upstream_that_breaks_after_its_own_error_event_gives_the_client_one_error_event():
    sink = _Sink()
    error = b'data: {"error": {"message": "x", "type": "InternalServerError"}}\n\n'
    how, _relay_ = _relay(sink, _Content([_event("a"), error], fail_after=2))
    relayed = b"".join(body for body, _more in sink.sent)
    assert how == "upstream_error"
    assert relayed.count(b"upstream_error") == 1


# --- usage in every chunk (stream_options.continuous_usage_stats) -----------------------------------------

RUNNING = {"include_usage": True, "continuous_usage_stats": True}


def _through_fakevllm(kind: str, body: dict[str, Any]) -> tuple[Validated, list[bytes]]:
    """Validate a client's body as the gateway does, and return the events fakevllm answers what goes
    upstream with (3 tokens a choice unless max_tokens says fewer)."""
    checked = request_validate(kind, json.dumps(body).encode(), max_tokens_cap=None)
    fake_kind = "chat" if kind == "chat" else "completion"
    generation = plan(fake_kind, checked.payload, FakeConfig(models=["m1"], tokens=3), {"m1": '"m1"'})
    return checked, [frame for frame in stream_frames(generation) if isinstance(frame, bytes)]


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "stream": True, **fields}


def test_a_client_asking_running_usage_gets_every_chunk_as_vllm_sent_it_and_is_charged_the_final_usage(
    monkeypatch: pytest.MonkeyPatch,
):
    read: list[bytes] = []
    read_usage = StreamRelay._read_usage

    def reading(relay: StreamRelay, event: bytes) -> bool:
        read.append(event)
        return read_usage(relay, event)

    monkeypatch.setattr(StreamRelay, "_read_usage", reading)
    checked, frames = _through_fakevllm("chat", _chat(n=2, stream_options=RUNNING))
    assert all(b'"usage":{' in frame for frame in frames[:-1])  # fakevllm gave running counts
    sink = _Sink()
    how, relay = _relay(sink, _Content(frames), wants_usage=checked.wants_usage)
    assert how == "completed"
    assert b"".join(body for body, _more in sink.sent) == b"".join(frames)
    # the final usage (2 choices x 3 tokens), not the last chunk's running count (one choice's 3)
    assert (relay.prompt_tokens, relay.completion_tokens) == (1, 6)
    assert read == [frames[-2]]  # the running counts are relayed unread: only the final usage is parsed


def test_running_usage_asked_without_include_usage_is_not_asked_upstream_and_the_client_gets_no_usage():
    checked, frames = _through_fakevllm("chat", _chat(stream_options={"continuous_usage_stats": True}))
    sink = _Sink()
    how, relay = _relay(sink, _Content(frames), wants_usage=checked.wants_usage)
    assert how == "completed"
    # as from vLLM: no usage at all without include_usage
    assert b'"usage"' not in b"".join(body for body, _more in sink.sent)
    assert (relay.prompt_tokens, relay.completion_tokens) == (1, 3)  # still charged vLLM's final usage


def test_a_batch_with_running_usage_cut_short_is_charged_its_events_not_one_choices_running_count():
    body = {"model": "m1", "prompt": ["a", "b c"], "n": 2, "stream": True, "max_tokens": 2}
    checked, frames = _through_fakevllm("completions", {**body, "stream_options": RUNNING})
    sink = _Sink(breaks_after=6)  # the client leaves at the 7th of 8 chunks: 2 prompts x n=2 x 2 tokens
    how, relay = _relay(sink, _Content(frames), wants_usage=checked.wants_usage)
    assert how == "client_gone"
    # that chunk said 2 tokens (its choice's) of 2 prompt tokens (its prompt's); the batch made 7 by then
    assert relay.usage_seen is False  # so the caller charges the prompts, estimated as reserved
    assert relay.completion_tokens == 7


def _vllm_chat_chunk(choice: bytes, tail: bytes = b',"kv_transfer_params":null') -> bytes:
    head = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m1","choices":['
    return head + choice + b"]" + tail + b"}\n\n"


def test_the_null_fields_of_current_vllm_chunks_are_not_counted_as_tokens():
    """vLLM 0.33 sets token_ids, prompt_token_ids, prompt_text and kv_transfer_params to null unless asked,
    a reasoning parser's delta may say "reasoning": null, and a choice that ends without output sends {}."""
    events = [
        _vllm_chat_chunk(
            b'{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}',
            b',"prompt_token_ids":null,"prompt_text":null',
        ),
        _vllm_chat_chunk(
            b'{"index":0,"delta":{"reasoning":"hm"},"logprobs":null,"finish_reason":null,"token_ids":null}'
        ),
        _vllm_chat_chunk(
            b'{"index":0,"delta":{"content":"a","reasoning":null},"logprobs":null,"finish_reason":null,'
            b'"token_ids":null}'
        ),
        _vllm_chat_chunk(
            b'{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop","stop_reason":null,'
            b'"token_ids":null,"weight_versions":null}'
        ),
        b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m1","choices":[],'
        b'"usage":{"prompt_tokens":4,"total_tokens":6,"completion_tokens":2}}\n\n',
        b"data: [DONE]\n\n",
    ]
    how, relay = _relay(_Sink(breaks_after=3), _Content(events))
    assert how == "client_gone"
    assert relay.completion_tokens == 3  # the role chunk, the reasoning and the content: not the empty finish
    sink = _Sink()
    how, relay = _relay(sink, _Content(events))
    assert (how, relay.prompt_tokens, relay.completion_tokens) == ("completed", 4, 2)
    assert b"".join(body for body, _more in sink.sent) == b"".join(events[:4] + events[5:])


def _running_usage(done: int, details: bytes) -> bytes:
    return (
        b',"usage":{"prompt_tokens":4,"total_tokens":%d,"completion_tokens":%d,"completion_tokens_details":%s}'
        % (4 + done, done, details.replace(b"N", b"%d" % done))
    )


def _reasoning_stream(details: bytes) -> list[bytes]:
    return [
        _vllm_chat_chunk(
            b'{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}',
            _running_usage(0, details) + b',"prompt_token_ids":null,"prompt_text":null',
        ),
        _vllm_chat_chunk(
            b'{"index":0,"delta":{"reasoning":"hm"},"logprobs":null,"finish_reason":null,"token_ids":null}',
            _running_usage(1, details) + b',"kv_transfer_params":null',
        ),
        _vllm_chat_chunk(
            b'{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop","stop_reason":null,'
            b'"token_ids":null,"weight_versions":null}',
            _running_usage(1, details) + b',"kv_transfer_params":null',
        ),
        b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m1","choices":[],'
        b'"usage":{"prompt_tokens":4,"total_tokens":5,"completion_tokens":1}}\n\n',
        b"data: [DONE]\n\n",
    ]


@pytest.mark.parametrize("details", [b"null", b'{"reasoning_tokens":N}'])  # without, with --reasoning-parser
def test_an_empty_delta_is_not_a_token_though_vllm_counts_reasoning_tokens_in_its_running_usage(details):
    # vLLM 0.33 started with a reasoning parser puts completion_tokens_details.reasoning_tokens in every
    # running-usage chunk: the "reasoning" needle must not take it for a token of reasoning
    how, relay = _relay(_Sink(breaks_after=2), _Content(_reasoning_stream(details)))
    assert how == "client_gone"
    assert relay.completion_tokens == 2  # the role chunk and the reasoning; not the empty finish


@pytest.mark.parametrize(
    ("answer", "counts"),
    [
        (b'{"usage":{"prompt_tokens":7,"completion_tokens":5}}', (7, 5)),
        (b'{"usage":{"prompt_tokens":1e400,"completion_tokens":3}}', (0, 3)),  # int(inf) raised OverflowError
        # past 64 bits the daily quota's INCRBY failed (and was retried for ever), past 31 the record was lost
        (b'{"usage":{"prompt_tokens":100000000000000000000,"completion_tokens":1e300}}', (2**31 - 1,) * 2),
        (b'{"usage":{"prompt_tokens":"7","completion_tokens":-4}}', (0, 0)),  # int("x") raised ValueError
        (b'{"usage":{"prompt_tokens":NaN,"completion_tokens":true}}', (0, 0)),
        (b'{"usage":null}', (0, 0)),
        (b"[1]", (0, 0)),
        (b"not json", (0, 0)),
    ],
)
def test_an_upstreams_odd_usage_counts_nothing_rather_than_failing_the_request(answer, counts):
    parsed = Runtime.answer_parse(answer)  # the whole-answer path: no JSON object, or no usage, is no count
    assert ((usage_counts(parsed.get("usage")) if parsed is not None else None) or (0, 0)) == counts
    relay = StreamRelay.__new__(StreamRelay)
    relay.usage_seen = False
    if relay._read_usage(b"data: " + answer):  # a usage object: read, its odd counts as nothing
        assert (relay.prompt_tokens, relay.completion_tokens) == counts
    else:
        assert not relay.usage_seen


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_a_stream_split_into_reads_of_any_size_is_relayed_event_for_event(size):
    whole = _event("a") + _event("b") + USAGE + b"data: [DONE]\n\n"
    sink = _Sink()
    how, relay = _relay(sink, _Content([whole[i : i + size] for i in range(0, len(whole), size)]))
    assert how == "completed"
    assert b"".join(body for body, _more in sink.sent) == _event("a") + _event("b") + b"data: [DONE]\n\n"
    assert (relay.prompt_tokens, relay.completion_tokens) == (7, 3)


def test_an_event_with_no_end_in_sight_is_an_upstream_failure_not_held_without_bound(monkeypatch):
    # held whole and joined again at every read, a 25 MB event cost memory without bound and the event
    # loop the square of its size
    import gateway.streaming

    monkeypatch.setattr(gateway.streaming, "EVENT_MAX_BYTES", 1000)
    sink = _Sink()
    endless = [_event("a"), b'data: {"choices":[{"delta":{"content":"'] + [b"x" * 100] * 20 + [b'"}}]}\n\n']
    how, relay = _relay(sink, _Content([*endless, _event("b"), b"data: [DONE]\n\n"]))
    assert how == "upstream_error"
    assert relay.upstream_error_type == "event too large"
    relayed = b"".join(body for body, _more in sink.sent)
    assert relayed == _event("a") + UPSTREAM_FAILED  # nothing of it, nor after it


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_a_crlf_framed_stream_is_relayed_event_for_event_however_its_reads_split_it(size):
    # unsplit, such a stream was held whole until its end (or EVENT_MAX_BYTES), and its usage was not read
    lf = _event("a") + _event("b") + USAGE + b"data: [DONE]\n\n"
    crlf = lf.replace(b"\n", b"\r\n")
    sink = _Sink()
    how, relay = _relay(sink, _Content([crlf[i : i + size] for i in range(0, len(crlf), size)]))
    assert how == "completed"
    relayed = [body for body, more in sink.sent if more]
    assert b"".join(relayed) == _event("a") + _event("b") + b"data: [DONE]\n\n"
    if size == 1000:  # one read: its events go together, as an LF stream's do
        assert relayed == [_event("a") + _event("b") + b"data: [DONE]\n\n"]
    else:  # no event waited for the stream's end
        assert len(relayed) >= 3
    assert (relay.prompt_tokens, relay.completion_tokens) == (7, 3)


def test_nothing_after_done_is_relayed_or_counted_and_of_two_usage_events_the_larger_counts_are_charged():
    sink = _Sink()
    more_usage = b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":9}}\n\n'
    after = _event("late") + b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n'
    how, relay = _relay(
        sink, _Content([_event("a"), USAGE + more_usage, b"data: [DONE]\n\n" + after, _event("tail")])
    )
    assert how == "completed"
    assert b"".join(body for body, _more in sink.sent) == _event("a") + b"data: [DONE]\n\n"
    assert (relay.prompt_tokens, relay.completion_tokens) == (7, 9)
    assert relay.content_events == 1

    cut = _Sink()  # cut short after [DONE] with no usage: the late events are not charged either
    how, relay = _relay(cut, _Content([_event("a"), b"data:[DONE]\n\n", _event("b"), _event("c")]))
    assert how == "completed"
    assert relay.completion_tokens == 1
    assert b"".join(body for body, _more in cut.sent) == _event("a") + b"data:[DONE]\n\n"
