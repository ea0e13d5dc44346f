"""Rate limits that stay exact under concurrency: one atomic reservation before the call, a settlement after.

Requests and LLM tokens per minute use GCRA (a "theoretical arrival time" per bucket, weighted by cost):
a limit of L per minute admits exactly L at once and then refills smoothly. Every reservation is a member
of its client's in-flight set, a sorted set with expiry scores, so a crashed process cannot leak slots
for ever: the set's size is the concurrency. A settlement sent again (its batch broke, its reply may
have been lost) applies only if it still removes its member, so it settles once; a first try always
applies, even for a request that outlived its slot. The member is the gateway's own reservation id,
never the client's ``X-Request-ID``, or requests sharing one id would share one slot. A daily token quota
is a counter per UTC day. With Redis, one Lua script checks the token's revocation key and every bucket and
commits all or nothing in one round trip; settlements ride along with later round trips. Without Redis
(the embedded default, or Redis down) the same arithmetic runs in process; when Redis is down the limits
are divided by ``FALLBACK_DIVISOR`` so that several replicas falling back together stay under the shared
limit.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from redis import exceptions as redis_exceptions

from authserver.revocation import revoked_key_jti
from gateway.auth import Principal
from gateway.redisbatch import RIDER_RETRY_S, Command, Packed, RedisBatcher
from gateway.selectors import Policy

logger = logging.getLogger(__name__)

# Every limit's name: what the admission script returns, the 429's ``code``, the metrics label. The
# message for each is in gateway.admission; tests/gateway/test_ratelimit.py checks all of them agree.
LIMITS = ("requests", "tokens", "user_requests", "user_tokens", "concurrency", "daily_tokens")
# the limits whose refusal the x-ratelimit-* headers speak for (a user's limit is not the client's)
HEADER_LIMITS = frozenset({"requests", "tokens"})
HEADER_NAMES = tuple(
    (dimension, tuple(f"x-ratelimit-{part}-{dimension}" for part in ("limit", "remaining", "reset")))
    for dimension in ("requests", "tokens")
)
WINDOW_MS = 60_000
DAY_TTL_S = 2 * 86_400
SLOT_TTL_MS = 15 * 60_000  # a slot not renewed for this long is a crashed process's, and is reclaimed
SLOT_RENEW_S = SLOT_TTL_MS / 3000  # a request still running renews its slot this often (``hold``)
FALLBACK_DIVISOR = 4  # Redis down: each process allows a quarter of each limit

# ARGV: the client's limits first (1 concurrency, 2 a slot's lifetime in ms, 3 the daily quota, 4 the day
# counter's lifetime in s, 5-8 requests, tokens, a user's requests and tokens a minute), then what each
# request brings (9 now in ms, 10 the reservation id, 11 its token cost, 12 ms to midnight UTC): the first
# part, with the client's keys before it, is packed once a day (``_admit_packed``)
ADMIT_LUA = """
if redis.call('EXISTS', KEYS[1]) > 0 then return {-1} end
local now = tonumber(ARGV[9])
local cost = tonumber(ARGV[11])
local conc = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if conc > 0 and redis.call('ZCARD', KEYS[2]) >= conc then return {0, 'concurrency', 1000} end
local quota = tonumber(ARGV[3])
local spent = 0
if quota > 0 then
  spent = tonumber(redis.call('GET', KEYS[3]) or '0')
  if spent + cost > quota then return {0, 'daily_tokens', tonumber(ARGV[12])} end
end
local names = {'requests', 'tokens', 'user_requests', 'user_tokens'}
local costs = {1, cost, 1, cost}
local tats = {}
local out = {1}
for i = 1, 4 do
  local limit = tonumber(ARGV[4 + i])
  if limit > 0 then
    local step = 60000 / limit
    local tat = tonumber(redis.call('GET', KEYS[3 + i]) or '0')
    if tat < now then tat = now end
    local new_tat = tat + costs[i] * step
    local excess = new_tat - now - 60000
    if excess > 0 then return {0, names[i], math.ceil(excess)} end
    tats[i] = new_tat
  end
end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[10])
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[2]))
if quota > 0 then
  redis.call('INCRBY', KEYS[3], cost)
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[4]))
end
for i = 1, 4 do
  if tats[i] then
    redis.call('SET', KEYS[3 + i], tats[i], 'PX', math.ceil(tats[i] - now) + 1000)
    table.insert(out, math.floor((60000 - (tats[i] - now)) / (60000 / tonumber(ARGV[4 + i]))))
    table.insert(out, math.ceil(tats[i] - now))
  else
    table.insert(out, -1)
    table.insert(out, 0)
  end
end
return out
"""

SETTLE_LUA = """
local now = tonumber(ARGV[1])
if redis.call('ZREM', KEYS[1], ARGV[2]) == 0 and ARGV[6] == '1' then return 0 end
local delta = tonumber(ARGV[3])
if delta ~= 0 then
  if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('INCRBY', KEYS[2], delta) end
  for i = 1, 2 do
    local limit = tonumber(ARGV[3 + i])
    if limit > 0 then
      local tat = tonumber(redis.call('GET', KEYS[2 + i]) or '0')
      if tat > 0 then
        tat = tat + delta * 60000 / limit
        if tat > now then
          redis.call('SET', KEYS[2 + i], tat, 'PX', math.ceil(tat - now) + 1000)
        else
          redis.call('DEL', KEYS[2 + i])
        end
      end
    end
  end
end
return 1
"""


ADMIT_SHA = hashlib.sha1(ADMIT_LUA.encode(), usedforsecurity=False).hexdigest()  # as Redis names it
SETTLE_SHA = hashlib.sha1(SETTLE_LUA.encode(), usedforsecurity=False).hexdigest()
SETTLE_LINGER_S = 0.005  # with no traffic to ride along with, settlements go within 5 ms
FIRST_TRY, RETRY = 0, 1  # a settlement's last argument: a retry applies only if its reservation is still held
MAX_RELEASES = 10_000  # lost-reply give-backs waiting for Redis (each a few hundred bytes); more are dropped


@dataclass(frozen=True)
class Buckets:
    """The limits that apply to one request, and the Redis keys they live under."""

    client_id: str
    user: str | None
    rpm: int
    tpm: int
    user_rpm: int
    user_tpm: int
    concurrency: int
    daily_tokens: int
    day: str

    @classmethod
    def of(
        cls,
        principal: Principal,
        policy: Policy,
        *,
        divisor: int = 1,
        ceiling_rpm: int = 0,
        now: float | None = None,
    ) -> Buckets:
        def scaled(value: int | None) -> int:
            return max(1, value // divisor) if value else 0

        user = principal.user
        day = time.strftime("%Y%m%d", time.gmtime(now if now is not None else time.time()))
        return cls(
            client_id=principal.client_id,
            user=user,
            rpm=scaled(policy.rpm) or ceiling_rpm,
            tpm=scaled(policy.tpm),
            user_rpm=scaled(policy.user_rpm) if user else 0,
            user_tpm=scaled(policy.user_tpm) if user else 0,
            concurrency=scaled(policy.concurrency),
            daily_tokens=scaled(policy.daily_tokens),
            day=day,
        )

    def keys(self, jti: str) -> list[str]:
        """The script's seven keys: the token's revocation flag, then the buckets."""
        return [revoked_key_jti(jti), *self._bucket_keys]

    @functools.cached_property
    def settle_keys(self) -> tuple[str, str, str, str]:
        """The settlement script's four keys: the in-flight set, the day's counter, the two token buckets."""
        keys = self._bucket_keys
        return keys[0], keys[1], keys[3], keys[5]

    @functools.cached_property
    def _bucket_keys(self) -> tuple[str, ...]:
        base = f"portcullis:rl:{self.client_id}"
        user = f"{base}:u:{self.user or '-'}"
        return (
            f"{base}:conc",
            f"{base}:day:{self.day}",
            f"{base}:rpm",
            f"{base}:tpm",
            f"{user}:rpm",
            f"{user}:tpm",
        )


@dataclass
class Admission:
    """The outcome of a reservation: admitted or not, and the numbers for the response headers."""

    allowed: bool
    limit: str = ""  # which limit refused: requests, tokens, concurrency, daily_tokens, ...
    retry_after_ms: int = 0
    remaining_requests: int = -1
    reset_requests_ms: int = 0
    remaining_tokens: int = -1
    reset_tokens_ms: int = 0
    reserved_tokens: int = 0
    fallback: bool = False
    headers: dict[str, str] = field(default_factory=dict)


def _fmt_reset(ms: int) -> str:
    return f"{ms}ms" if ms < 1000 else f"{ms / 1000:.3g}s"


def ratelimit_headers(buckets: Buckets, admission: Admission) -> dict[str, str]:
    """OpenAI-style ``x-ratelimit-*`` headers for the limits that apply.

    A refusal knows only the limit that refused (the reservation stops there): the client's requests or
    tokens a minute then show none remaining and reset when ``Retry-After`` says; what the other limit has
    left is not known, so only its size is given (a concurrency or daily refusal gives both sizes)."""
    headers: dict[str, str] = {}
    refused = None if admission.allowed else (admission.limit if admission.limit in HEADER_LIMITS else "")
    for (dimension, names), limit, remaining, reset_ms in (
        (HEADER_NAMES[0], buckets.rpm, admission.remaining_requests, admission.reset_requests_ms),
        (HEADER_NAMES[1], buckets.tpm, admission.remaining_tokens, admission.reset_tokens_ms),
    ):
        if not limit:
            continue
        headers[names[0]] = str(limit)
        if refused == dimension:
            remaining, reset_ms = 0, admission.retry_after_ms
        elif refused is not None:
            continue  # the reservation stopped before this limit: what it has left is not known
        headers[names[1]] = str(max(0, remaining))
        headers[names[2]] = _fmt_reset(reset_ms)
    if not admission.allowed:
        headers["retry-after"] = str(max(1, math.ceil(admission.retry_after_ms / 1000)))
    return headers


def _admit_args(buckets: Buckets, reservation: str, cost: int, now_ms: int) -> list[Any]:
    """The reservation script's ARGV (see ``ADMIT_LUA``)."""
    return [*_client_args(buckets), *_request_args(reservation, cost, now_ms)]


def _client_args(buckets: Buckets) -> tuple[int, ...]:
    return (
        buckets.concurrency,
        SLOT_TTL_MS,
        buckets.daily_tokens,
        DAY_TTL_S,
        buckets.rpm,
        buckets.tpm,
        buckets.user_rpm,
        buckets.user_tpm,
    )


def _request_args(reservation: str, cost: int, now_ms: int) -> tuple[Any, ...]:
    seconds_to_midnight = 86_400 - (now_ms // 1000) % 86_400
    return now_ms, reservation, cost, seconds_to_midnight * 1000


def _bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


_ADMIT_HEAD = b"*%d\r\n" % (3 + 7 + 12) + b"".join(
    _bulk(part) for part in (b"EVALSHA", ADMIT_SHA.encode(), b"7")
)


@functools.lru_cache(maxsize=4096)
def _admit_client_part(keys: tuple[str, ...], args: tuple[int, ...]) -> bytes:
    """The client's six keys and its limits, packed: the same for every request of a client (a user) on
    one day."""
    return b"".join(_bulk(key.encode()) for key in keys) + b"".join(_bulk(b"%d" % arg) for arg in args)


def _admit_packed(buckets: Buckets, jti: str, reservation: str, cost: int, now_ms: int) -> Packed:
    """The reservation's EVALSHA as RESP: what ``hiredis.pack_command`` would make of it, without packing
    again, for every request, the 17 arguments a client's requests share (hiredis writes each argument's
    length with ``sprintf``: ~1,400 instructions an argument, bench/README.md, session 23)."""
    now, reservation, cost, to_midnight_ms = _request_args(reservation, cost, now_ms)
    key = revoked_key_jti(jti).encode()
    request = b"%d" % now, reservation.encode(), b"%d" % cost, b"%d" % to_midnight_ms
    return Packed(
        _ADMIT_HEAD
        + _bulk(key)
        + _admit_client_part(buckets._bucket_keys, _client_args(buckets))
        + b"".join(_bulk(part) for part in request)
    )


class RevokedError(Exception):
    """The shared store says the token is revoked."""


class RedisRefused(redis_exceptions.ConnectionError):
    """Redis refused the reservation before running it (a read-only replica after a failover, a failed
    disk write, too few replicas, busy, out of memory, loading): to admission, Redis is unavailable."""


class RedisLimiter:
    """The shared limiter: one EVALSHA per request to reserve; settlements ride along with later batches.

    Both go through the process's ``RedisBatcher``, so concurrent requests share round trips. The scripts
    are called by their SHA-1; a Redis that lost them (restarted) gets the reservation's with an EVAL, and
    the settlement's loaded ahead of the settlements retried.
    """

    def __init__(self, batcher: RedisBatcher) -> None:
        self.batcher = batcher
        self._pending: list[Command] = []
        self._releases = 0  # how many of the pending commands are give-backs (RETRY), kept as they change
        self._load_settle = True  # load the script with the first settlements (and after a Redis restart)
        batcher.rider_add(self)

    async def admit(self, principal: Principal, buckets: Buckets, reservation: str, cost: int) -> Admission:
        """Check revocation and reserve every limit atomically (raises RevokedError, or ConnectionError,
        RedisRefused included)."""
        now_ms = int(time.time() * 1000)
        try:
            try:
                packed = _admit_packed(buckets, principal.jti, reservation, cost, now_ms)
                result = await self.batcher.call(packed)
            except redis_exceptions.NoScriptError:
                # Redis lost its scripts (a restart, a SCRIPT FLUSH): EVAL brings the script with the call,
                # so no flush can come between loading it and running it (with SCRIPT LOAD and a second
                # EVALSHA one did, and the request got a 500), and Redis keeps it for the EVALSHAs after
                keys = buckets.keys(principal.jti)
                args = _admit_args(buckets, reservation, cost, now_ms)
                result = await self.batcher.call("EVAL", ADMIT_LUA, len(keys), *keys, *args)
        except redis_exceptions.ResponseError as exc:
            # Refused before it ran: the same as Redis down (the fallback, audited once, counted), not a
            # 500 for every request while a replica is read-only or the disk is full. An error the script
            # itself raised is a bug, and stays one.
            if _did_not_run(exc):
                raise RedisRefused(f"Redis refused the reservation: {exc}") from exc
            raise
        if result[0] == -1:
            raise RevokedError()
        if result[0] == 0:
            limit = result[1].decode() if isinstance(result[1], bytes) else str(result[1])
            return Admission(allowed=False, limit=limit, retry_after_ms=int(result[2]))
        return Admission(
            allowed=True,
            remaining_requests=int(result[1]),
            reset_requests_ms=int(result[2]),
            remaining_tokens=int(result[3]),
            reset_tokens_ms=int(result[4]),
            reserved_tokens=cost,
        )

    def settle(
        self, principal: Principal, buckets: Buckets, reservation: str, reserved: int, used: int
    ) -> None:
        """Queue the settlement: release the slot, refund or charge the difference (sent with a batch)."""
        self._queue(buckets, reservation, used - reserved, FIRST_TRY)
        self.batcher.nudge(SETTLE_LINGER_S)

    def hold(self, buckets: Buckets, reservation: str) -> None:
        """Renew a running request's slot for another SLOT_TTL_MS, if it is still held (sent with a batch;
        a renewal lost with its batch is sent again at the next, SLOT_RENEW_S later)."""
        expiry = int(time.time() * 1000) + SLOT_TTL_MS
        self._pending.append(("ZADD", buckets.settle_keys[0], "XX", expiry, reservation))
        self.batcher.nudge(SETTLE_LINGER_S)

    def release(self, principal: Principal, buckets: Buckets, reservation: str, reserved: int) -> None:
        """Give back a reservation whose reply was lost (the request was then served by the fallback):
        Redis may have made it. Sent as a retry, it changes nothing unless the reservation is held."""
        if self._releases >= MAX_RELEASES:
            logger.warning("%d reservations are waiting to be given back; dropping one", MAX_RELEASES)
            return
        self._queue(buckets, reservation, -reserved, RETRY)
        self._releases += 1
        self.batcher.nudge(RIDER_RETRY_S)

    def _queue(self, buckets: Buckets, reservation: str, delta: int, attempt: int) -> None:
        now_ms = int(time.time() * 1000)
        self._pending.append(
            ("EVALSHA", SETTLE_SHA, 4, *buckets.settle_keys)
            + (now_ms, reservation, delta, buckets.tpm, buckets.user_tpm, attempt)
        )

    async def flush(self) -> bool:
        """Send the queued settlements now (tests, shutdown)."""
        return await self.batcher.flush()

    def unsettled(self) -> int:
        """Settlements and give-backs still queued: at stop, those Redis never took (they are lost)."""
        return sum(1 for command in self._pending if command[0] == "EVALSHA")

    # --- the batcher's rider interface ---------------------------------------------------------------

    def take(self) -> list[Command]:
        batch, self._pending, self._releases = self._pending, [], 0
        if batch and self._load_settle:
            self._load_settle = False
            batch.insert(0, ("SCRIPT", "LOAD", SETTLE_LUA))
        return batch

    def done(self, sent: list[Command], replies: list[Any], error: BaseException | None) -> None:
        """Retry what failed or got no reply: a settlement that ran before its reply was lost finds its
        member gone when it comes again, and changes nothing."""
        if any(_is_lost_script(r) for r in replies):
            self._load_settle = True  # Redis restarted and lost its scripts: load again, then retry
        # Refused before it ran (no script, Redis loading, busy, out of memory, read-only, a failed disk
        # write, too few replicas): it goes again as it was, at once after a lost script, else after
        # RIDER_RETRY_S rather than every 5 ms while Redis refuses (it rides with requests' batches
        # meanwhile). Dropped, it had leaked its slot for 15 minutes and never refunded the reservation.
        # Unanswered: it may have run, and goes again marked so. An error the script itself raised came
        # after some of its writes, and would come again every time: it was retried every 5 ms for as long
        # as the process lived (an upstream's usage count past 64 bits did it). Logged and dropped.
        answered = [(c, r) for c, r in zip(sent, replies, strict=False) if c[0] == "EVALSHA"]
        refused = [c for c, r in answered if _did_not_run(r)]
        failed = [r for _c, r in answered if _is_error(r) and not _did_not_run(r)]
        if failed:
            logger.error("dropping %d settlements Redis failed to run (%s)", len(failed), failed[0])
        unanswered = [c[:-1] + (RETRY,) for c in sent[len(replies) :] if c[0] == "EVALSHA"]
        retry = refused + unanswered
        refusal = None
        if refused:
            refusal = next((r for _c, r in answered if _did_not_run(r) and not _is_lost_script(r)), None)
        if refusal is not None:
            logger.warning("Redis refused %d settlements (%s); will retry", len(refused), refusal)
        if error is not None:
            logger.warning("settling %d reservations failed (%s); will retry", len(unanswered), error)
        if retry:
            self._pending[:0] = retry
            self._releases += sum(1 for c in retry if c[-1] == RETRY)
            later = error is not None or refusal is not None
            self.batcher.nudge(RIDER_RETRY_S if later else SETTLE_LINGER_S)


def _is_error(reply: Any) -> bool:
    return isinstance(reply, redis_exceptions.ResponseError)


def _is_lost_script(reply: Any) -> bool:
    return isinstance(reply, redis_exceptions.NoScriptError)


# The error replies of a Redis that refused a command before it ran (for the scripts, at their first write,
# which comes before any other: nothing was written). redis-py has classes for some; others arrive as a
# plain ResponseError whose message starts with Redis's code: BUSY (a script running too long), MISCONF (a
# snapshot failed to reach the disk, with stop-writes-on-bgsave-error), NOREPLICAS (min-replicas-to-write).
NOT_RUN = (
    redis_exceptions.NoScriptError,
    redis_exceptions.BusyLoadingError,
    redis_exceptions.ReadOnlyError,
    redis_exceptions.OutOfMemoryError,
    redis_exceptions.TryAgainError,
    redis_exceptions.MasterDownError,
    redis_exceptions.ClusterDownError,
)
NOT_RUN_CODES = ("BUSY ", "MISCONF ", "NOREPLICAS ")


def _did_not_run(reply: Any) -> bool:
    """An error reply Redis gives before running a command: it may be sent again as it was."""
    return isinstance(reply, NOT_RUN) or (_is_error(reply) and str(reply).startswith(NOT_RUN_CODES))


class LocalLimiter:
    """The same arithmetic in process: the embedded default, and the fallback while Redis is down."""

    def __init__(self) -> None:
        self._tat: dict[str, float] = {}
        self._slots: dict[str, dict[str, float]] = {}
        self._daily: dict[str, int] = {}

    def admit(
        self, principal: Principal, buckets: Buckets, reservation: str, cost: int, *, now: float | None = None
    ) -> Admission:
        now_ms = (now if now is not None else time.time()) * 1000
        keys = buckets.keys(principal.jti)
        slots = self._slots.setdefault(keys[1], {})
        for member in [m for m, expiry in slots.items() if expiry <= now_ms]:
            del slots[member]
        if buckets.concurrency and len(slots) >= buckets.concurrency:
            return Admission(allowed=False, limit="concurrency", retry_after_ms=1000)
        if buckets.daily_tokens and self._daily.get(keys[2], 0) + cost > buckets.daily_tokens:
            return Admission(
                allowed=False, limit="daily_tokens", retry_after_ms=int(86_400_000 - now_ms % 86_400_000)
            )
        plan = [
            ("requests", keys[3], buckets.rpm, 1),
            ("tokens", keys[4], buckets.tpm, cost),
            ("user_requests", keys[5], buckets.user_rpm, 1),
            ("user_tokens", keys[6], buckets.user_tpm, cost),
        ]
        new_tats: dict[str, float] = {}
        for name, key, limit, units in plan:
            if limit:
                new_tat = max(self._tat.get(key, 0.0), now_ms) + units * WINDOW_MS / limit
                if new_tat - now_ms > WINDOW_MS:
                    return Admission(
                        allowed=False, limit=name, retry_after_ms=math.ceil(new_tat - now_ms - WINDOW_MS)
                    )
                new_tats[key] = new_tat
        self._tat.update(new_tats)
        if buckets.concurrency:
            slots[reservation] = now_ms + SLOT_TTL_MS
        if buckets.daily_tokens:
            self._daily[keys[2]] = self._daily.get(keys[2], 0) + cost
        return self._admitted(buckets, keys, new_tats, now_ms, cost)

    def hold(self, buckets: Buckets, reservation: str, *, now: float | None = None) -> None:
        slots = self._slots.get(buckets.settle_keys[0])
        if slots is not None and reservation in slots:
            slots[reservation] = (now if now is not None else time.time()) * 1000 + SLOT_TTL_MS

    @staticmethod
    def _admitted(
        buckets: Buckets, keys: list[str], tats: dict[str, float], now_ms: float, cost: int
    ) -> Admission:
        admission = Admission(allowed=True, reserved_tokens=cost)
        if keys[3] in tats:
            used = tats[keys[3]] - now_ms
            admission.remaining_requests = int((WINDOW_MS - used) // (WINDOW_MS / buckets.rpm))
            admission.reset_requests_ms = math.ceil(used)
        if keys[4] in tats:
            used = tats[keys[4]] - now_ms
            admission.remaining_tokens = int((WINDOW_MS - used) // (WINDOW_MS / buckets.tpm))
            admission.reset_tokens_ms = math.ceil(used)
        return admission

    def settle(
        self, principal: Principal, buckets: Buckets, reservation: str, reserved: int, used: int
    ) -> None:
        keys = buckets.keys(principal.jti)
        self._slots.get(keys[1], {}).pop(reservation, None)
        delta = used - reserved
        if delta and keys[2] in self._daily:
            self._daily[keys[2]] += delta
        for key, limit in ((keys[4], buckets.tpm), (keys[6], buckets.user_tpm)):
            if delta and limit and key in self._tat:
                self._tat[key] += delta * WINDOW_MS / limit
