"""The HTTP/1.1 protocol Portcullis is served with: uvicorn's (on httptools), with what uvicorn leaves
undone at the connection level. Serve with ``--http config.protocol:AuditedHttpToolsProtocol``.

- **A request that does not parse** (broken framing, a bad header line, an ambiguous body length such as
  two Content-Length values, or Content-Length with chunked: the shapes request smuggling takes) gets
  uvicorn's plain-text 400 and the connection closes before any view runs, so no view could record it.
  It is recorded here as ``http.malformed``.
- **Long heads.** httptools holds a request line and headers whole, however long, and a chunked body's
  size lines and trailers, and uvicorn sets no bound (200 MiB of headers took a process to 1.9 GB). Past
  ``HEAD_MAX_BYTES`` (64 KiB, give or take the reads it begins and ends in, up to 256 KiB each) a request
  gets a plain-text 431 (unless an answer is under way on the connection: then the close alone), is
  recorded as ``http.head_too_large``, and the connection closes once what the client still sends for a
  second has been read and dropped (closed at once, the socket's reset could discard the 431).
- **Transfer codings.** A request whose ``Transfer-Encoding`` names a coding other than ``chunked``
  (``gzip, chunked``, which llhttp frames as chunked and whose body went on still compressed) is refused
  as the broken framings are: uvicorn's 400, recorded as ``http.malformed``.
- **Slow headers.** uvicorn sets no deadline on a request's headers: a connection that sends nothing, or
  trickles a header a byte at a time, is held for ever (slowloris), and a few thousand of them take every
  file descriptor. Here a request's headers must be whole within ``HEADER_READ_TIMEOUT_S`` (the
  ``PORTCULLIS_HEADER_READ_TIMEOUT`` setting) of the connection opening, or, on a kept-alive connection,
  of the request's first byte. Past it, a request begun gets a plain-text 408, is recorded as
  ``http.slow_headers``, and the connection closes; a connection that sent nothing is closed without a
  word (a browser's preconnect is one).
- **Slow bodies.** Once the headers are in, the body has ``PORTCULLIS_BODY_READ_TIMEOUT``: the gateway's
  consumers enforce it on ``/v1`` themselves (an OpenAI-shaped 408 with its request id and usage record);
  here it is enforced for everything else (the OAuth endpoints, the sign-in and console pages), which
  Django reads whole before any view runs, for as long as it takes. Past it the answer is a 408 (RFC 6749's
  JSON shape under ``/oauth/``, plain text elsewhere), recorded as ``http.slow_body``, and the close.
- **Writing a streamed body at once.** A gateway request's scope carries the ASGI extension
  ``portcullis.body_write``. Its ``write`` writes one more part of a chunked response body straight to the
  connection, in the caller's own step, and returns False (writing nothing) whenever that would not be what
  ``send`` does: before the headers, after the end, once the client has gone, or while the connection is
  paused for a slow client (``send`` then waits for it to drain). The stream relay uses it to pass each
  event on in the read that brought it from the upstream, with no task switch per event. It is bound to
  uvicorn's request cycle (the ``flow``, ``transport`` and framing attributes ``send`` itself uses), like
  the rest of this module; a server without it leaves the extension out and the relay uses ``send``.
- **Telling a request its client has gone.** A gateway request's scope also carries
  ``portcullis.disconnect``, a dict: a callable the application puts under ``"on_lost"`` is called when the
  connection is lost (``"lost"`` is then True), for every gateway request of the connection not yet
  answered (a pipelined request waiting behind a stream does not take its place). The consumers use it to
  cut a wait for a whole upstream answer, or a stream, at once, with no task of their own listening on
  ``receive`` (ASGI's way, their fallback). Once a gateway request's body is whole, the connection is read
  on (past 64 KiB uvicorn had stopped, and a close would go unheard), unless a pipelined request waits.

The records go through the gateway's audit sink, which hands them off without blocking the event loop
(to the Redis stream, or to the in-process queue in the embedded default). The address is the
connection's peer when the headers did not parse or did not arrive (a trusted proxy's X-Forwarded-For is
not read, so behind a proxy it is the proxy's), and the client's, resolved as everywhere else, for a slow
body. Nothing of the request itself is recorded. When uvicorn itself stopped reading (a pipelined request
waits for the one before it), a deadline is moved on rather than held against the client.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from gateway.deadlines import Deadlines

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT = b"Request header timeout."
# a late request is cut at most half a second after its deadline
DEADLINES: Deadlines[AuditedHttpToolsProtocol] = Deadlines(sweep_s=0.5)


_timeouts: tuple[float, float] | None = None


def _timeouts_s() -> tuple[float, float]:
    """The header and body deadlines, in seconds (read once: uvicorn loads the app, and with it the
    settings, before the first connection)."""
    global _timeouts
    if _timeouts is None:
        from django.conf import settings

        from gateway.conf import gateway_settings

        _timeouts = (float(settings.HEADER_READ_TIMEOUT_S), gateway_settings().body_read_timeout_s)
    return _timeouts


HEAD_MAX_BYTES = 64 * 1024  # a request line and headers, together (the answer's own cap is the same)
REQUEST_HEAD_TOO_LARGE = b"Request line and headers too large."
DISCARD_S = 1.0  # after a 431, what the client still sends is read and dropped this long before the close


class UnsupportedTransferCoding(Exception):
    """A request's Transfer-Encoding names a coding besides chunked (the parser then answers 400)."""


class AuditedHttpToolsProtocol(HttpToolsProtocol):
    _phase = ""  # what its deadline in DEADLINES is for: "headers", "body" or nothing
    _begun = False  # the current request's first byte has arrived
    # What httptools holds whole, however long (a request's line and headers, a chunked body's size lines
    # and trailers), is read within a window: open from a head's first byte to its end, and from a chunk's
    # size line to its data (the last one's, to the message's end: its trailers)
    _head_open = True
    _head_bytes = 0  # the reads made while it stayed open, but those it opened or closed in
    _boundary = False  # it opened or closed within the read being parsed
    _discarding = False  # a 431 is answered: what still comes is dropped

    def data_received(self, data: bytes) -> None:
        # uvicorn sets no bound on them: 200 MiB of headers (or of a chunked body's trailers), sent within
        # the deadlines and without a token, took a process to 1.9 GB, held after the answer. Past
        # HEAD_MAX_BYTES a request is a 431, and the close.
        if self._discarding:
            return
        head_open, self._boundary = self._head_open, False
        super().data_received(data)
        if not (head_open and self._head_open) or self._boundary:
            return
        self._head_bytes += len(data)
        transport = self.transport
        if self._head_bytes > HEAD_MAX_BYTES and transport is not None and not transport.is_closing():
            self._head_refused(transport)

    def _head_refused(self, transport: asyncio.Transport) -> None:
        DEADLINES.remove(self)
        self._audit("http.head_too_large", 431, self._peer())
        if self.cycle is not None and not self.cycle.response_complete:
            # an answer is under way (trailers too long, or a pipelined head behind a stream): a 431 would
            # land inside it; the application hears a disconnect
            transport.close()
            return
        self._refuse(
            [(b"content-type", b"text/plain; charset=utf-8")],
            REQUEST_HEAD_TOO_LARGE,
            status=b"431 Request Header Fields Too Large",
        )
        # Closed at once with the rest of the head unread, the socket would send a reset, which can discard
        # the 431 before the client reads it: end the writing side, drop what still comes, then close
        self._discarding = True
        if transport.can_write_eof():
            transport.write_eof()
        asyncio.get_running_loop().call_later(DISCARD_S, transport.close)

    def on_chunk_header(self) -> None:  # httptools calls it when a protocol has it
        self._head_open, self._head_bytes, self._boundary = True, 0, True

    def on_body(self, body: bytes) -> None:
        self._head_open, self._boundary = False, True
        super().on_body(body)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch("headers")

    _disconnect: dict[str, Any] | None = None  # the current gateway request's portcullis.disconnect
    # every gateway request of this connection not yet answered (a pipelined one waits behind another),
    # with a weak reference to its cycle: a finished cycle must go as soon as it is replaced
    _told: list[tuple[weakref.ref[Any], dict[str, Any]]] | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        DEADLINES.remove(self)
        super().connection_lost(exc)
        for ref, told in self._told or ():
            cycle = ref()
            if cycle is not None and not cycle.response_complete:
                # uvicorn marks its current request alone: a pipelined one the application then left
                # unanswered (499) was sent a 500 on the closed connection, with an error and a traceback
                cycle.disconnected = True
            told["lost"] = True
            on_lost = told.get("on_lost")
            if on_lost is not None:
                try:
                    on_lost()
                except Exception:  # the application's callback must not break the server's bookkeeping
                    logger.exception("a disconnect callback failed")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._begun = True
        self._head_open, self._head_bytes, self._boundary = True, 0, True
        if self not in DEADLINES.pending:  # a kept-alive connection's next request
            self._watch("headers")

    def on_headers_complete(self) -> None:
        DEADLINES.remove(self)
        self._phase, self._begun = "", False
        self._head_open, self._boundary = False, True
        for name, value in self.headers:
            if name == b"transfer-encoding" and value.strip().lower() != b"chunked":
                # "gzip, chunked": llhttp frames it as chunked and the body went on still compressed, read
                # as it came. No coding but chunked is taken: refused as the other framings are (a 400)
                raise UnsupportedTransferCoding()
        super().on_headers_complete()
        self._disconnect = None
        path = self.scope.get("path", "")
        if self.cycle is not None and self.cycle.scope is self.scope:
            if not _gateway_path(path):
                self._watch("body")  # the gateway's consumers keep their own, with an OpenAI-shaped answer
            else:
                extensions = self.scope.get("extensions") or {}
                extensions["portcullis.body_write"] = {"write": body_writer(self.cycle)}
                told: dict[str, Any] = {"lost": False, "on_lost": None}
                extensions["portcullis.disconnect"] = told  # type: ignore[assignment]  # ASGI's typing
                self._disconnect = told
                self._told = [(ref, t) for ref, t in self._told or () if _unanswered(ref())]
                self._told.append((weakref.ref(self.cycle), told))
                self.scope["extensions"] = extensions

    def on_message_complete(self) -> None:
        self._head_open, self._boundary = False, True
        if self._phase == "body":
            DEADLINES.remove(self)
            self._phase = ""
        super().on_message_complete()
        if self._disconnect is not None and self.flow is not None and not self.pipeline:
            # A gateway request's body is whole. Past 64 KiB uvicorn stopped reading the socket until the
            # application asks for more, which the gateway never does once it has the body: the client's
            # close would go unheard (no connection_lost, no portcullis.disconnect) while vLLM generates.
            # Read on, unless a pipelined request waits: then uvicorn's pause is its only bound on how
            # many more a client can queue, and it reads on when the one before is answered.
            self.flow.resume_reading()

    def _watch(self, phase: str) -> None:
        headers_s, body_s = _timeouts_s()
        self._phase = phase
        DEADLINES.add(self, time.monotonic() + (headers_s if phase == "headers" else body_s))

    def late(self) -> None:
        """A deadline passed: answer a request begun with a 408, and close."""
        if self.transport is None or self.transport.is_closing():
            return
        if self.flow is not None and self.flow.read_paused:  # uvicorn stopped reading, not the client
            self._watch(self._phase)
            return
        try:
            if self._phase == "body":
                self._body_late()
            elif self._begun:
                self._audit("http.slow_headers", 408, self._peer())
                self._refuse([(b"content-type", b"text/plain; charset=utf-8")], REQUEST_TIMEOUT)
        finally:
            self.transport.close()  # whatever the answer did

    def _body_late(self) -> None:
        from audit.context import scope_client_ip
        from config.threadpool import rfc_error

        if self.cycle is None or self.cycle.response_started:
            return  # the application answered already: only the close is left
        self.cycle.disconnected = True  # the application's next receive() is a disconnect
        self._audit("http.slow_body", 408, scope_client_ip(self.scope))
        if self.scope.get("path", "").startswith("/oauth/"):  # RFC 6749 §5.2's shape, as the pool's refusals
            _status, headers, body = rfc_error(408, "The request body was not received in time.")
            self._refuse([(n, v) for n, v in headers if n != b"content-length"], body)
        else:
            self._refuse([(b"content-type", b"text/plain; charset=utf-8")], b"Request body timeout.")

    def _refuse(
        self, headers: list[tuple[bytes, bytes]], body: bytes, status: bytes = b"408 Request Timeout"
    ) -> None:
        content = [b"HTTP/1.1 %s\r\n" % status]
        for name, value in [*self.server_state.default_headers, *headers]:
            content.extend([name, b": ", value, b"\r\n"])
        content.append(b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        content.append(body)
        self.transport.write(b"".join(content))

    def _peer(self) -> str | None:
        return self.client[0] if self.client else None

    def send_400_response(self, msg: str) -> None:
        DEADLINES.remove(self)
        self._audit("http.malformed", 400, self._peer())
        super().send_400_response(msg)

    def _audit(self, kind: str, status: int, ip: str | None) -> None:
        from gateway.runtime import runtime_current  # uvicorn imports this class before Django is set up

        runtime = runtime_current()
        try:
            if runtime is None:  # a server run without the lifespan that starts the runtime: said, not lost
                logger.warning("a connection was refused (%s); no audit sink to record it", kind)
            elif not runtime.audit_full():  # while it is full, counted, and the count recorded at its end
                runtime.sink.event(
                    {
                        "kind": kind,
                        "outcome": "denied",
                        "actor": "anonymous",
                        "ip": ip,
                        "data": {"status": status},
                    }
                )
        except Exception:  # the refusal goes out whatever the audit hand-off does
            logger.exception("a refused connection could not be handed to the audit sink")


def body_writer(cycle: RequestResponseCycle) -> Callable[[bytes], bool]:
    """The ``portcullis.body_write`` extension of one request: write a part of its chunked response body
    now, framed as ``send`` frames it; False (nothing written) when ``send`` must take it instead.

    It holds its request cycle weakly: the cycle holds the scope, and the scope this function, so a strong
    hold would make every request a reference cycle that only the collector frees (measured: under 1,000
    streams the process grew by ~50 MiB in 25 s, which reference counting alone no longer gives back)."""
    held = weakref.ref(cycle)

    def write(body: bytes) -> bool:
        cycle = held()
        if cycle is None:
            return False
        transport = cycle.transport
        if (
            cycle.response_complete
            or cycle.disconnected
            or not cycle.chunked_encoding  # None until the headers are sent
            or cycle.flow.write_paused
            or transport.is_closing()
        ):
            return False
        if body:
            transport.write(b"%x\r\n%s\r\n" % (len(body), body))
        return True

    return write


def _unanswered(cycle: RequestResponseCycle | None) -> bool:
    """Whether a request's cycle is still alive and its response not complete (it must hear a loss)."""
    return cycle is not None and not cycle.response_complete


def _gateway_path(path: str) -> bool:
    from gateway.routing import is_gateway_path

    return is_gateway_path(path)
