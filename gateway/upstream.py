"""Upstream vLLM servers: which models each serves, whether it is healthy, and how to pick one.

Each process learns the models from every upstream's ``/v1/models``, checks ``/health`` periodically,
sends a request to the healthy upstream of the model with the fewest requests in flight, and tries the
next one when a connection fails before the first byte. An upstream that answers 5xx is checked again at
once, and goes last until that check concludes (``suspect``): a vLLM whose engine died still takes
connections, answers every request 500, and says so only at ``/health`` (503). All failures map to a
few gateway errors here.

Upstream calls go through one ``gateway.http1.HttpClient`` per process (see ``upstream_client``), not
through ``httpx.AsyncClient`` or an ``aiohttp.ClientSession``: measured on this project's 2-core machine,
a proxied request costs ~29 µs of the gateway's CPU through it at 32 concurrent requests, ~87 µs through
aiohttp (and, on an earlier VM, ~220 µs through httpx over the httpx-aiohttp adapter against aiohttp's
66: ``python -m bench.micro``; bench/README.md has the figures), and the gateway's whole budget at 3,000
requests/s is ~330 µs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from audit.compact_json import json_parse
from gateway.errors import UpstreamBusy, UpstreamFailed, UpstreamTimeout, UpstreamUnavailable
from gateway.http1 import (
    ConnectFailed,
    ConnectTimeout,
    Disconnected,
    HttpClient,
    HttpError,
    Origin,
    PoolTimeout,
    ReadTimeout,
    Response,
    url_split,
)
from gateway.metrics import UPSTREAM_HEALTHY

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 5.0

# A refused connection means the upstream is down. A connection that dropped before the answer (often a
# keep-alive connection the upstream had just closed) is retried once on the same upstream first. A wait
# for one of our own pooled connections says nothing about the upstream.
UPSTREAM_KEEPALIVE_S = 4.0  # below uvicorn's (and so vLLM's) 5 s keep-alive, so we never reuse a closed one
POOL_WAIT_S = 5.0  # how long a request may wait for a free connection when all are busy
RECHECK_MIN_S = 0.5  # a 5xx answer checks its upstream's health at once, unless it was checked this recently


def upstream_client(max_connections: int, connect_timeout_s: float, read_timeout_s: float) -> HttpClient:
    """The process's one HTTP client. It keeps no cookies, follows no redirects and never decompresses:
    bytes go to the client as the upstream sent them. ``read_timeout_s`` bounds the silence between two
    reads (a stream may run long, but not stall), as vLLM's own client does."""
    return HttpClient(
        max_connections=max_connections,
        connect_timeout_s=connect_timeout_s,
        read_timeout_s=read_timeout_s,
        pool_wait_s=POOL_WAIT_S,
        keepalive_s=UPSTREAM_KEEPALIVE_S,
    )


async def upstream_read(response: Response) -> bytes:
    """Read a whole upstream answer, mapping transport failures to gateway errors."""
    try:
        return await response.read()
    except ReadTimeout:
        raise UpstreamTimeout() from None
    except (HttpError, OSError):
        raise UpstreamFailed() from None


@dataclass
class Upstream:
    base: str
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # model id -> its model card
    healthy: bool = False
    inflight: int = 0
    checked_at: float = 0.0
    suspect_at: float = 0.0  # when it last answered 5xx, until a health check begun after that concludes
    answered_at: float = 0.0  # when it last answered a request with a status below 500

    def __str__(self) -> str:
        return self.base


SUSPECT_LAST = 1 << 40  # added to a suspect's in-flight count: it is tried after every other upstream


def _preference(upstream: Upstream) -> int:
    return upstream.inflight + (SUSPECT_LAST if upstream.suspect_at else 0)


class UpstreamPool:
    def __init__(
        self,
        bases: tuple[str, ...],
        client: HttpClient,
        api_key: str,
        *,
        max_connections: int = 0,
    ) -> None:
        self.upstreams = [Upstream(base=b.rstrip("/")) for b in bases]
        self.max_connections = max_connections  # the session's pool size (0: unbounded)
        self.client = client
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._urls: dict[tuple[str, str], tuple[Origin, bytes]] = {}
        self._turn = 0
        self._known: frozenset[str] = frozenset()
        self._rechecks: dict[str, asyncio.Task[None]] = {}  # upstream base -> its check, a 5xx started

    # --- discovery and health --------------------------------------------------------------------

    async def check(self, upstream: Upstream) -> None:
        """Refresh one upstream's health and model list (and clear a suspicion older than the check)."""
        begun = time.monotonic()
        headers = self.headers.items()
        busy = self.saturated()  # the check may first wait for a pooled connection, inside its timeout
        why = ""  # what made it unhealthy, for the log
        try:
            status, _ = await self.client.get(f"{upstream.base}/health", headers, HEALTH_TIMEOUT_S)
            healthy = status == 200
            why = "" if healthy else f"/health answered {status}"
            status, models = await self.client.get(f"{upstream.base}/v1/models", headers, HEALTH_TIMEOUT_S)
            if healthy and status != 200:
                healthy, why = False, f"/v1/models answered {status}"
            if healthy:
                # no NaN or Infinity: copied into the gateway's own /v1/models, they made it invalid JSON
                cards = json_parse(models, constants=False).get("data", [])
                upstream.models = {
                    c["id"]: c for c in cards if isinstance(c, dict) and isinstance(c.get("id"), str)
                }
                self._known = frozenset(m for u in self.upstreams for m in u.models)
        except (
            HttpError,
            OSError,
            TimeoutError,
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
            RecursionError,
        ) as exc:  # RecursionError: a model list nested past the parser's limit stopped the gateway starting
            if busy or self.saturated():
                return  # the check waited for a pooled connection, not for the upstream: no verdict
            if isinstance(exc, TimeoutError) and upstream.answered_at >= begun:
                # It answered requests while its check waited: busy, not down. An upstream whose event loop
                # is behind (1,000 streams at once) answers its /health late too, and a verdict here took
                # it out of rotation for a round: every request meanwhile got a 503 (bench/README.md).
                return
            healthy, why = False, type(exc).__name__
        UPSTREAM_HEALTHY.labels(upstream.base).set(1 if healthy else 0)
        if healthy != upstream.healthy:
            state = "healthy" if healthy else f"unhealthy ({why})"
            logger.warning("upstream %s is now %s", upstream, state)
        upstream.healthy = healthy
        upstream.checked_at = time.monotonic()
        if upstream.suspect_at <= begun:  # a 5xx answered during the check waits for the next one
            upstream.suspect_at = 0.0

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(u) for u in self.upstreams))

    def suspect(self, upstream: Upstream) -> None:
        """An upstream answered 5xx: check its health now, in the background, rather than at the next round
        (one check at a time per upstream, and ``RECHECK_MIN_S`` at least after the last), and until a check
        begun after this answer concludes, send it requests only when no other healthy upstream of the
        model can take them (``candidates``).

        A vLLM whose engine died answers 500 until its check says so, and the requests that came meanwhile
        went to it in their turn: every other one failed while the check ran. It is not taken out of
        rotation on the 5xx alone: a request can make vLLM answer 500, and an upstream that a client could
        switch off that way would be a lever on everyone's traffic; at worst it moves requests to the other
        upstreams until the next check concludes (within ``RECHECK_MIN_S`` and the check's own time)."""
        now = time.monotonic()
        upstream.suspect_at = now
        if upstream.base in self._rechecks:
            return
        wait_s = max(0.0, upstream.checked_at + RECHECK_MIN_S - now)
        task = asyncio.create_task(self._recheck(upstream, wait_s), name=f"upstream-recheck {upstream.base}")
        self._rechecks[upstream.base] = task
        task.add_done_callback(lambda _done: self._rechecks.pop(upstream.base, None))

    async def _recheck(self, upstream: Upstream, wait_s: float) -> None:
        while True:
            if wait_s > 0:  # checked moments ago: the next check comes when RECHECK_MIN_S has passed
                await asyncio.sleep(wait_s)
            begun = time.monotonic()
            await self.check(upstream)
            if upstream.suspect_at <= begun:
                return
            wait_s = RECHECK_MIN_S  # a 5xx came while it checked: that one gets a check of its own

    async def close(self) -> None:
        """Cancel the checks a 5xx started (before the HTTP client they use is closed)."""
        tasks = list(self._rechecks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

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
        """Healthy upstreams of the model, fewest in flight first (a suspect last, ``suspect``); ties taken in
        turn (round robin)."""
        found = [u for u in self.upstreams if u.healthy and model in u.models]
        if len(found) < 2:
            return found
        self._turn += 1
        turn = self._turn % len(found)
        found = found[turn:] + found[:turn]  # rotate, then a stable sort keeps the rotation among ties
        found.sort(key=_preference)
        return found

    # --- requests ----------------------------------------------------------------------------------

    def request(self, model: str, path: str, body: bytes, headers: dict[str, str]) -> UpstreamCall:
        """``async with pool.request(...) as (upstream, response)``: a streamed POST to the best upstream
        of the model, the next one tried on a connect failure."""
        return UpstreamCall(self, model, path, body, headers)

    async def _open(
        self, upstream: Upstream, path: str, body: bytes, headers: dict[str, str]
    ) -> Response | None:
        """Send to one upstream; None means try the next. In-flight is counted while a response is open."""
        url = self._urls.get((upstream.base, path))
        if url is None:
            url = self._urls[(upstream.base, path)] = url_split(upstream.base + path)
        for attempt in (1, 2):
            upstream.inflight += 1
            try:
                return await self.client.request("POST", url, headers.items(), body)
            except ConnectFailed:
                upstream.inflight -= 1
                break
            except PoolTimeout:  # the wait was for one of our own pooled connections: the upstream is fine
                upstream.inflight -= 1
                raise UpstreamBusy() from None
            except (ConnectTimeout, Disconnected):
                upstream.inflight -= 1
                if attempt == 2:
                    break
            except ReadTimeout:
                upstream.inflight -= 1
                raise UpstreamTimeout() from None
            except (HttpError, OSError, ValueError):  # ValueError: a header the request line cannot carry
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


class UpstreamCall:
    """One call of ``UpstreamPool.request``: its response is open while the ``async with`` block runs, and
    at the block's end its connection goes back to the pool if the answer was read to its end, or is closed
    (which makes vLLM abort the generation). A class, not ``asynccontextmanager``: ~12,000 instructions less
    a request (bench/README.md, session 23)."""

    __slots__ = ("_body", "_headers", "_model", "_path", "_pool", "_response", "_upstream")

    def __init__(
        self, pool: UpstreamPool, model: str, path: str, body: bytes, headers: dict[str, str]
    ) -> None:
        self._pool, self._model, self._path, self._body, self._headers = pool, model, path, body, headers
        self._upstream: Upstream | None = None
        self._response: Response | None = None

    async def __aenter__(self) -> tuple[Upstream, Response]:
        pool = self._pool
        candidates = pool.candidates(self._model)
        if not candidates:
            raise UpstreamUnavailable()
        merged = {
            **self._headers,
            **pool.headers,
            "content-type": "application/json",
            "accept-encoding": "identity",
        }
        for upstream in candidates:
            response = await pool._open(upstream, self._path, self._body, merged)
            if response is None:
                continue
            if response.status >= 500:
                pool.suspect(upstream)
            else:
                upstream.answered_at = time.monotonic()
            self._upstream, self._response = upstream, response
            return upstream, response
        raise UpstreamUnavailable()

    async def __aexit__(self, *exc_info: object) -> None:
        upstream, response = self._upstream, self._response
        if upstream is None or response is None:
            return  # never opened
        upstream.inflight -= 1
        if response.is_eof():
            response.release()  # read to the end: the connection goes back to the pool
        else:
            response.close()  # cut short: closing the connection makes vLLM abort the generation
