"""Upstream vLLM servers: which models each serves, whether it is healthy, and how to pick one.

Each process learns the models from every upstream's ``/v1/models``, checks ``/health`` periodically,
sends a request to the healthy upstream of the model with the fewest requests in flight, and tries the
next one when a connection fails before the first byte. All failures map to a few gateway errors here.

Upstream calls go through one ``aiohttp.ClientSession`` per process (see ``upstream_session``), not
through ``httpx.AsyncClient``: measured on this project's 2-core machine, httpx's client layer plus the
httpx-aiohttp adapter cost ~280 µs of CPU per proxied request at 32 concurrent requests against aiohttp's
~82 µs (bench/README.md has the figures), and the gateway's whole budget at 3,000 requests/s is ~330 µs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from yarl import URL

from gateway.errors import UpstreamBusy, UpstreamFailed, UpstreamTimeout, UpstreamUnavailable
from gateway.metrics import UPSTREAM_HEALTHY

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 5.0

# A refused connection means the upstream is down. A connection that dropped before the answer (often a
# keep-alive connection the upstream had just closed) is retried once on the same upstream first. The
# order of the except clauses matters: ClientConnectorError is an OSError, a connect timeout a timeout.
REFUSED = (aiohttp.ClientConnectorError,)
DROPPED = (aiohttp.ConnectionTimeoutError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)
TIMEOUT = (aiohttp.ServerTimeoutError, TimeoutError)
UPSTREAM_KEEPALIVE_S = 4.0  # below uvicorn's (and so vLLM's) 5 s keep-alive, so we never reuse a closed one
POOL_WAIT_S = 5.0  # how long a request may wait for a free connection when all are busy


def upstream_session(max_connections: int, connect_timeout_s: float, read_timeout_s: float) -> Any:
    """The process's one HTTP client: a pooled aiohttp session that keeps no cookies and never decompresses.

    ``connect`` bounds the wait for a pooled connection plus the connect itself; ``sock_read`` bounds the
    silence between two reads (a stream may run long, but not stall), as vLLM's own client does.
    """
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=max_connections, limit_per_host=0, keepalive_timeout=UPSTREAM_KEEPALIVE_S
        ),
        timeout=aiohttp.ClientTimeout(
            total=None,
            connect=connect_timeout_s + POOL_WAIT_S,
            sock_connect=connect_timeout_s,
            sock_read=read_timeout_s,
        ),
        cookie_jar=aiohttp.DummyCookieJar(),  # an upstream's Set-Cookie must not ride along to the next call
        auto_decompress=False,  # bytes go to the client as the upstream sent them
        skip_auto_headers=("User-Agent",),
    )


async def upstream_read(response: aiohttp.ClientResponse) -> bytes:
    """Read a whole upstream answer, mapping transport failures to gateway errors."""
    try:
        return await response.read()
    except TIMEOUT:
        raise UpstreamTimeout() from None
    except (aiohttp.ClientError, OSError):
        raise UpstreamFailed() from None


@dataclass
class Upstream:
    base: str
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # model id -> its model card
    healthy: bool = False
    inflight: int = 0
    checked_at: float = 0.0

    def __str__(self) -> str:
        return self.base


def _inflight(upstream: Upstream) -> int:
    return upstream.inflight


class UpstreamPool:
    def __init__(
        self,
        bases: tuple[str, ...],
        client: aiohttp.ClientSession,
        api_key: str,
        *,
        max_connections: int = 0,
    ) -> None:
        self.upstreams = [Upstream(base=b.rstrip("/")) for b in bases]
        self.max_connections = max_connections  # the session's pool size (0: unbounded)
        self.client = client
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._urls: dict[tuple[str, str], URL] = {}
        self._turn = 0
        self._known: frozenset[str] = frozenset()

    # --- discovery and health --------------------------------------------------------------------

    async def check(self, upstream: Upstream) -> None:
        """Refresh one upstream's health and model list."""
        timeout = aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)
        try:
            async with self.client.get(
                f"{upstream.base}/health", headers=self.headers, timeout=timeout
            ) as health:
                healthy = health.status == 200
            async with self.client.get(
                f"{upstream.base}/v1/models", headers=self.headers, timeout=timeout
            ) as models:
                healthy = healthy and models.status == 200
                if healthy:
                    cards = json.loads(await models.read()).get("data", [])
                    upstream.models = {
                        c["id"]: c for c in cards if isinstance(c, dict) and isinstance(c.get("id"), str)
                    }
                    self._known = frozenset(m for u in self.upstreams for m in u.models)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, KeyError, TypeError, AttributeError):
            if self.saturated():
                return  # the check waited for a pooled connection, not for the upstream: no verdict
            healthy = False
        UPSTREAM_HEALTHY.labels(upstream.base).set(1 if healthy else 0)
        if healthy != upstream.healthy:
            logger.warning("upstream %s is now %s", upstream, "healthy" if healthy else "unhealthy")
        upstream.healthy = healthy
        upstream.checked_at = time.monotonic()

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(u) for u in self.upstreams))

    def model_cards(self) -> dict[str, dict[str, Any]]:
        """Return every model any healthy upstream serves, with its card."""
        cards: dict[str, dict[str, Any]] = {}
        for upstream in self.upstreams:
            if upstream.healthy:
                for model_id, card in upstream.models.items():
                    cards.setdefault(model_id, card)
        return cards

    def context_length(self, model: str) -> int | None:
        """Return the model's context length as its upstream reports it (max_model_len), if known."""
        for upstream in self.upstreams:
            card = upstream.models.get(model)
            if card is not None and isinstance(card.get("max_model_len"), int):
                return int(card["max_model_len"])
        return None

    def known_models(self) -> frozenset[str]:
        """Every model an upstream is known to serve (the allowlist for metric labels)."""
        return self._known

    def saturated(self) -> bool:
        """Whether every connection of the pool is held by a request in flight."""
        return 0 < self.max_connections <= sum(u.inflight for u in self.upstreams)

    def serves(self, model: str) -> bool:
        """Return whether any upstream (healthy or not) is known to serve the model."""
        return any(model in u.models for u in self.upstreams)

    def candidates(self, model: str) -> list[Upstream]:
        """Healthy upstreams of the model, fewest in flight first; ties taken in turn (round robin)."""
        found = [u for u in self.upstreams if u.healthy and model in u.models]
        if len(found) < 2:
            return found
        self._turn += 1
        turn = self._turn % len(found)
        found = found[turn:] + found[:turn]  # rotate, then a stable sort keeps the rotation among ties
        found.sort(key=_inflight)
        return found

    # --- requests ----------------------------------------------------------------------------------

    @asynccontextmanager
    async def request(
        self, model: str, path: str, body: bytes, headers: dict[str, str]
    ) -> AsyncIterator[tuple[Upstream, aiohttp.ClientResponse]]:
        """Open a streamed POST to the best upstream of the model; retry the next one on connect failure."""
        candidates = self.candidates(model)
        if not candidates:
            raise UpstreamUnavailable()
        merged = {
            **headers,
            **self.headers,
            "content-type": "application/json",
            "accept-encoding": "identity",
        }
        for upstream in candidates:
            response = await self._open(upstream, path, body, merged)
            if response is None:
                continue
            try:
                yield upstream, response
            finally:
                upstream.inflight -= 1
                if response.content.is_eof():
                    response.release()  # read to the end: the connection goes back to the pool
                else:
                    response.close()  # cut short: closing the connection makes vLLM abort the generation
            return
        raise UpstreamUnavailable()

    async def _open(
        self, upstream: Upstream, path: str, body: bytes, headers: dict[str, str]
    ) -> aiohttp.ClientResponse | None:
        """Send to one upstream; None means try the next. In-flight is counted while a response is open."""
        url = self._urls.get((upstream.base, path))
        if url is None:
            url = self._urls[(upstream.base, path)] = URL(upstream.base + path)
        for attempt in (1, 2):
            upstream.inflight += 1
            try:
                return await self.client.post(url, data=body, headers=headers)
            except REFUSED:
                upstream.inflight -= 1
                break
            except DROPPED as exc:
                busy = isinstance(exc, aiohttp.ConnectionTimeoutError) and self.saturated()
                upstream.inflight -= 1
                if busy:  # the wait was for one of our own pooled connections: the upstream is fine
                    raise UpstreamBusy() from None
                if attempt == 2:
                    break
            except TIMEOUT:
                upstream.inflight -= 1
                raise UpstreamTimeout() from None
            except (aiohttp.ClientError, OSError):
                upstream.inflight -= 1
                raise UpstreamFailed() from None
            except BaseException:  # cancelled while connecting: the slot is not held
                upstream.inflight -= 1
                raise
        upstream.healthy = False
        logger.warning(
            "upstream %s failed to connect; marked unhealthy until its next health check", upstream
        )
        return None
