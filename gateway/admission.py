"""Admission: the hot path's one Redis round trip, and the settlement after the call.

The Lua reservation also checks the token's revocation key, so revocation and every limit cost one EVALSHA.
When Redis is unreachable, or refuses writes, the gateway keeps serving within a conservative per-process
limit (counted and audited once per outage), and it serves only tokens whose revocation state Redis cleared
in the last ``REVOCATION_STALE_S`` seconds: the rest get a 503 (fail closed).
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis

from authserver.revocation import local_revocations
from gateway import errors
from gateway.auth import Principal
from gateway.deadlines import Deadlines
from gateway.ratelimit import (
    FALLBACK_DIVISOR,
    SLOT_RENEW_S,
    Admission,
    Buckets,
    RevokedError,
    ratelimit_headers,
)
from gateway.redisbatch import RedisUnanswered
from gateway.selectors import Policy
from gateway.validation import Validated

if TYPE_CHECKING:
    from gateway.runtime import Runtime

LIMIT_MESSAGES = {
    "requests": "Too many requests per minute for this client.",
    "tokens": "Too many tokens per minute for this client.",
    "user_requests": "Too many requests per minute for this user.",
    "user_tokens": "Too many tokens per minute for this user.",
    "concurrency": "Too many requests in flight for this client.",
    "daily_tokens": "The daily token quota of this client is used up.",
}
# Redis down, or refusing writes (ratelimit.RedisRefused, a ConnectionError: a read-only replica, MISCONF)
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, OSError)


@dataclass
class Ticket:
    buckets: Buckets
    admission: Admission
    headers: dict[str, str]
    shared: bool  # reserved in Redis (settle there) or in process
    reservation: str  # the limiter's id of this reservation: the gateway's own, unique in every process
    hold: SlotHold | None = None  # renews its concurrency slot while the request runs


class SlotHold:
    """A running request's concurrency slot, renewed every SLOT_RENEW_S until it is settled: a slot lives
    SLOT_TTL_MS unless renewed (a crashed process's are reclaimed), and a stream running longer had given
    its client one more slot every 15 minutes. One sweeping task per process, not a timer per request."""

    __slots__ = ("rt", "ticket")

    def __init__(self, rt: Runtime, ticket: Ticket) -> None:
        self.rt, self.ticket = rt, ticket

    def late(self) -> None:
        rt, ticket = self.rt, self.ticket
        limiter = rt.limiter_redis if ticket.shared and rt.limiter_redis is not None else rt.limiter_local
        limiter.hold(ticket.buckets, ticket.reservation)
        SLOT_HOLDS.add(self, time.monotonic() + SLOT_RENEW_S)


SLOT_HOLDS: Deadlines[SlotHold] = Deadlines(sweep_s=10.0, idle_s=SLOT_RENEW_S)


# Reservation ids: this process's random prefix and a counter (no system call per request). Not the
# request id, which a client may choose: requests sharing one would share one concurrency slot.
_process = os.urandom(8).hex()
_sequence = itertools.count()


def _reseed() -> None:
    """A forked child (a server that imports the app before forking workers) takes a prefix of its own."""
    global _process, _sequence
    _process, _sequence = os.urandom(8).hex(), itertools.count()


os.register_at_fork(after_in_child=_reseed)


def reservation_id() -> str:
    """A new id, unique across the processes sharing one Redis."""
    return f"{_process}.{next(_sequence)}"


UNKNOWN_CONTEXT = 4096  # the generation bound assumed when neither request, policy nor upstream says
_NOT_ASCII = bytes(range(0x80, 0x100))
_ASCII_OR_CONTINUATION = bytes(range(0xC0))  # what is left is the lead bytes of UTF-8 sequences
_LEAD_OF_TWO_OR_THREE = bytes(range(0xC0, 0xF0))


def escaped_size(body: bytes) -> int:
    """The size of a UTF-8 JSON body with every non-ASCII character escaped (``\\u00e9``, and a surrogate
    pair beyond the BMP), which is the size the prompt estimate reads: a body written that way (as Python's
    ``json`` writes by default) estimates a character of Chinese as 1.5 tokens, where its UTF-8 bytes would
    give 0.75 and many models spend one, or more. DEL, which orjson writes as it is (only ever inside a
    string), was escaped too (``\\u007f``)."""
    deletes = 5 * body.count(b"\x7f")
    if body.isascii():
        return len(body) + deletes
    ascii_bytes = len(body.translate(None, _NOT_ASCII))
    leads = body.translate(None, _ASCII_OR_CONTINUATION)
    beyond_bmp = len(leads.translate(None, _LEAD_OF_TWO_OR_THREE))
    return ascii_bytes + deletes + 6 * len(leads) + 6 * beyond_bmp


def prompt_estimate(request: Validated, body_len: int) -> int:
    """A prompt's tokens: counted when it is token ids, else a generous estimate from the size of the body
    that carries it (about 4 bytes a token). It is reserved before the call, and charged when the call is
    cut before vLLM says."""
    if request.prompt_token_ids is not None:
        return request.prompt_token_ids
    return body_len // 4 + 1


def cost_estimate(request: Validated, body_len: int, context_len: int | None) -> int:
    """Tokens to reserve: a generous prompt estimate plus the generation bound."""
    prompt = prompt_estimate(request, body_len)
    if request.max_tokens is not None:
        bound = request.max_tokens
    else:  # vLLM's default: the rest of the context, after the prompt as truncate_prompt_tokens leaves it
        kept = prompt if request.truncate is None or request.truncate < 0 else min(prompt, request.truncate)
        bound = max(0, (context_len or UNKNOWN_CONTEXT) - kept)
    return prompt + bound * request.n * request.prompts  # a completions batch: n answers to each prompt


async def admit(
    rt: Runtime, principal: Principal, policy: Policy, request: Validated, body_len: int
) -> Ticket:
    """Check revocation and reserve every limit for one request, or raise the matching error."""
    context_len = rt.upstreams.context_length(request.model)
    cost = cost_estimate(request, body_len, context_len)
    buckets = full = _buckets(principal, policy)
    shared = rt.limiter_redis is not None
    reservation = reservation_id()
    if rt.limiter_redis is not None:
        try:
            admission = await rt.limiter_redis.admit(principal, buckets, reservation, cost)
        except RevokedError:
            raise errors.AuthenticationError("The access token has been revoked.") from None
        except REDIS_DOWN as down:
            if isinstance(down, RedisUnanswered):  # Redis may have reserved: give it back when it answers
                rt.limiter_redis.release(principal, buckets, reservation, cost)
            rt.redis_unavailable()
            if not rt.recently_cleared(principal.jti):
                raise errors.RevocationUnavailable() from None
            buckets = Buckets.of(
                principal, policy, divisor=FALLBACK_DIVISOR, ceiling_rpm=rt.fallback_ceiling_rpm
            )
            admission = rt.limiter_local.admit(principal, buckets, reservation, cost)
            admission.fallback, shared = True, False
        else:
            rt.redis_available(principal.jti)
    else:
        if local_revocations.is_revoked(principal.jti, principal.client_id):
            raise errors.AuthenticationError("The access token has been revoked.")
        admission = rt.limiter_local.admit(principal, buckets, reservation, cost)
    headers = ratelimit_headers(buckets, admission)
    if not admission.allowed:
        # no minute (or day) would admit it: the policy's own limit, not the fallback's
        bound, period = {
            "tokens": (full.tpm, "a minute"),
            "user_tokens": (full.user_tpm, "a minute"),
            "daily_tokens": (full.daily_tokens, "a day"),
        }.get(admission.limit, (0, ""))
        if cost > bound > 0:
            raise _never_admitted(request, cost, bound, period, body_len, context_len, admission.limit)
        exc = errors.RateLimited(LIMIT_MESSAGES.get(admission.limit, "Rate limit exceeded."))
        exc.code = admission.limit  # type: ignore[misc]
        exc.headers.update(headers)
        raise exc
    ticket = Ticket(
        buckets=buckets, admission=admission, headers=headers, shared=shared, reservation=reservation
    )
    if buckets.concurrency:
        ticket.hold = SlotHold(rt, ticket)
        SLOT_HOLDS.add(ticket.hold, time.monotonic() + SLOT_RENEW_S)
    return ticket


def _never_admitted(
    request: Validated,
    cost: int,
    bound: int,
    period: str,
    body_len: int,
    context_len: int | None,
    limit: str,
) -> errors.GatewayError:
    """A request costing more tokens than a minute's limit or the daily quota: no minute (or day) would
    admit it, and a 429 would have the client retry for ever. A 400 says what to change. Asked only once
    the limiter refused it, so a revoked token still gets its 401 first."""
    whose = "user" if limit == "user_tokens" else "client"
    prompt = prompt_estimate(request, body_len)  # token ids counted, as they were reserved
    if prompt >= bound:
        advice, param = "its input alone is estimated at more than that; send less", None
    elif request.max_tokens is not None:
        fewer = "n or the number of prompts" if request.prompts > 1 else "n"
        advice, param = f"lower max_tokens (or {fewer})", "max_tokens"
    else:
        context = context_len or UNKNOWN_CONTEXT
        advice = (
            f"without max_tokens it may write up to the model's context ({context:,} tokens); set max_tokens"
        )
        param = "max_tokens"
    return errors.InvalidRequest(
        f"This request may use {cost:,} tokens, more than the {bound:,} {period} this {whose} may use: "
        f"{advice}.",
        param=param,
    )


_BUCKETS: dict[tuple[int, str, str | None, int], tuple[Policy, Buckets]] = {}


def _buckets(principal: Principal, policy: Policy) -> Buckets:
    """The buckets of a client (and user) under a policy snapshot, built once a day, not per request."""
    now = time.time()
    key = (id(policy), principal.client_id, principal.user, int(now // 86_400))
    cached = _BUCKETS.get(key)
    if cached is not None and cached[0] is policy:  # the policy object is held, so its id is not reused
        return cached[1]
    if len(_BUCKETS) > 10_000:
        _BUCKETS.clear()
    buckets = Buckets.of(principal, policy, now=now)
    _BUCKETS[key] = (policy, buckets)
    return buckets


def settle(rt: Runtime, principal: Principal, ticket: Ticket, used: int) -> None:
    """Release the slot and refund (or charge) the difference between reserved and used tokens."""
    if ticket.hold is not None:
        SLOT_HOLDS.remove(ticket.hold)
    limiter = rt.limiter_redis if ticket.shared and rt.limiter_redis is not None else rt.limiter_local
    limiter.settle(principal, ticket.buckets, ticket.reservation, ticket.admission.reserved_tokens, used)
