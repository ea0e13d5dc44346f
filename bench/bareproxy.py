"""The floor: a bare Python proxy in front of the same fakes, measured in the same runs as the gateway.

Issue 7's reference column ("a bare Python proxy, no auth, aiohttp client"): no token, no policy, no
Redis, no metering, no validation beyond reading the model to pick its upstream. It runs as the gateway
does (uvicorn, uvloop, httptools, pinned to the gateway's core) and uses the gateway's HTTP client: one
pooled ``aiohttp.ClientSession``, set up as ``gateway.upstream.upstream_session`` sets it (a keep-alive
that ends before the upstream's, so a connection the fake has closed is never reused; no decompression)
but without importing it, which would load Django into the floor. What it adds to direct is what
crossing one more process on the other core costs on this machine; what the gateway adds beyond it is
the gateway's own work.

``BENCH_BARE_UPSTREAMS`` maps models to upstreams: ``m1=http://127.0.0.1:8001,m2=http://127.0.0.1:8002``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import aiohttp

KEEPALIVE_S = 4.0  # as gateway.upstream.UPSTREAM_KEEPALIVE_S: below the fake's (uvicorn's) 5 s
STREAMING = b"text/event-stream"
NOT_FOUND = (
    b'{"error":{"message":"unknown model","type":"invalid_request_error","param":"model","code":null}}'
)


def routes_parse(raw: str) -> dict[str, str]:
    """Return {model: upstream base URL} from ``m1=http://a,m2=http://b``."""
    routes = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        model, _, base = part.partition("=")
        if not model or not base:
            raise ValueError(f"BENCH_BARE_UPSTREAMS: expected model=url, got {part!r}")
        routes[model] = base.rstrip("/")
    return routes


class BareProxy:
    """The ASGI application: /healthz for the harness, and every POST relayed to its model's upstream."""

    def __init__(self, routes: dict[str, str]) -> None:
        self.routes = routes
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S),
                    auto_decompress=False,
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.session is not None:
                    await self.session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if scope["path"] == "/healthz":
            await _answer(send, 200, b"application/json", b'{"status":"ok"}')
            return
        try:
            base = self.routes[json.loads(body)["model"]]
        except (ValueError, KeyError, TypeError):
            await _answer(send, 404, b"application/json", NOT_FOUND)
            return
        assert self.session is not None  # noqa: S101  (lifespan started it)
        headers = {"content-type": "application/json"}
        async with self.session.post(base + scope["path"], data=body, headers=headers) as upstream:
            content_type = upstream.headers.get("content-type", "application/json").encode()
            if not content_type.startswith(STREAMING):
                await _answer(send, upstream.status, content_type, await upstream.read())
                return
            start = {"type": "http.response.start", "status": upstream.status}
            await send({**start, "headers": [(b"content-type", content_type)]})
            async for chunk in upstream.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})


async def _answer(send: Any, status: int, content_type: bytes, body: bytes) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


application = BareProxy(routes_parse(os.environ.get("BENCH_BARE_UPSTREAMS", "")))
