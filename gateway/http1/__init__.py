"""The gateway's HTTP/1.1 client for its upstreams: a keep-alive pool of asyncio protocols, with every
response parsed by httptools (llhttp, the parser uvicorn and aiohttp's C extension are built on).

Why not aiohttp or httpx: measured by ``python -m bench.micro`` on the project's 2-core machine, a
proxied chat request costs the calling process ~87 µs of CPU through ``aiohttp.ClientSession`` at 32
concurrent requests (~154 µs one at a time) and ~29 µs (~68 µs) through this client; httpx's client
layer costs more than aiohttp (bench/README.md). The gateway's whole budget at 3,000 requests/s is
~330 µs, so the session object's generality (cookies, redirects, tracing, multipart, proxies,
decompression) was a fifth of the hot path. This client does only what the gateway asks of an upstream
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
- a body read whole is bounded (``BODY_MAX_BYTES``, and ``DOCUMENT_MAX_BYTES`` for ``get``): past it the
  read fails as a protocol error;
- https origins use the system's default TLS context (``SSL_CERT_FILE`` names a private CA), with the
  host name checked.

Framing comes from llhttp: ``Content-Length``, chunked, or (without either) the body runs until the
upstream closes. Request headers must not carry CR, LF or NUL (``ValueError``: a caller's bug).

The pool is here; one connection and the response it carries are in ``gateway.http1.connection``, the
errors and a request's head in ``gateway.http1.wire``. What callers use of the three is importable from
here (``__all__``).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Iterable

from gateway.http1.connection import BODY_MAX_BYTES, HIGH_WATER, Connection, Response
from gateway.http1.wire import (
    ClientClosed,
    ConnectFailed,
    ConnectTimeout,
    Disconnected,
    HttpError,
    Origin,
    PoolTimeout,
    ProtocolError,
    ReadTimeout,
    request_head,
    url_split,
)

__all__ = [  # the client's whole vocabulary, importable from here
    "BODY_MAX_BYTES",
    "HIGH_WATER",
    "ClientClosed",
    "ConnectFailed",
    "DOCUMENT_MAX_BYTES",
    "ConnectTimeout",
    "Disconnected",
    "HttpClient",
    "HttpError",
    "Origin",
    "PoolTimeout",
    "ProtocolError",
    "ReadTimeout",
    "Response",
    "request_head",
    "url_split",
]


DOCUMENT_MAX_BYTES = 16 << 20  # a health answer, a model list, a key set: small documents


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
        self._idle: dict[tuple[str, str, int], list[Connection]] = {}
        self._open: set[Connection] = set()
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
        """GET a small document whole within ``timeout_s``: return its status and body (a body past
        ``DOCUMENT_MAX_BYTES`` is a ``ProtocolError``)."""
        async with asyncio.timeout(timeout_s):
            response = await self.request("GET", url, headers)
            try:
                return response.status, await response.read(DOCUMENT_MAX_BYTES)
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

    async def _acquire(self, origin: Origin) -> Connection:
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
        oldest: Connection | None = None
        for idle in self._idle.values():
            if idle and (oldest is None or idle[0].idle_since < oldest.idle_since):
                oldest = idle[0]
        if oldest is None:
            return False
        oldest.close()
        return True

    async def _connect(self, origin: Origin, loop: asyncio.AbstractEventLoop) -> Connection:
        connection = Connection(self, origin, loop)
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

    def connection_idle(self, connection: Connection) -> None:
        connection.idle_since = time.monotonic()
        self._idle.setdefault(connection.origin.key, []).append(connection)
        self._wake_one()

    def connection_gone(self, connection: Connection) -> None:
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
