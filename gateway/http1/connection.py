"""One keep-alive connection to an upstream (an asyncio protocol) and the response it carries, parsed by
httptools (llhttp): the parts of ``gateway.http1``'s client below its pool.

Framing comes from llhttp: ``Content-Length``, chunked, or (without either) the body runs until the
upstream closes. A response's body is handed over as it arrives, and reading from the upstream pauses
while more than ``HIGH_WATER`` bytes wait for a slow consumer (back pressure); a consumer may also take
it in the read that brought it (``Response.on_data``), with no task switch. ``read_timeout_s`` bounds
every silence while a response is awaited (its head, then each part of its body).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import httptools

from gateway.http1.wire import Disconnected, HttpError, Origin, ProtocolError, ReadTimeout

if TYPE_CHECKING:
    from gateway.http1 import HttpClient

logger = logging.getLogger(__name__)

HIGH_WATER = 1 << 16  # body bytes buffered for a slow consumer before reading from the upstream pauses
# An answer's header block past this is no vLLM's: kept whole, 320 MB of header lines had the process hold
# 636 MB for good. (Servers refuse requests' headers past 8-64 KiB alike.)
HEADERS_MAX_BYTES = 1 << 16
# A whole answer read past this is no vLLM's either: a non-streamed completion with every logprob of a long
# prompt echoed runs to tens of MB (a stream's events are capped one by one, ``gateway.streaming``).
# Unbounded, an upstream's endless body took the process's memory with it.
BODY_MAX_BYTES = 256 << 20


class Response:
    """An upstream's answer: ``status`` and ``headers`` once the head is in, then its body as it comes.

    It is also the parser's protocol: llhttp calls ``on_header`` … ``on_message_complete`` on it.

    ``on_data``, when set, is called in the read that brought more of the body (not its end, and not after
    a failure): it may ``take()`` the parts and return True, and the reader waiting in ``chunk()`` is then
    not woken; returning False leaves them to ``chunk()``. A relay that writes each part on at once so
    spares a task switch, a future and a timer per part. ``read_timeout_s`` still bounds every silence.
    """

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self.complete = False  # the whole body arrived
        self.keep_alive = False  # the upstream keeps the connection open after it
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._head: asyncio.Future[None] | None = connection.loop.create_future()
        self._framed = False  # its length was declared (or it is chunked): a close is not its end
        self._interim = False  # a 1xx answer is being parsed
        self._error: HttpError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._data_at = 0.0  # the loop's time when the last bytes arrived
        self._released = False
        self.on_data: Callable[[Response], bool] | None = None

    def is_eof(self) -> bool:
        """Whether the body has arrived in full and all of it was read."""
        return self.complete and not self._chunks

    async def chunk(self) -> bytes:
        """Return the body bytes that arrived since the last call (waiting for some), or b"" at the end."""
        while not self._chunks:
            if self.complete:
                return b""
            await self._wait()
        return self.take()

    def take(self) -> bytes:
        """Return the body bytes that arrived since the last call, without waiting (b"" when none did)."""
        if not self._chunks:
            return b""
        data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        self._connection.reading_resume()
        return data

    async def read(self, max_bytes: int = BODY_MAX_BYTES) -> bytes:
        """Return the whole (rest of the) body; past ``max_bytes`` the connection is closed and the read
        fails (``ProtocolError``)."""
        parts = []
        size = 0
        while chunk := await self.chunk():
            size += len(chunk)
            if size > max_bytes:
                self.close()
                raise ProtocolError(f"the answer's body runs past {max_bytes} bytes")
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        """Done with the response: its connection goes back to the pool when the body was read to the end
        and the upstream keeps it alive, and is closed otherwise."""
        if not self._released:
            self._released = True
            self._connection.response_done(self, reuse=self.is_eof())

    def close(self) -> None:
        """Done with the response, cut short or not: its connection is closed."""
        if not self._released:
            self._released = True
            self._connection.response_done(self, reuse=False)

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        loop = self._connection.loop
        waiter = self._waiter = loop.create_future()
        self._timer = loop.call_later(self._connection.pool.read_timeout_s, self._timed_out)
        try:
            await waiter
        finally:
            self._timer.cancel()
            self._waiter = None
        if self._error is not None and not self._chunks and not self.complete:
            raise self._error

    def _timed_out(self) -> None:
        loop = self._connection.loop
        left = self._data_at + self._connection.pool.read_timeout_s - loop.time()
        if left > 0 and self._waiter is not None:  # ``on_data`` took what came meanwhile: not silent
            self._timer = loop.call_later(left, self._timed_out)
            return
        self.fail(ReadTimeout("the upstream went silent"))
        self._connection.close()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def head_timed_out(self) -> None:
        """No head within the read timeout: the request fails; the body's state is left alone."""
        self._head_fail(ReadTimeout("the upstream did not answer in time"))

    def _head_fail(self, error: HttpError) -> None:
        head = self._head
        if head is not None and not head.done():
            head.set_exception(error)

    def fail(self, error: HttpError) -> None:
        """The connection broke (or the upstream went silent): whoever waits on this response gets it."""
        self._head_fail(error)
        if not self.complete and self._error is None:
            self._error = error
        self._wake()

    def ended_by_close(self, clean: bool) -> bool:
        """The connection closed (``clean``: not reset): end the body there if nothing framed it; return
        whether it is whole."""
        if clean and self.status and not self._framed:
            self.complete = True
            self._wake()
        return self.complete

    # --- httptools callbacks ----------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.complete:  # a second answer in the same read: not ours, and the connection is not reused
            self.keep_alive = False
            return
        self.headers.append((name, value))
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > HEADERS_MAX_BYTES:  # raised in httptools' callback: a parser error, below
            raise ProtocolError(f"the upstream's headers are over {HEADERS_MAX_BYTES} bytes")
        lowered = name.lower()
        if lowered == b"content-length" or (
            lowered == b"transfer-encoding" and value.lower().find(b"chunked") >= 0
        ):
            self._framed = True

    def on_headers_complete(self) -> None:
        if self.complete:
            return
        status = self._connection.parser.get_status_code()
        if status < 200:  # an interim answer (100 Continue, 103 Early Hints): the real one follows
            self.headers = []
            self._header_bytes = 0
            self._framed = False
            self._interim = True
            return
        self.status = status
        if status in (204, 304):
            self._framed = True  # no body follows
        head = self._head
        if head is not None and not head.done():
            head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER:
            self._connection.reading_pause()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self.complete:
            self.keep_alive = False
            return
        self.complete = True
        self.keep_alive = self._connection.parser.should_keep_alive()
        self._wake()


class Connection(asyncio.Protocol):
    """One connection to one origin, carrying one request at a time."""

    def __init__(self, pool: HttpClient, origin: Origin, loop: asyncio.AbstractEventLoop) -> None:
        self.pool, self.origin, self.loop = pool, origin, loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)  # replaced with each request
        self.response: Response | None = None
        self.closed = False
        self.idle_since = 0.0
        self._paused = False

    # --- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None or response.complete:
            self.close()  # nothing was asked: an upstream talking out of turn is not trusted again
            return
        response._data_at = self.loop.time()
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            # HttpParserUpgrade is no HttpParserError: a 101 (nothing asked to switch) escaped to asyncio's
            # transport as a fatal error, and the connection's failures took the upstream out of rotation
            response.fail(ProtocolError(f"invalid response from the upstream: {exc!r}"))
            self.close()
            return
        taker = response.on_data
        if taker is not None and response._chunks and not response.complete and response._error is None:
            try:
                if taker(response):
                    return
            except Exception:  # a bug in the taker: it is dropped, and the reader woken for what is left
                logger.exception("a response body taker failed; the reader takes over")
                response.on_data = None
        response._wake()  # once for all the body parts this read brought

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self.response
        if response is not None and not response.ended_by_close(exc is None):
            response.fail(Disconnected("the upstream closed the connection"))
        self.pool.connection_gone(self)

    # --- used by the client and the response ---------------------------------------------------------

    async def send(self, head: bytes, body: bytes) -> Response:
        """Write a request and return its response once the head has arrived."""
        response = self.response = Response(self)
        self.parser = httptools.HttpResponseParser(response)
        assert self.transport is not None  # noqa: S101  (a connection is handed out only once made)
        self.transport.write(head + body)
        timer = self.loop.call_later(self.pool.read_timeout_s, response.head_timed_out)
        try:
            await response._head  # type: ignore[misc]
        except BaseException:
            response.close()
            raise
        finally:
            timer.cancel()
            response._head = None
        return response

    def response_done(self, response: Response, *, reuse: bool) -> None:
        if response is not self.response:
            return
        self.response = None
        if reuse and response.keep_alive and not self.closed:
            self.pool.connection_idle(self)
        else:
            self.close()

    def reading_pause(self) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def reading_resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
        self.pool.connection_gone(self)
