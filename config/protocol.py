"""The HTTP/1.1 protocol Portcullis is served with: uvicorn's (on httptools), with its one refusal of its
own audited. Serve with ``--http config.protocol:AuditedHttpToolsProtocol``.

A request that does not parse as HTTP/1.1 (broken framing, a bad header line, an ambiguous body length
such as two Content-Length values, or Content-Length with chunked: the shapes request smuggling takes) gets
uvicorn's plain-text 400 and the connection closes before any view runs, so no view could record it. This
records it as ``http.malformed`` through the gateway's audit sink, which hands it off without blocking the
event loop (to the Redis stream, or to the in-process queue in the embedded default). The address is the
connection's peer: the headers did not parse, so a trusted proxy's X-Forwarded-For is not read, and behind
a proxy it is the proxy's. Nothing of the request itself is recorded.
"""

from __future__ import annotations

import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger(__name__)


class AuditedHttpToolsProtocol(HttpToolsProtocol):
    def send_400_response(self, msg: str) -> None:
        from gateway.runtime import runtime_current  # uvicorn imports this class before Django is set up

        runtime = runtime_current()
        try:
            if runtime is None:  # a server run without the lifespan that starts the runtime: said, not lost
                logger.warning("a request that did not parse as HTTP was refused; no audit sink to record it")
            else:
                runtime.sink.event(
                    {
                        "kind": "http.malformed",
                        "outcome": "denied",
                        "actor": "anonymous",
                        "ip": self.client[0] if self.client else None,
                        "data": {"status": 400},
                    }
                )
        except Exception:  # the refusal goes out whatever the audit hand-off does
            logger.exception("a refused unparsable request could not be handed to the audit sink")
        super().send_400_response(msg)
