"""The gateway's HTTP/1.1 client for its upstreams: a keep-alive pool of asyncio protocols, with every
response parsed by httptools (llhttp, the parser uvicorn and aiohttp's C extension are built on).

Why not aiohttp or httpx: measured by ``python -m bench.micro`` on the project's 2-core machine, a
proxied chat request costs the calling process ~87 µs of CPU through ``aiohttp.ClientSession`` at 32
concurrent requests (~154 µs one at a time) and ~29 µs (~68 µs) through this client; httpx's client
layer costs more than aiohttp (bench/README.md). The gateway's whole budget at 3,000 requests/s is
~330 µs, so the session object's generality (cookies, redirects, tracing, multipart, proxies,
decompression) was a fifth of the hot path. This module does only what the gateway asks of an upstream
call, with the same guarantees:

- one pool per process, bounded by ``max_connections`` (0: unbounded), shared by every origin; a request
  that finds every connection busy waits ``pool_wait_s`` for one, then fails with ``PoolTimeout``;
- a keep-alive connection idle longer than ``keepalive_s`` (set below the upstream's own) is closed,
  never reused, and one the upstream closed leaves the pool when its close arrives;
- ``connect_timeout_s`` bounds a new connection; ``read_timeout_s`` bounds every silence while a
  response is awaited (its head, then each part of its body), as aiohttp's ``sock_read`` did;
- a response body is handed over as it arrives, and reading from the upstream pauses while more than
  ``HIGH_WATER`` bytes wait for a slow consumer (back pressure, as aiohttp's stream reader applies); a
  consumer may also take it in the read that brought it (``Response.on_data``), with no task switch;
- a response not read to its end is closed with its connection (vLLM then aborts the generation);
- https origins use the system's default TLS context (``SSL_CERT_FILE`` names a private CA), with the
  host name checked.

Framing comes from llhttp: ``Content-Length``, chunked, or (without either) the body runs until the
upstream closes. Request headers must not carry CR, LF or NUL (``ValueError``: a caller's bug).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

import httptools

logger = logging.getLogger(__name__)

HIGH_WATER = 1 << 16  # body bytes buffered for a slow consumer before reading from the upstream pauses
FORBIDDEN_IN_HEADERS = (b"\r", b"\n", b"\0")


class HttpError(Exception):
    """An upstream call failed."""


class ConnectFailed(HttpError, OSError):
    """No connection could be made (refused, unreachable, no such host, TLS failure)."""


class ConnectTimeout(HttpError, TimeoutError):
    """A new connection was not made within ``connect_timeout_s``."""


class PoolTimeout(HttpError, TimeoutError):
    """Every connection of the pool stayed busy for ``pool_wait_s``: the wait was for our own pool."""


class Disconnected(HttpError, ConnectionError):
    """The connection closed before the response was complete."""


class ReadTimeout(HttpError, TimeoutError):
    """The upstream said nothing for ``read_timeout_s`` while a response was awaited."""


class ProtocolError(HttpError):
    """The upstream's answer was not valid HTTP/1.1."""


class ClientClosed(HttpError):
    """The client was closed (the process is shutting down): nothing is said about the upstream."""


class Origin:
    """Where a URL points: scheme, host and port, and the request line's ``Host`` header."""

    __slots__ = ("host", "host_header", "key", "port", "tls")

    def __init__(self, scheme: str, host: str, port: int | None) -> None:
        if scheme not in ("http", "https") or not host:
            raise ValueError(f"not an http(s) URL: {scheme}://{host}")
        self.tls = scheme == "https"
        default = 443 if self.tls else 80
        self.host, self.port = host, port or default
        shown = f"[{host}]" if ":" in host else host
        self.host_header = (shown if self.port == default else f"{shown}:{self.port}").encode("idna")
        self.key = (scheme, host, self.port)


def url_split(url: str) -> tuple[Origin, bytes]:
    """Return the origin and the request target (path and query) of an absolute http(s) URL."""
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Origin(parts.scheme, parts.hostname or "", parts.port), target.encode("ascii")


class Response:
    """An upstream's answer: ``status`` and ``headers`` once the head is in, then its body as it comes.

    It is also the parser's protocol: llhttp calls ``on_header`` … ``on_message_complete`` on it.

    ``on_data``, when set, is called in the read that brought more of the body (not its end, and not after
    a failure): it may ``take()`` the parts and return True, and the reader waiting in ``chunk()`` is then
    not woken; returning False leaves them to ``chunk()``. A relay that writes each part on at once so
    spares a task switch, a future and a timer per part. ``read_timeout_s`` still bounds every silence.
    """

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
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

    async def read(self) -> bytes:
        """Return the whole (rest of the) body."""
        parts = []
        while chunk := await self.chunk():
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
        lowered = name.lower()
        if lowered == b"content-length" or (lowered == b"transfer-encoding" and b"chunked" in value.lower()):
            self._framed = True

    def on_headers_complete(self) -> None:
        if self.complete:
            return
        status = self._connection.parser.get_status_code()
        if status < 200:  # an interim answer (100 Continue, 103 Early Hints): the real one follows
            self.headers = []
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


class _Connection(asyncio.Protocol):
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
        except httptools.HttpParserError as exc:
            response.fail(ProtocolError(f"invalid response from the upstream: {exc}"))
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


class HttpClient:
    """The pool: connections per origin, idle ones reused newest first, all of them bounded together."""

    def __init__(
        self,
        *,
        max_connections: int = 0,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 300.0,
        pool_wait_s: float = 5.0,
        keepalive_s: float = 4.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.pool_wait_s = pool_wait_s
        self.keepalive_s = keepalive_s
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._tls = tls  # None: the system's default context, made when the first https origin is met
        self._closed = False

    async def request(
        self,
        method: str,
        url: str | tuple[Origin, bytes],
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> Response:
        """Send a request; return its response once the head is in (read or close it when done)."""
        origin, target = url_split(url) if isinstance(url, str) else url
        head = request_head(method, target, origin, headers, body)
        connection = await self._acquire(origin)
        try:
            return await connection.send(head, body)
        except BaseException:
            connection.close()
            raise

    async def get(
        self, url: str, headers: Iterable[tuple[str, str]] = (), timeout_s: float = 5.0
    ) -> tuple[int, bytes]:
        """GET a small document whole within ``timeout_s``: return its status and body."""
        async with asyncio.timeout(timeout_s):
            response = await self.request("GET", url, headers)
            try:
                return response.status, await response.read()
            finally:
                response.release()

    async def close(self) -> None:
        self._closed = True
        for connection in list(self._open):
            connection.close()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    # --- the pool ---------------------------------------------------------------------------------

    async def _acquire(self, origin: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        while True:
            if self._closed:
                raise ClientClosed("the client is closed")
            idle = self._idle.get(origin.key)
            now = time.monotonic()
            while idle:
                connection = idle.pop()
                if (
                    not connection.closed
                    and now - connection.idle_since < self.keepalive_s
                    and not (connection.transport is not None and connection.transport.is_closing())
                ):
                    return connection
                connection.close()
            if not self.max_connections or len(self._open) < self.max_connections or self._evict():
                return await self._connect(origin, loop)
            if deadline is None:
                deadline = now + self.pool_wait_s
            if now >= deadline:
                raise PoolTimeout("every upstream connection is busy")
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout(deadline - now):
                    await waiter
            except BaseException as exc:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken, but leaving (timed out or cancelled): pass the turn on
                else:
                    waiter.cancel()
                    self._waiters.remove(waiter)
                if isinstance(exc, TimeoutError):
                    raise PoolTimeout("every upstream connection is busy") from None
                raise

    def _evict(self) -> bool:
        """Close the longest idle connection (of any origin) to make room; False when none is idle."""
        oldest: _Connection | None = None
        for idle in self._idle.values():
            if idle and (oldest is None or idle[0].idle_since < oldest.idle_since):
                oldest = idle[0]
        if oldest is None:
            return False
        oldest.close()
        return True

    async def _connect(self, origin: Origin, loop: asyncio.AbstractEventLoop) -> _Connection:
        connection = _Connection(self, origin, loop)
        self._open.add(connection)  # counted from now, so concurrent connects respect the bound
        tls: ssl.SSLContext | None = None
        if origin.tls:
            tls = self._tls = self._tls or ssl.create_default_context()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                await loop.create_connection(
                    lambda: connection,
                    origin.host,
                    origin.port,
                    ssl=tls,
                    server_hostname=origin.host if tls else None,
                )
        except BaseException as exc:
            connection.close()  # no longer counted (and its socket closed, if one was made)
            if isinstance(exc, TimeoutError) and exc.errno is None:  # ours, not the kernel's ETIMEDOUT
                raise ConnectTimeout(f"no connection to {origin.host}:{origin.port} in time") from None
            if isinstance(exc, OSError):  # refused, unreachable, no such host, a TLS failure (ssl.SSLError)
                raise ConnectFailed(f"cannot connect to {origin.host}:{origin.port}: {exc}") from None
            raise
        return connection

    def connection_idle(self, connection: _Connection) -> None:
        connection.idle_since = time.monotonic()
        self._idle.setdefault(connection.origin.key, []).append(connection)
        self._wake_one()

    def connection_gone(self, connection: _Connection) -> None:
        if connection in self._open:
            self._open.discard(connection)
            idle = self._idle.get(connection.origin.key)
            if idle and connection in idle:
                idle.remove(connection)
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


def request_head(
    method: str, target: bytes, origin: Origin, headers: Iterable[tuple[str, str]], body: bytes
) -> bytes:
    """The request line and headers, ``Host`` and ``Content-Length`` included."""
    lines = [b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (method.encode("ascii"), target, origin.host_header)]
    for name, value in headers:
        line = b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1"))
        if any(c in line[:-2] for c in FORBIDDEN_IN_HEADERS):
            raise ValueError(f"the request header {name!r} holds a line break or NUL")
        lines.append(line)
    if body or method != "GET":
        lines.append(b"content-length: %d\r\n" % len(body))
    lines.append(b"\r\n")
    return b"".join(lines)
