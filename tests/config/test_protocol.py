"""The ``portcullis.body_write`` extension of the served protocol: offered to gateway requests only, it
writes a streamed body part at once, framed as ``send`` frames it, and declines whenever ``send`` would
not write at once (before the headers, after the end, once the client is gone, while paused)."""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

from uvicorn.config import Config
from uvicorn.server import ServerState

from config.protocol import AuditedHttpToolsProtocol


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 8000) if name in ("sockname", "peername") else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.written += b"<eof>"

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _serve(path: str, requests: int = 1) -> tuple[dict[str, Any], bytes]:
    """Serve POSTs to ``path``, one after the other on one connection, with an app that tries the
    extension at every stage of its answer."""
    seen: dict[str, Any] = {}
    served: list[AuditedHttpToolsProtocol] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        write = scope.get("extensions", {}).get("portcullis.body_write", {}).get("write")
        seen["offered"] = write is not None
        seen.setdefault("cycles", []).append(weakref.ref(served[0].cycle))
        if write is None:
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        seen["before the headers"] = write(b"early")
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"x/y")]})
        seen["streaming"] = write(b"hello")
        served[0].pause_writing()  # the client reads slowly
        seen["paused"] = write(b"held")
        served[0].resume_writing()
        seen["resumed"] = write(b"")
        await send({"type": "http.response.body", "body": b"end", "more_body": False})
        seen["after the end"] = write(b"late")

    async def run() -> bytes:
        config = Config(app=app, http="httptools", lifespan="off", access_log=False)
        config.load()
        protocol = AuditedHttpToolsProtocol(config=config, server_state=ServerState(), app_state={})
        served.append(protocol)
        transport = _Transport()
        protocol.connection_made(transport)
        for _ in range(requests):
            protocol.data_received(
                b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}" % path.encode()
            )
            for _ in range(20):
                await asyncio.sleep(0)
        protocol.connection_lost(None)
        return transport.written

    return seen, asyncio.run(run())


def test_a_gateway_request_can_write_its_streamed_body_at_once_framed_as_send_frames_it():
    seen, written = _serve("/v1/chat/completions")
    del seen["cycles"]
    assert seen == {
        "offered": True,
        "before the headers": False,
        "streaming": True,
        "paused": False,
        "resumed": True,
        "after the end": False,
    }
    head, _, body = written.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head
    assert body == b"5\r\nhello\r\n3\r\nend\r\n0\r\n\r\n"  # nothing of early, held or late


def test_other_paths_are_not_offered_the_extension():
    seen, written = _serve("/oauth/token/")
    del seen["cycles"]
    assert seen == {"offered": False}
    assert written.startswith(b"HTTP/1.1 204")


def test_the_extension_leaves_no_reference_cycle_for_the_collector():
    """The cycle holds the scope and the scope the writer: held strongly, a request's cycle would outlive
    its request as garbage only the collector frees (under 1,000 streams the process grew by ~50 MiB in
    25 s). Freed by reference counting, it goes as soon as the connection's next request replaces it."""
    gc.collect()
    gc.disable()
    try:
        seen, _written = _serve("/v1/chat/completions", requests=2)
        first_freed = seen["cycles"][0]() is None
    finally:
        gc.enable()
    assert seen["offered"]
    assert len(seen["cycles"]) == 2
    assert first_freed


def _pipelined(first_body: bytes) -> tuple[AuditedHttpToolsProtocol, list[dict[str, Any]]]:
    """Two gateway POSTs pipelined on one connection, the first still being answered (a stream)."""
    told: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        told.append(scope["extensions"]["portcullis.disconnect"])
        while (await receive())["more_body"]:
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(3600)  # a stream that runs on

    def post(body: bytes) -> bytes:
        return b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (
            len(body),
            body,
        )

    async def run() -> tuple[AuditedHttpToolsProtocol, list[dict[str, Any]]]:
        config = Config(app=app, http="httptools", lifespan="off", access_log=False)
        config.load()
        protocol = AuditedHttpToolsProtocol(config=config, server_state=ServerState(), app_state={})
        protocol.connection_made(_Transport())
        protocol.data_received(post(first_body))
        for _ in range(20):
            await asyncio.sleep(0)
        protocol.data_received(post(b"{}") + post(b"{}"))  # two more, queued behind the first
        for _ in range(20):
            await asyncio.sleep(0)
        paused = protocol.flow.read_paused
        protocol.connection_lost(None)
        for task in list(protocol.tasks):
            task.cancel()
        await asyncio.sleep(0)
        protocol.flow.read_paused = paused  # what it was before the loss, for the caller
        return protocol, told

    return asyncio.run(run())


def test_a_pipelined_request_waiting_behind_a_stream_keeps_reading_paused():
    # Resuming reading once each body is whole lets a client queue requests without bound; uvicorn's pause
    # is the only bound on pipelining.
    protocol, _told = _pipelined(b"{}")
    assert protocol.flow.read_paused
    assert len(protocol.pipeline) == 2


def test_a_lost_connection_reaches_the_running_request_not_only_the_last_one_queued():
    _protocol, told = _pipelined(b"{}")
    assert len(told) == 1  # only the first ran; the queued ones never started
    assert told[0]["lost"] is True


def test_a_lost_connection_marks_every_request_queued_behind_as_disconnected():
    # uvicorn marks its current request alone: a queued one the application then left unanswered (499) was
    # sent a 500 on the closed connection, with an error and a traceback in the log
    protocol, _told = _pipelined(b"{}")
    queued = [cycle for cycle, _app in protocol.pipeline]
    assert len(queued) == 2
    assert all(cycle.disconnected for cycle in queued)


def _fed(reads: list[bytes], monkeypatch: Any) -> tuple[_Transport, list[tuple[str, int]], bool]:
    """Feed one connection these reads, with an app that reads the whole body and answers 204; return
    what was written, what was audited, and whether the connection was closed a moment after."""
    import config.protocol as protocol_module

    monkeypatch.setattr(protocol_module, "DISCARD_S", 0.05)
    audited: list[tuple[str, int]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def run() -> tuple[_Transport, bool]:
        config = Config(app=app, http="httptools", lifespan="off", access_log=False)
        config.load()
        protocol = AuditedHttpToolsProtocol(config=config, server_state=ServerState(), app_state={})
        monkeypatch.setattr(protocol, "_audit", lambda kind, status, _ip: audited.append((kind, status)))
        transport = _Transport()
        protocol.connection_made(transport)
        for data in reads:
            protocol.data_received(data)
            await asyncio.sleep(0)
        closed_at_once = transport.closing
        await asyncio.sleep(0.2)
        protocol.connection_lost(None)
        return transport, closed_at_once

    transport, closed_at_once = asyncio.run(run())
    assert not closed_at_once or not transport.written.startswith(b"HTTP/1.1 431")  # the 431 is let drain
    return transport, audited, transport.closing


def _in_reads(data: bytes, size: int = 1024) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_a_head_over_the_cap_read_a_little_at_a_time_is_a_431_and_then_the_close(monkeypatch):
    head = b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + b"x-pad: " + b"a" * 100_000 + b"\r\n\r\n"
    transport, audited, closed = _fed(_in_reads(head), monkeypatch)
    assert transport.written.startswith(b"HTTP/1.1 431 ")
    assert transport.written.endswith(b"<eof>")  # the writing side ended; the rest of the head dropped
    assert closed
    assert audited == [("http.head_too_large", 431)]


def test_a_head_under_the_cap_is_served_however_it_is_read(monkeypatch):
    head = b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + b"x-pad: " + b"a" * 60_000 + b"\r\n\r\n"
    for reads in (_in_reads(head), [head]):
        transport, audited, _closed = _fed(reads, monkeypatch)
        assert transport.written.startswith(b"HTTP/1.1 204 ")
        assert audited == []


def _chunked(body_chunks: list[bytes], trailers: bytes = b"") -> bytes:
    framed = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in body_chunks)
    return (
        b"POST /x HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
        + framed
        + b"0\r\n"
        + trailers
        + b"\r\n"
    )


def test_a_chunked_bodys_trailers_over_the_cap_end_the_connection_and_are_audited(monkeypatch):
    # httptools holds trailers as it holds headers: the head's cap covers them (they had none)
    trailers = b"x-trailer: " + b"a" * 200_000 + b"\r\n"
    transport, audited, closed = _fed(_in_reads(_chunked([b"{}"], trailers), 4096), monkeypatch)
    assert audited == [("http.head_too_large", 431)]
    assert closed
    assert b"431" not in transport.written  # the request's answer was under way: nothing written into it


def test_a_large_chunked_body_is_not_counted_as_a_head(monkeypatch):
    body = _chunked([b"a" * 8000] * 64 + [b"a" * 300_000] * 3)  # small chunks, and chunks over the cap
    for size in (1024, 8192, 65536):
        transport, audited, _closed = _fed(_in_reads(body, size), monkeypatch)
        assert transport.written.startswith(b"HTTP/1.1 204 "), size
        assert audited == []
