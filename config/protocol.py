"""The HTTP/1.1 protocol Portcullis is served with: uvicorn's (on httptools), with what uvicorn leaves
undone at the connection level. Serve with ``--http config.protocol:AuditedHttpToolsProtocol``.

- **A request that does not parse** (broken framing, a bad header line, an ambiguous body length such as
  two Content-Length values, or Content-Length with chunked: the shapes request smuggling takes) gets
  uvicorn's plain-text 400 and the connection closes before any view runs, so no view could record it.
  It is recorded here as ``http.malformed``.
- **Slow headers.** uvicorn sets no deadline on a request's headers: a connection that sends nothing, or
  trickles a header a byte at a time, is held for ever (slowloris), and a few thousand of them take every
  file descriptor. Here a request's headers must be whole within ``HEADER_READ_TIMEOUT_S`` (the
  ``PORTCULLIS_HEADER_READ_TIMEOUT`` setting) of the connection opening, or, on a kept-alive connection,
  of the request's first byte. Past it, a request begun gets a plain-text 408, is recorded as
  ``http.slow_headers``, and the connection closes; a connection that sent nothing is closed without a
  word (a browser's preconnect is one). The body has its own deadline once the headers are in (the
  gateway's ``PORTCULLIS_BODY_READ_TIMEOUT``).

Both records go through the gateway's audit sink, which hands them off without blocking the event loop
(to the Redis stream, or to the in-process queue in the embedded default). The address is the
connection's peer: the headers did not parse or did not arrive, so a trusted proxy's X-Forwarded-For is
not read, and behind a proxy it is the proxy's. Nothing of the request itself is recorded.
"""

from __future__ import annotations

import asyncio
import logging
import time

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger(__name__)

HEADER_SWEEP_S = 0.5  # a late request is cut at most this long after its deadline
HEADER_SWEEPER_IDLE_S = (
    30.0  # the sweeper ends after this long with nothing to watch (the next one restarts it)
)
REQUEST_TIMEOUT = b"Request header timeout."


class HeaderDeadlines:
    """The connections whose request headers are not whole yet, with their deadlines, checked by one
    sweeping task per process (a timer per request costs microseconds on the hot path; this, a dict entry
    added and removed)."""

    def __init__(self) -> None:
        self.pending: dict[AuditedHttpToolsProtocol, float] = {}
        self.sweeper: asyncio.Task[None] | None = None

    def add(self, protocol: AuditedHttpToolsProtocol, deadline: float) -> None:
        self.pending[protocol] = deadline
        if self.sweeper is None:  # one event loop per process (uvicorn); the sweeper clears this on exit
            self.sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def remove(self, protocol: AuditedHttpToolsProtocol) -> None:
        self.pending.pop(protocol, None)

    async def _sweep(self) -> None:
        idle = 0.0
        try:
            while idle < HEADER_SWEEPER_IDLE_S:
                await asyncio.sleep(HEADER_SWEEP_S)
                idle = 0.0 if self.pending else idle + HEADER_SWEEP_S
                now = time.monotonic()
                for protocol, deadline in list(self.pending.items()):
                    if deadline <= now:
                        del self.pending[protocol]
                        protocol.headers_late()
        finally:
            if self.sweeper is asyncio.current_task():
                self.sweeper = None


HEADER_DEADLINES = HeaderDeadlines()


_timeout_s: float | None = None


def _header_timeout_s() -> float:
    global _timeout_s
    if _timeout_s is None:
        from django.conf import settings  # set up by the time a connection arrives (uvicorn loads the app)

        _timeout_s = float(settings.HEADER_READ_TIMEOUT_S)
    return _timeout_s


class AuditedHttpToolsProtocol(HttpToolsProtocol):
    _begun = False  # the current request's first byte has arrived

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        HEADER_DEADLINES.add(self, time.monotonic() + _header_timeout_s())

    def connection_lost(self, exc: Exception | None) -> None:
        HEADER_DEADLINES.remove(self)
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._begun = True
        if self not in HEADER_DEADLINES.pending:  # a kept-alive connection's next request
            HEADER_DEADLINES.add(self, time.monotonic() + _header_timeout_s())

    def on_headers_complete(self) -> None:
        HEADER_DEADLINES.remove(self)
        self._begun = False
        super().on_headers_complete()

    def headers_late(self) -> None:
        """The deadline passed with the headers incomplete: answer a request begun with a 408, and close."""
        if self.transport is None or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # a pipelined request behind one still answering: uvicorn stopped reading, not the client sending
            HEADER_DEADLINES.add(self, time.monotonic() + _header_timeout_s())
            return
        if self._begun:
            self._audit("http.slow_headers", 408)
            content = [b"HTTP/1.1 408 Request Timeout\r\n"]
            for name, value in self.server_state.default_headers:
                content.extend([name, b": ", value, b"\r\n"])
            content.append(b"content-type: text/plain; charset=utf-8\r\n")
            content.append(b"content-length: %d\r\nconnection: close\r\n\r\n" % len(REQUEST_TIMEOUT))
            content.append(REQUEST_TIMEOUT)
            self.transport.write(b"".join(content))
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        HEADER_DEADLINES.remove(self)
        self._audit("http.malformed", 400)
        super().send_400_response(msg)

    def _audit(self, kind: str, status: int) -> None:
        from gateway.runtime import runtime_current  # uvicorn imports this class before Django is set up

        runtime = runtime_current()
        try:
            if runtime is None:  # a server run without the lifespan that starts the runtime: said, not lost
                logger.warning("a connection was refused (%s); no audit sink to record it", kind)
            else:
                runtime.sink.event(
                    {
                        "kind": kind,
                        "outcome": "denied",
                        "actor": "anonymous",
                        "ip": self.client[0] if self.client else None,
                        "data": {"status": status},
                    }
                )
        except Exception:  # the refusal goes out whatever the audit hand-off does
            logger.exception("a refused connection could not be handed to the audit sink")
