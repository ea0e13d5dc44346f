"""Per-process resources of the gateway, created once and shared by every request.

One HTTP client (``gateway.http1``, see ``gateway.upstream``) and one Redis pool per process (the hot
path's commands share round trips through ``gateway.redisbatch``), the key set, the policy snapshot, the
upstream pool, the revocation watcher and the audit sink, plus the background tasks that keep them fresh.
Started by the ASGI lifespan (or by the first request when a server has none).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import redis.asyncio as aioredis
from django.conf import settings

from audit.compact_json import json_parse
from audit.context import ip_in_networks, trusted_networks
from audit.sink import AuditSink, LocalSink, RedisStreamSink
from audit.spool import spool_adopt
from authserver.revocation import CHANNEL as REVOCATION_CHANNEL
from authserver.revocation import KEYS_CHANNEL, key_listeners, local_revocations
from authserver.selectors import jwks_get, revocations_live
from gateway import errors
from gateway.auth import KeySet, Principal, TokenVerifier
from gateway.conf import GatewaySettings, gateway_settings
from gateway.dbread import db_read
from gateway.http1 import HttpError
from gateway.metrics import AUDIT_FULL_REFUSALS, REDIS_FALLBACKS, redis_reply_waited
from gateway.policy import FULL_RELOAD_S, PolicyCache
from gateway.ratelimit import LocalLimiter, RedisLimiter
from gateway.redisbatch import RedisBatcher
from gateway.revocation import (
    REVOCATION_FULL_RELOAD_S,
    REVOCATION_LATE_S,
    REVOCATION_RELOAD_S,
    REVOCATION_RETRY_S,
    RevocationWatcher,
)
from gateway.services import POLICY_CHANNEL, policy_listener_add, policy_listener_remove
from gateway.upstream import UpstreamPool, upstream_client

logger = logging.getLogger(__name__)

AUDIT_FULL_CHECK_S = 1.0  # how often an idle gateway looks whether a full audit backlog has drained
SPOOL_SCAN_S = 5.0  # how often a gateway looks for spool files that stopped processes left
REDIS_POOL_SIZE = 128  # requests beyond this wait (up to 10 s) for a connection: a busy pool is not an outage
FIRST_LOAD_RETRY_S = 1.0  # until the key set and the policies have loaded once, tried again this often
FIRST_LOAD_WAIT_S = 1.0  # a request waits at most this long for such a load under way, then a 503


class NotReady(errors.GatewayError):
    """The process has not loaded the signing keys or the policies since it started (the database or the
    JWKS URL was unreachable): it cannot judge a token, so a 503, not a 401 saying the token is invalid
    (clients throw those away; OpenAI SDKs retry a 503)."""

    status, type, code = 503, "api_error", "gateway_not_ready"
    message = "The gateway has not loaded its signing keys and policies yet; try again shortly."

    def __init__(self) -> None:
        super().__init__()
        self.headers["retry-after"] = "1"


def redis_pool_open(url: str) -> aioredis.Redis:
    """One Redis client per process over a pool that makes callers wait (not fail) when all are busy."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=REDIS_POOL_SIZE, timeout=10.0, socket_connect_timeout=1.0, socket_timeout=2.0
    )
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: closing it closes the connections


class Runtime:
    def __init__(self, conf: GatewaySettings) -> None:
        self.conf = conf
        self.http = upstream_client(conf.max_connections, conf.connect_timeout_s, conf.read_timeout_s)
        self.redis = redis_pool_open(settings.REDIS_URL) if settings.REDIS_URL else None
        self.keys = KeySet(self._fetch_jwks, refetch_interval_s=conf.jwks_refresh_s)
        self.verifier = TokenVerifier(conf, self.keys)
        self.policies = PolicyCache()
        self.upstreams = UpstreamPool(
            conf.upstreams, self.http, conf.upstream_api_key, max_connections=conf.max_connections
        )
        self.watcher = RevocationWatcher()
        self.batcher = (
            RedisBatcher(self.redis, reply_wait_s=conf.redis_reply_wait_s, waited=redis_reply_waited)
            if self.redis is not None
            else None
        )
        self.sink: AuditSink = (
            RedisStreamSink(
                self.redis,
                self.batcher,
                backlog_limit=conf.audit_backlog_limit,
                buffer_limit=conf.audit_buffer_limit,
            )
            if self.redis is not None
            else LocalSink(buffer_limit=conf.audit_buffer_limit)
        )
        self.limiter_redis = RedisLimiter(self.batcher) if self.batcher is not None else None
        self.limiter_local = LocalLimiter()
        self.trusted_proxies = tuple(settings.PORTCULLIS_TRUSTED_PROXIES)
        self.deny_networks = trusted_networks(tuple(conf.deny_ips))
        self.resource_metadata_url = f"{conf.issuer}/.well-known/oauth-protected-resource"
        self.fallback_ceiling_rpm = conf.fallback_ceiling_rpm
        self.redis_down_since: float | None = None
        self.redis_fallbacks = 0
        self.audit_full_since: float | None = None
        self.audit_unrecorded = 0  # refusals counted, not recorded one by one, in the current full period
        self._cleared: dict[str, float] = {}
        self._revocations_loaded = False  # the database's record of revocations was read once
        self._revocations_failing = False  # the last reload could not read it (logged once an outage)
        self._revoked_through: datetime | None = None  # the newest revocation read: the next read's mark
        self._revocations_full_at: float | None = None  # when (monotonic) every row was last read
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = False  # the key set and the policies have loaded once (never false again)
        self._first_load: asyncio.Task[None] | None = None  # the one load attempt under way, until ready

    async def _fetch_jwks(self) -> dict[str, Any]:
        if self.conf.jwks_url:
            status, body = await self.http.get(self.conf.jwks_url, timeout_s=5.0)
            if status != 200:
                raise HttpError(f"the key set at {self.conf.jwks_url} answered {status}")
            document: dict[str, Any] = json.loads(body)
            return document
        return await db_read(jwks_get)

    async def start(self) -> None:
        """Load what the hot path needs, then keep it fresh in the background."""
        self._loop = asyncio.get_running_loop()
        local_revocations.listeners.append(self._local_revocation)  # before the first catch-up: none missed
        await asyncio.gather(
            self.keys.refresh(),
            self.policies.reload(),
            self.upstreams.check_all(),
            self._revocations_reload(),
        )
        await self._spool_adopt()
        await self.sink.start()
        if self.batcher is not None:
            self.batcher.start()
        key_listeners.append(self._local_keys)
        policy_listener_add(self._local_policy)
        keys_s, policies_s = self.reload_intervals()
        self._every(keys_s, self.keys.refresh)
        self._every(policies_s, self.policies.reload)
        self._tasks.append(asyncio.create_task(self._revocations_loop(), name="gateway-revocations"))
        self._every(self.conf.health_interval_s, self.upstreams.check_all)
        self._every(SPOOL_SCAN_S, self._spool_adopt)
        self._every(AUDIT_FULL_CHECK_S, self._audit_full_check)
        if self.redis is not None:
            self._tasks.append(asyncio.create_task(self._subscribe(), name="gateway-pubsub"))
        if not self.ready:  # started while the database (or the JWKS URL) was unreachable
            self._tasks.append(asyncio.create_task(self._first_load_loop(), name="gateway-first-load"))

    @property
    def ready(self) -> bool:
        """Whether the key set and the policies have loaded once: until then no token can be judged."""
        if not self._ready:
            self._ready = self.keys.loaded and self.policies.loaded
        return self._ready

    async def ready_wait(self) -> None:
        """Before a request's token is judged by a process not ready yet: wait for the one load attempt
        under way, at most FIRST_LOAD_WAIT_S, or not at all between attempts; raise NotReady if still not
        ready. One attempt at a time, in the background: requests neither start their own (each waited
        for the database pool's timeout, queued for the loop's few threads) nor wait for long."""
        attempt = self._first_load
        if attempt is not None and not attempt.done():
            await asyncio.wait([attempt], timeout=FIRST_LOAD_WAIT_S)  # neither cancels it nor raises
        if not self.ready:
            raise NotReady()

    async def _first_load_loop(self) -> None:
        """Until ready: load what is missing (the key set, the policies), one attempt at a time, every
        FIRST_LOAD_RETRY_S after the last one ended. Their own refreshers log each failure."""
        started = time.monotonic()
        while not self.ready:
            await asyncio.sleep(FIRST_LOAD_RETRY_S)
            self._first_load = asyncio.create_task(self._load_missing())
            await self._first_load  # cancelled with it at stop
        logger.warning(
            "the key set and the policies loaded %.1f s after start: tokens are judged again",
            time.monotonic() - started,
        )

    async def _load_missing(self) -> None:
        jobs: list[Awaitable[bool]] = []
        if not self.keys.loaded:
            jobs.append(self.keys.refresh())
        if not self.policies.loaded:
            jobs.append(self.policies.reload())
        await asyncio.gather(*jobs)

    def reload_intervals(self) -> tuple[float, float]:
        """How often the key set and the policies are read again. With Redis, every change is also pushed
        to every process; without it (the embedded default) only the server's own are, and what another
        process changes (``bin/manage setpolicy``, ``rotatekeys --revoke``) is read as often as
        revocations."""
        if self.redis is not None:
            return self.conf.jwks_max_age_s, FULL_RELOAD_S
        return min(self.conf.jwks_max_age_s, REVOCATION_RELOAD_S), min(FULL_RELOAD_S, REVOCATION_RELOAD_S)

    async def stop(self) -> None:
        """Cancel the background tasks, hand off buffered records, close the pools."""
        if self._local_revocation in local_revocations.listeners:
            local_revocations.listeners.remove(self._local_revocation)
        policy_listener_remove(self._local_policy)
        if self._local_keys in key_listeners:
            key_listeners.remove(self._local_keys)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.sink.stop()
        if self.batcher is not None:
            await self.batcher.stop()
        unsettled = self.limiter_redis.unsettled() if self.limiter_redis is not None else 0
        if unsettled:
            # Not spooled as the audit records are (a settlement applies once, so another process could send
            # them: not built yet): their slots expire after 15 minutes, their reservations are never
            # refunded. Said, and audited with the records spooled next, not left as "will retry".
            logger.error("%d settlements could not reach Redis before stopping; they are lost", unsettled)
            self._system_event("gateway.settlements_lost", "failure", {"settlements": unsettled})
        self._spool()
        await self.upstreams.close()
        await self.http.close()
        if self.redis is not None:
            await self.redis.aclose()

    def _every(self, interval_s: float, job: Callable[[], Awaitable[Any]]) -> None:
        async def loop() -> None:
            while True:
                await asyncio.sleep(interval_s)
                try:
                    await job()
                except Exception:  # a failing refresh keeps the previous state; logged with its name
                    logger.exception("background refresh %s failed", getattr(job, "__qualname__", job))

        self._tasks.append(asyncio.create_task(loop()))

    # --- per-request helpers -------------------------------------------------------------------

    def check_ip_denylist(self, ip: str | None) -> None:
        """Refuse globally denied addresses before anything costly."""
        if self.deny_networks and ip_in_networks(ip, self.deny_networks):
            raise errors.IpNotAllowed()

    def check_ip_allowlist(self, principal: Principal, ip: str | None) -> None:
        """Refuse a client's call from outside its allowlist."""
        if not self.policies.get(principal.client_id).ip_allowed(ip):
            raise errors.IpNotAllowed()

    @staticmethod
    def upstream_error(status: int, data: bytes) -> errors.GatewayError:
        """Map an upstream error to ours: a 4xx keeps vLLM's message (it is about the request), a 5xx not.

        Two 4xx are not about the client's request: a 401 or 403 is vLLM refusing the gateway's own key
        (``VLLM_API_KEY``), a 502 for the client and an error for the operator; a 404 is the model gone
        from the upstream since it was discovered, the gateway's own "not served here"."""
        if status in (401, 403):
            logger.error(
                "the upstream refused the gateway's credentials (HTTP %d): check VLLM_API_KEY", status
            )
            return errors.UpstreamFailed()
        if status == 404:
            return errors.ModelNotFound("The model is not served here.", param="model")
        if status == 429:  # an upstream (or a router before it) at capacity: to retry, not to change
            busy = errors.UpstreamBusy("The upstream is at capacity; try again shortly.")
            busy.headers["retry-after"] = "1"
            return busy
        if 400 <= status < 500:
            try:
                message = json.loads(data)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = None
            exc = errors.InvalidRequest(message if isinstance(message, str) and len(message) < 2000 else None)
            exc.code = "upstream_rejected"  # type: ignore[misc]
            return exc
        return errors.UpstreamFailed()

    @staticmethod
    def answer_parse(data: bytes) -> dict[str, Any] | None:
        """An upstream's whole answer as a JSON object, or None: not JSON (cut short, an HTML page, NaN,
        which the standard library reads but no client can), too deeply nested, not an object, or an error
        object said with a 200 (vLLM gives an error its status; a router or proxy before it may not, and
        relayed, the client got the upstream's internals as a success)."""
        try:
            answer = json_parse(data, constants=False)
        except (ValueError, RecursionError):
            return None
        if not isinstance(answer, dict):
            return None
        if "error" in answer and "choices" not in answer and "data" not in answer:
            return None
        return answer

    def redis_available(self, jti: str) -> None:
        """Redis answered for this token: remember when it was cleared; end a fallback period."""
        now = time.monotonic()
        self._cleared[jti] = now
        if len(self._cleared) > 100_000:
            horizon = now - self.conf.revocation_stale_s
            self._cleared = {j: t for j, t in self._cleared.items() if t > horizon}
        if self.redis_down_since is not None:
            logger.warning("Redis is back after %.1f s; shared limits resume", now - self.redis_down_since)
            self._system_event(
                "gateway.redis_recovered", "success", {"down_s": round(now - self.redis_down_since, 1)}
            )
            self.redis_down_since = None

    def redis_unavailable(self) -> None:
        """Count a fallback; log and audit the start of an outage once."""
        self.redis_fallbacks += 1
        REDIS_FALLBACKS.inc()
        if self.redis_down_since is None:
            self.redis_down_since = time.monotonic()
            logger.error("Redis is unreachable: per-process fallback limits in force")
            self._system_event(
                "gateway.redis_unavailable",
                "failure",
                {"posture": "per-process fallback limits; revocation fails closed"},
            )

    def audit_full(self) -> bool:
        """Whether the audit records waiting to be stored have reached their limit, so that a new request
        must be refused (and a refused connection goes unrecorded) until they drain.

        Such refusals are counted, not recorded one by one: their records would fill the backlog further.
        The start of a full period is audited once, and its end with how long it lasted and the count.
        """
        if self._audit_full_watch():
            self.audit_unrecorded += 1
            AUDIT_FULL_REFUSALS.inc()
            return True
        return False

    async def _audit_full_check(self) -> None:
        """Every second: a full period ends when the backlog drains, not at the next request."""
        self._audit_full_watch()

    def _audit_full_watch(self) -> bool:
        """Whether the audit backlog is full; audit the start and the end of each full period."""
        if self.sink.full:
            if self.audit_full_since is None:
                self.audit_full_since = time.monotonic()
                logger.error("the audit backlog is full: new requests are refused until it drains")
                self._system_event(
                    "gateway.audit_backlog_full",
                    "failure",
                    {
                        "stream": self.sink.stream_backlog,
                        "in_process": self.sink.backlog,
                        "posture": "new requests refused (503) until the audit backlog drains",
                    },
                )
            return True
        if self.audit_full_since is not None:
            lasted = round(time.monotonic() - self.audit_full_since, 1)
            logger.warning("the audit backlog drained after %.1f s; requests are served again", lasted)
            self._system_event(
                "gateway.audit_backlog_recovered",
                "success",
                {"full_s": lasted, "refused": self.audit_unrecorded},
            )
            self.audit_full_since, self.audit_unrecorded = None, 0
        return False

    async def _spool_adopt(self) -> None:
        """Take up records that stopped processes spooled (Redis would not take them): they go first. At
        start and every few seconds, while Redis is up and this process holds less than half its buffer,
        and at most that much at a time."""
        if not isinstance(self.sink, RedisStreamSink) or self.redis_down_since is not None:
            return
        room = self.conf.audit_buffer_limit // 2 - self.sink.backlog
        if room <= 0:
            return
        scan = await asyncio.to_thread(spool_adopt, self.conf.audit_spool_dir, room)  # reads off the loop
        if scan.recovered:  # a process died while it spooled: its stop was not clean
            self._system_event("gateway.audit_spool_recovered", "failure", {"files": scan.recovered})
        if scan.set_aside:  # their records are kept, but none is ingested until a person looks
            self._system_event("gateway.audit_spool_set_aside", "failure", {"files": scan.set_aside})
        if scan.cut_short:  # a last record cut off mid-way when its writer died: lost
            self._system_event("gateway.audit_spool_cut_short", "failure", {"files": scan.cut_short})
        adopted = self.sink.adopt(scan.adopted)
        if adopted:
            logger.warning("%d spooled audit records adopted; they are handed off first", adopted)
            self._system_event("gateway.audit_spool_adopted", "success", {"records": adopted})

    def _spool(self) -> None:
        """At stop: what Redis did not take goes to a spool file for the next process to start."""
        held = self.sink.backlog
        if not isinstance(self.sink, RedisStreamSink):
            if held:
                logger.error("%d audit records could not be handed off before stopping; they are lost", held)
            return
        if not held:
            self.sink.spool(self.conf.audit_spool_dir)  # writes nothing; lets go of adopted files, handed off
            return
        self._system_event("gateway.audit_spooled", "failure", {"records": held})  # with them, counted
        try:
            self.sink.spool(self.conf.audit_spool_dir)
        except OSError:
            logger.exception(
                "%d audit records could not be handed off nor spooled in %s before stopping; they are lost",
                held,
                self.conf.audit_spool_dir,
            )
            return
        logger.error(
            "%d audit records could not be handed off before stopping; spooled in %s for the next start",
            held,
            self.conf.audit_spool_dir,
        )

    def _system_event(self, kind: str, outcome: str, data: dict[str, Any]) -> None:
        """Audit one event of this process's own (an outage, a full backlog), not of a client's request."""
        self.sink.event({"kind": kind, "outcome": outcome, "actor": "system", "data": data})

    def recently_cleared(self, jti: str) -> bool:
        """Whether Redis cleared this token recently enough to keep serving it while Redis is down."""
        cleared = self._cleared.get(jti)
        return cleared is not None and time.monotonic() - cleared < self.conf.revocation_stale_s

    async def _revocations_loop(self) -> None:
        while True:  # every second until the first read succeeds (the database was down at start)
            await asyncio.sleep(REVOCATION_RELOAD_S if self._revocations_loaded else REVOCATION_RETRY_S)
            try:
                await self._revocations_reload()
            except Exception:  # a failing catch-up keeps the previous state
                logger.exception("background refresh of revocations failed")

    def _revocations_since(self) -> datetime | None:
        """Where the next read starts: nowhere (every row) at first and every REVOCATION_FULL_RELOAD_S, else
        the newest revocation read less REVOCATION_LATE_S (rows that commit late; see there)."""
        full_at = self._revocations_full_at
        if full_at is None or self._revoked_through is None:
            return None
        if time.monotonic() - full_at >= REVOCATION_FULL_RELOAD_S:
            return None
        return self._revoked_through - timedelta(seconds=REVOCATION_LATE_S)

    async def _revocations_reload(self) -> bool:
        """Catch up with the revocations the database records (off the hot path; the old state is kept if
        it cannot be read): at start, what was revoked before this process began (the embedded default kept
        it in a process that is gone, and Redis may have restarted empty); later, what no push told it, read
        from a high-water mark."""
        since = self._revocations_since()
        try:
            snapshot = await db_read(partial(revocations_live, since=since))
        except Exception:  # database down: keep what this process knows; the reason is logged, once
            if not self._revocations_failing:
                logger.exception("revocation reload failed; keeping the revocations this process knows")
            self._revocations_failing = True
            return False
        if self._revocations_failing:
            logger.warning("revocation reload works again")
            self._revocations_failing = False
        if since is None:
            self._revocations_full_at = time.monotonic()
        if snapshot.revoked_through is not None:
            mark = self._revoked_through
            self._revoked_through = max(mark, snapshot.revoked_through) if mark else snapshot.revoked_through
        caught = self.watcher.catch_up(snapshot)
        if self.redis is None:  # the embedded default's admission asks the in-process store
            local_revocations.catch_up(snapshot)
        if caught["jtis"] or caught["clients"]:  # at start, expected; later, pushes were missed
            logger.log(
                logging.WARNING if self._revocations_loaded else logging.INFO,
                "the database recorded %d revoked tokens and %d disabled clients no push told this process",
                len(caught["jtis"]),
                len(caught["clients"]),
            )
        self._revocations_loaded = True
        return True

    # --- pushes ----------------------------------------------------------------------------------

    def _local_revocation(self, message: dict[str, Any]) -> None:
        # Called from whichever thread revoked (a Django view runs in a worker thread).
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.watcher.apply, message)

    def _local_keys(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.keys.refresh()))

    def _local_policy(self, client_key: str) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.policies.reload()))

    async def _subscribe(self) -> None:
        assert self.redis is not None  # noqa: S101  (only started with Redis)
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(REVOCATION_CHANNEL, POLICY_CHANNEL, KEYS_CHANNEL)
                async for message in pubsub.listen():
                    self._on_message(message)
            except asyncio.CancelledError:
                await pubsub.aclose()
                raise
            except Exception:  # Redis went away: resubscribe; the hot path's own check still denies
                logger.warning("revocation/policy subscription lost; reconnecting")
                await pubsub.aclose()
                await asyncio.sleep(1.0)

    def _on_message(self, message: dict[str, Any]) -> None:
        channel = message.get("channel")
        channel = channel.decode() if isinstance(channel, bytes) else channel
        try:
            data = json.loads(message["data"])
        except (TypeError, ValueError, KeyError):
            return
        if channel == REVOCATION_CHANNEL:
            self.watcher.apply(data)
        elif channel == POLICY_CHANNEL:
            asyncio.ensure_future(self.policies.reload())
        elif channel == KEYS_CHANNEL:
            asyncio.ensure_future(self.keys.refresh())


_runtime: Runtime | None = None
_lock: asyncio.Lock | None = None


async def runtime_get() -> Runtime:
    """Return this process's runtime, starting it on first use."""
    global _runtime, _lock
    if _runtime is None:
        _lock = _lock or asyncio.Lock()
        async with _lock:
            if _runtime is None:
                runtime = Runtime(gateway_settings())
                await runtime.start()
                _runtime = runtime
    return _runtime


def runtime_current() -> Runtime | None:
    """This process's runtime if it has started, else None (for code outside a request, which cannot wait)."""
    return _runtime


async def runtime_stop() -> None:
    """Stop this process's runtime (ASGI lifespan shutdown)."""
    global _runtime
    if _runtime is not None:
        runtime, _runtime = _runtime, None
        await runtime.stop()
