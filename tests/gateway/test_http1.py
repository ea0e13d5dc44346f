"""The upstream HTTP client against scripted servers: framing, keep-alive, timeouts, the pool's bound,
back pressure, and every way a connection can break."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from gateway.http1 import (
    DOCUMENT_MAX_BYTES,
    HIGH_WATER,
    ConnectFailed,
    Disconnected,
    HttpClient,
    PoolTimeout,
    ProtocolError,
    ReadTimeout,
    request_head,
    url_split,
)
from tests.conftest import self_signed_certificate

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


class Server:
    """A scripted upstream on a free port: counts connections and keeps the requests it read."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed_by_client = asyncio.Event()

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.base = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def request(self, reader: asyncio.StreamReader) -> bytes:
        """Read one request (head and content-length body); b"" when the client closed instead."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            self.closed_by_client.set()
            return b""
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        return request


def run(test: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(test(), 20))


def answering(*answers: bytes, then_close: bool = False) -> Callable[[Server], Handler]:
    """A handler that answers each request on a connection with the next answer."""

    def make(server: Server) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            for answer in answers:
                if not await server.request(reader):
                    return
                writer.write(answer)
                await writer.drain()
            if not then_close:
                await server.request(reader)

        return handler

    return make


async def serving(make: Callable[[Server], Handler]) -> Server:
    server = Server(lambda r, w: asyncio.sleep(0))
    server.handler = make(server)
    return await server.__aenter__()


def test_keep_alive_reuses_one_connection_and_sends_host_and_length():
    async def test() -> tuple[Server, list[tuple[int, bytes]]]:
        server = await serving(answering(OK, OK, OK))
        client = HttpClient()
        got = []
        for _ in range(3):
            response = await client.request("POST", f"{server.base}/v1/x?a=1", [("x-one", "1")], b"abc")
            got.append((response.status, await response.read()))
            response.release()
        await client.close()
        await server.__aexit__()
        return server, got

    server, got = run(test)
    assert got == [(200, b"{}")] * 3
    assert server.connections == 1
    port = server.base.rsplit(":", 1)[1]
    assert server.requests[0] == (
        b"POST /v1/x?a=1 HTTP/1.1\r\nhost: 127.0.0.1:%s\r\nx-one: 1\r\ncontent-length: 3\r\n\r\nabc"
        % port.encode()
    )


def test_a_chunked_body_is_handed_over_as_each_chunk_arrives():
    release = asyncio.Event

    async def test() -> list[bytes]:
        gate = release()

        def make(server: Server) -> Handler:
            async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await server.request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
                await writer.drain()
                await gate.wait()  # the second chunk waits until the client has read the first
                writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
                await writer.drain()
                await server.request(reader)

            return handler

        server = await serving(make)
        client = HttpClient()
        response = await client.request("POST", f"{server.base}/s", (), b"{}")
        first = await response.chunk()
        gate.set()
        rest = [await response.chunk(), await response.chunk()]
        eof = response.is_eof()
        response.release()
        await client.close()
        await server.__aexit__()
        return [first, *rest, b"eof" if eof else b""]

    assert run(test) == [b"first", b"second", b"", b"eof"]


def test_a_body_without_length_runs_until_the_close_and_its_connection_is_not_reused():
    async def test() -> tuple[bytes, bytes, int]:
        server = await serving(answering(b"HTTP/1.1 200 OK\r\n\r\nuntil the end", then_close=True))
        client = HttpClient()
        first = await client.request("GET", f"{server.base}/a")
        body = await first.read()
        first.release()
        second = await client.request("GET", f"{server.base}/a")
        again = await second.read()
        second.release()
        await client.close()
        await server.__aexit__()
        return body, again, server.connections

    assert run(test) == (b"until the end", b"until the end", 2)


def test_connection_close_from_the_upstream_is_honoured():
    closing = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"

    async def test() -> int:
        server = await serving(answering(closing, closing))
        client = HttpClient()
        for _ in range(2):
            response = await client.request("GET", f"{server.base}/")
            assert await response.read() == b"ok"
            response.release()
        await client.close()
        await server.__aexit__()
        return server.connections

    assert run(test) == 2


def test_a_connection_the_upstream_closed_while_idle_is_not_reused():
    async def test() -> tuple[int, int]:
        server = await serving(answering(OK, then_close=True))
        client = HttpClient()
        response = await client.request("GET", f"{server.base}/")
        await response.read()
        response.release()
        await asyncio.sleep(0.1)  # the upstream's close arrives while the connection is idle
        response = await client.request("GET", f"{server.base}/")
        status = response.status
        response.release()
        await client.close()
        await server.__aexit__()
        return status, server.connections

    assert run(test) == (200, 2)


def test_a_keep_alive_connection_idle_too_long_is_closed_not_reused():
    async def test() -> tuple[int, bool]:
        server = await serving(answering(OK, OK))
        client = HttpClient(keepalive_s=0.05)
        for _ in range(2):
            response = await client.request("GET", f"{server.base}/")
            await response.read()
            response.release()
            await asyncio.sleep(0.1)
        await asyncio.wait_for(server.closed_by_client.wait(), 5)  # the expired one was closed by us
        await client.close()
        await server.__aexit__()
        return server.connections, server.closed_by_client.is_set()

    assert run(test) == (2, True)


def test_an_upstream_that_never_answers_times_out_and_so_does_one_silent_mid_body():
    async def test() -> tuple[str, str]:
        def make(server: Server) -> Handler:
            async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                request = await server.request(reader)
                if b"/body" in request:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf")
                await asyncio.sleep(30)

            return handler

        server = await serving(make)
        client = HttpClient(read_timeout_s=0.2)
        outcomes = []
        try:
            await client.request("GET", f"{server.base}/head")
        except ReadTimeout:
            outcomes.append("head timed out")
        response = await client.request("GET", f"{server.base}/body")
        try:
            await response.read()
        except ReadTimeout:
            outcomes.append("body timed out")
        response.close()
        await client.close()
        await server.__aexit__()
        return outcomes[0], outcomes[1]

    assert run(test) == ("head timed out", "body timed out")


def test_a_refused_connection_and_a_garbled_answer_are_told_apart():
    async def test() -> tuple[type[Exception], type[Exception]]:
        server = await serving(answering(b"SMTP ready\r\n\r\n"))
        port = server.base.rsplit(":", 1)[1]
        await server.__aexit__()
        await asyncio.sleep(0.05)
        client = HttpClient()
        errors = []
        for base in (f"http://127.0.0.1:{port}", None):
            try:
                if base is None:
                    garbled = await serving(answering(b"SMTP ready\r\n\r\n"))
                    base = garbled.base
                await client.request("GET", f"{base}/")
            except Exception as exc:  # noqa: BLE001
                errors.append(type(exc))
        await client.close()
        await garbled.__aexit__()
        return errors[0], errors[1]

    assert run(test) == (ConnectFailed, ProtocolError)


async def answer_error(answer: bytes) -> type[Exception] | None:
    """GET from a server that sends ``answer`` and read it whole: the error that raised, if any."""
    server = await serving(answering(answer))
    client = HttpClient()
    error = None
    try:
        response = await client.request("GET", f"{server.base}/")
        await response.read()
    except Exception as exc:  # noqa: BLE001
        error = type(exc)
    await client.close()
    await server.__aexit__()
    return error


def test_a_switching_protocols_answer_nothing_asked_for_is_a_protocol_error():
    # httptools raises HttpParserUpgrade, which is no HttpParserError: it escaped to asyncio's transport
    switching = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
    assert run(lambda: answer_error(switching)) is ProtocolError


def test_an_answer_whose_headers_run_past_64_kib_is_a_protocol_error():
    # kept whole, 320 MB of header lines had the gateway hold 636 MB for good
    def lines(count: int) -> bytes:
        return b"".join(b"x-filler-%d: %s\r\n" % (i, b"v" * 100) for i in range(count))

    huge = b"HTTP/1.1 200 OK\r\n" + lines(1000) + b"content-length: 2\r\n\r\n{}"
    small = b"HTTP/1.1 200 OK\r\n" + lines(70) + b"content-length: 2\r\n\r\n{}"
    assert run(lambda: answer_error(huge)) is ProtocolError
    assert run(lambda: answer_error(small)) is None


async def body_error(make: Callable[[Server], Handler]) -> type[Exception] | None:
    """GET from a server that ``make`` scripts and read the body: the error reading it raised, if any."""
    server = await serving(make)
    client = HttpClient()
    response = await client.request("GET", f"{server.base}/")
    error = None
    try:
        await response.read()
    except Disconnected as exc:
        error = type(exc)
    response.close()
    await client.close()
    await server.__aexit__()
    return error


def test_an_upstream_closing_mid_body_is_a_disconnect_not_a_short_body():
    cut = answering(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort", then_close=True)
    assert run(lambda: body_error(cut)) is Disconnected


def test_the_pool_bound_makes_a_request_wait_then_fail_busy_and_a_released_connection_serves_it():
    async def test() -> tuple[bool, int, int]:
        server = await serving(answering(OK, OK))
        client = HttpClient(max_connections=1, pool_wait_s=0.2)
        held = await client.request("GET", f"{server.base}/")
        busy = False
        try:
            await client.request("GET", f"{server.base}/")
        except PoolTimeout:
            busy = True
        waiting = asyncio.create_task(client.request("GET", f"{server.base}/"))
        await asyncio.sleep(0.05)
        await held.read()
        held.release()  # hands its connection to the waiting request
        second = await waiting
        status = second.status
        second.release()
        await client.close()
        await server.__aexit__()
        return busy, status, server.connections

    assert run(test) == (True, 200, 1)


def test_a_response_cut_short_closes_its_connection():
    async def test() -> bool:
        def make(server: Server) -> Handler:
            async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await server.request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\none\r\n")
                await writer.drain()
                await server.request(reader)  # returns when the client closes

            return handler

        server = await serving(make)
        client = HttpClient()
        response = await client.request("POST", f"{server.base}/", (), b"{}")
        assert await response.chunk() == b"one"
        response.release()  # not read to its end: closed, never pooled
        await asyncio.wait_for(server.closed_by_client.wait(), 5)
        await client.close()
        await server.__aexit__()
        return server.closed_by_client.is_set()

    assert run(test)


def test_reading_pauses_while_a_slow_consumer_holds_more_than_the_high_water_mark():
    size = 4 * 1024 * 1024

    async def test() -> tuple[int, bool, int]:
        sent = asyncio.Event()

        def make(server: Server) -> Handler:
            async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await server.request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
                writer.write(b"x" * size)
                await writer.drain()
                sent.set()
                await server.request(reader)

            return handler

        server = await serving(make)
        client = HttpClient()
        response = await client.request("GET", f"{server.base}/")
        await asyncio.sleep(0.3)  # the consumer is slow: nothing is read yet
        buffered = response._buffered
        drained_early = sent.is_set()
        body = await response.read()
        response.release()
        await client.close()
        await server.__aexit__()
        return buffered, drained_early, len(body)

    buffered, drained_early, length = run(test)
    assert buffered < HIGH_WATER + 512 * 1024  # bounded by the mark plus what one read brings
    assert not drained_early  # the upstream was held back, not buffered in full
    assert length == size


def test_https_checks_the_certificate_and_works_with_a_trusted_one(tmp_path):
    cert, key = self_signed_certificate(tmp_path, "localhost")
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))

    async def test() -> tuple[type[Exception] | None, int]:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(OK)
                await writer.drain()
            except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_tls)
        url = f"https://localhost:{server.sockets[0].getsockname()[1]}/"
        untrusted = None
        try:
            await HttpClient().request("GET", url)
        except ConnectFailed as exc:
            untrusted = type(exc)
        client = HttpClient(tls=trusting)
        response = await client.request("GET", url)
        status = response.status
        response.release()
        await client.close()
        server.close()
        return untrusted, status

    assert run(test) == (ConnectFailed, 200)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("user-agent", "a\r\nx-injected: 1"),
        ("user-agent", "a\nb"),
        ("user-agent", "a\x00b"),
        ("user-agent", "ends with\r"),
        ("x-a\r\nx-injected", "1"),
    ],
)
def test_a_header_with_a_line_break_or_nul_is_refused(name, value):
    origin, target = url_split("http://upstream:8000/v1/chat/completions")
    with pytest.raises(ValueError, match="line break"):
        request_head("POST", target, origin, [(name, value)], b"{}")


def test_the_host_header_leaves_out_a_default_port_and_brackets_an_ipv6_address():
    assert url_split("https://vllm.internal/v1")[0].host_header == b"vllm.internal"
    assert url_split("http://[::1]:8000/v1")[0].host_header == b"[::1]:8000"
    with pytest.raises(ValueError, match="not an http"):
        url_split("ftp://vllm.internal/")


def test_an_interim_answer_is_skipped_and_the_final_one_returned():
    early = b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n"

    async def test() -> tuple[int, bytes, list[tuple[bytes, bytes]], int]:
        def make(server: Server) -> Handler:
            async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                for split in (False, True):
                    await server.request(reader)
                    writer.write(early + (b"" if split else OK))
                    await writer.drain()
                    if split:  # the final answer in a later packet
                        await asyncio.sleep(0.05)
                        writer.write(OK)
                await server.request(reader)

            return handler

        server = await serving(make)
        client = HttpClient()
        got = []
        for _ in range(2):
            response = await client.request("GET", f"{server.base}/")
            got.append((response.status, await response.read(), response.headers))
            response.release()
        await client.close()
        await server.__aexit__()
        assert got[0] == got[1]
        return (*got[0], server.connections)

    status, body, headers, connections = run(test)
    assert (status, body, connections) == (200, b"{}", 1)
    assert (b"link", b"</x>") not in headers


def test_a_second_answer_in_the_same_read_is_dropped_and_its_connection_not_reused():
    async def test() -> tuple[bytes, int]:
        server = await serving(answering(OK + OK, OK))
        client = HttpClient()
        first = await client.request("GET", f"{server.base}/")
        body = await first.read()
        first.release()
        second = await client.request("GET", f"{server.base}/")
        await second.read()
        second.release()
        await client.close()
        await server.__aexit__()
        return body, server.connections

    assert run(test) == (b"{}", 2)


def test_a_body_without_length_cut_by_a_reset_is_a_disconnect():
    def make(server: Server) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\n\r\npart of it")
            await writer.drain()
            await asyncio.sleep(0.05)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # RST, not FIN

        return handler

    assert run(lambda: body_error(make)) is Disconnected


def test_a_waiter_woken_then_cancelled_passes_the_free_connection_on():
    async def test() -> tuple[int, int]:
        server = await serving(answering(OK, OK))
        client = HttpClient(max_connections=1, pool_wait_s=5)
        held = await client.request("GET", f"{server.base}/")
        first = asyncio.create_task(client.request("GET", f"{server.base}/"))
        second = asyncio.create_task(client.request("GET", f"{server.base}/"))
        await asyncio.sleep(0.05)  # both wait for the one connection
        await held.read()
        held.release()  # wakes the first waiter...
        first.cancel()  # ...which leaves before it runs: the second must get the connection now
        response = await asyncio.wait_for(second, 1)
        status = response.status
        response.release()
        await client.close()
        await server.__aexit__()
        return status, server.connections

    assert run(test) == (200, 1)


def parts_then(end: bytes, *, parts: int, every_s: float) -> Callable[[Server], Handler]:
    """A chunked answer whose parts come ``every_s`` apart, then ``end`` (the last chunk, or b"": silence)."""

    def make(server: Server) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            for index in range(parts):
                await asyncio.sleep(every_s)
                writer.write(b"6\r\npart-%d\r\n" % index)
                await writer.drain()
            await asyncio.sleep(every_s)  # the end comes in a read of its own
            writer.write(end)
            await writer.drain()
            await asyncio.sleep(30 if not end else 0)
            await server.request(reader)

        return handler

    return make


async def taking(
    make: Callable[[Server], Handler], taker: Callable[[Any], bool], read_timeout_s: float = 5.0
) -> tuple[list[bytes], type[Exception] | None]:
    """Read a response with ``taker`` set as its ``on_data``: return what ``chunk()`` handed over, then
    the error that ended the reading, if one did."""
    server = await serving(make)
    client = HttpClient(read_timeout_s=read_timeout_s)
    response = await client.request("POST", f"{server.base}/s", (), b"{}")
    response.on_data = taker
    handed: list[bytes] = []
    error: type[Exception] | None = None
    try:
        while chunk := await response.chunk():
            handed.append(chunk)
    except ReadTimeout as exc:
        error = type(exc)
    response.close()
    await client.close()
    await server.__aexit__()
    return handed, error


def test_a_body_taker_gets_each_part_in_the_read_that_brought_it_and_the_reader_only_the_end():
    taken: list[bytes] = []

    def taker(response: Any) -> bool:
        taken.append(response.take())
        return True

    handed, error = run(lambda: taking(parts_then(b"0\r\n\r\n", parts=3, every_s=0.02), taker))
    assert taken == [b"part-0", b"part-1", b"part-2"]
    assert handed == []
    assert error is None


def test_a_taker_that_declines_or_fails_leaves_the_parts_to_the_reader():
    calls: list[str] = []

    def declining(response: Any) -> bool:
        calls.append("declined")
        return False

    def failing(response: Any) -> bool:
        calls.append("failed")
        raise ValueError("a bug in the taker")

    make = parts_then(b"0\r\n\r\n", parts=3, every_s=0.02)
    declined, _error = run(lambda: taking(make, declining))
    failed, _error = run(lambda: taking(make, failing))
    assert declined == failed == [b"part-0", b"part-1", b"part-2"]
    assert calls.count("declined") == 3
    assert calls.count("failed") == 1  # a taker that raised is not called again


def test_the_read_timeout_counts_the_silence_even_while_a_taker_takes_the_parts():
    taken: list[bytes] = []

    def taker(response: Any) -> bool:
        taken.append(response.take())
        return True

    # parts for 0.6 s, three times the read timeout, then silence
    handed, error = run(lambda: taking(parts_then(b"", parts=6, every_s=0.1), taker, read_timeout_s=0.2))
    assert len(taken) == 6  # every part came in while the stream flowed: no timeout then
    assert handed == []
    assert error is ReadTimeout


def test_a_body_read_whole_past_its_bound_is_a_protocol_error_and_its_connection_closed():
    """An upstream's endless body took the process's memory: ``read`` stops at ``max_bytes``, and ``get``
    at ``DOCUMENT_MAX_BYTES``."""

    async def test() -> tuple[str, bool, str, bytes]:
        def make(server: Server) -> Handler:
            async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                while await server.request(reader):
                    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                    part = b"%x\r\n%s\r\n" % (1 << 20, b"x" * (1 << 20))
                    try:
                        while True:  # no end: the reader must stop it
                            writer.write(part)
                            await writer.drain()
                    except ConnectionError:
                        return

            return handler

        server = await serving(make)
        client = HttpClient()
        response = await client.request("GET", f"{server.base}/")
        with pytest.raises(ProtocolError) as endless:
            await response.read(max_bytes=3 << 20)
        closed = response._connection.closed
        with pytest.raises(ProtocolError) as document:
            await client.get(f"{server.base}/models")
        within = answering(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nsmall")
        small = await serving(within)
        _, body = await client.get(f"{small.base}/")
        await client.close()
        await server.__aexit__()
        await small.__aexit__()
        return str(endless.value), closed, str(document.value), body

    endless, closed, document, body = run(test)
    assert endless == f"the answer's body runs past {3 << 20} bytes"
    assert closed
    assert document == f"the answer's body runs past {DOCUMENT_MAX_BYTES} bytes"
    assert body == b"small"
