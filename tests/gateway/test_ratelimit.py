"""Limits stay exact under concurrency: the in-process limiter, and the shared Redis script."""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

import pytest
import redis
from django.conf import settings
from hypothesis import example, given
from hypothesis import strategies as st

from audit.compact_json import json_compact_dump
from gateway.admission import escaped_size
from gateway.auth import Principal
from gateway.ratelimit import (
    Admission,
    Buckets,
    LocalLimiter,
    RedisLimiter,
    RevokedError,
    ratelimit_headers,
)
from gateway.redisbatch import RedisBatcher
from gateway.runtime import redis_pool_open
from gateway.selectors import Policy

ALICE = Principal(jti="j-alice", client_id="c1", subject="alice", scopes=frozenset(), exp=0)
SERVICE = Principal(jti="j-svc", client_id="c1", subject="c1", scopes=frozenset(), exp=0)


def buckets(principal: Principal = SERVICE, **limits: Any) -> Buckets:
    return Buckets.of(principal, Policy(models=frozenset(), **limits), now=1_800_000_000)


def test_requests_per_minute_admit_exactly_the_limit_then_refill_smoothly():
    limiter, b = LocalLimiter(), buckets(rpm=50)
    now = 1_800_000_000.0
    admitted = [limiter.admit(SERVICE, b, f"r{i}", 1, now=now).allowed for i in range(200)]
    assert admitted.count(True) == 50
    refused = limiter.admit(SERVICE, b, "late", 1, now=now)
    assert refused.limit == "requests"
    assert 1000 <= refused.retry_after_ms <= 1200  # one request's worth: 60 s / 50
    assert limiter.admit(SERVICE, b, "later", 1, now=now + 1.2).allowed


def test_tokens_are_reserved_then_refunded_at_settlement():
    limiter, b = LocalLimiter(), buckets(tpm=1000)
    now = 1_800_000_000.0
    first = limiter.admit(SERVICE, b, "a", 600, now=now)
    assert first.allowed
    assert first.remaining_tokens == 400
    assert limiter.admit(SERVICE, b, "b", 600, now=now).limit == "tokens"
    limiter.settle(SERVICE, b, "a", reserved=600, used=100)
    assert limiter.admit(SERVICE, b, "c", 600, now=now).allowed


def test_concurrency_slots_are_held_until_settled():
    limiter, b = LocalLimiter(), buckets(concurrency=2)
    now = 1_800_000_000.0
    assert limiter.admit(SERVICE, b, "a", 1, now=now).allowed
    assert limiter.admit(SERVICE, b, "b", 1, now=now).allowed
    assert limiter.admit(SERVICE, b, "c", 1, now=now).limit == "concurrency"
    limiter.settle(SERVICE, b, "a", reserved=1, used=1)
    assert limiter.admit(SERVICE, b, "d", 1, now=now).allowed


def test_the_daily_quota_counts_what_was_used():
    limiter, b = LocalLimiter(), buckets(daily_tokens=1000)
    now = 1_800_000_000.0
    assert limiter.admit(SERVICE, b, "a", 900, now=now).allowed
    limiter.settle(SERVICE, b, "a", reserved=900, used=950)
    refused = limiter.admit(SERVICE, b, "b", 100, now=now)
    assert refused.limit == "daily_tokens"
    assert refused.retry_after_ms > 0


def test_user_limits_apply_only_to_user_tokens():
    limiter = LocalLimiter()
    now = 1_800_000_000.0
    assert buckets(SERVICE, user_rpm=1).user_rpm == 0
    user = buckets(ALICE, user_rpm=1)
    assert limiter.admit(ALICE, user, "a", 1, now=now).allowed
    assert limiter.admit(ALICE, user, "b", 1, now=now).limit == "user_requests"


def test_headers_follow_openai_names():
    b = buckets(rpm=60, tpm=1000)
    admission = LocalLimiter().admit(SERVICE, b, "a", 10, now=1_800_000_000.0)
    headers = ratelimit_headers(b, admission)
    assert headers["x-ratelimit-limit-requests"] == "60"
    assert headers["x-ratelimit-remaining-requests"] == "59"
    assert headers["x-ratelimit-remaining-tokens"] == "990"
    assert headers["x-ratelimit-reset-requests"] == "1s"
    assert "retry-after" not in headers


def test_a_refusal_for_requests_says_none_remain_until_retry_after_and_not_the_tokens_it_cannot_know():
    limiter, b = LocalLimiter(), buckets(rpm=3, tpm=1000)
    now = 1_800_000_000.0
    for i in range(3):
        assert limiter.admit(SERVICE, b, f"r{i}", 10, now=now).allowed
    refused = limiter.admit(SERVICE, b, "r3", 10, now=now)
    headers = ratelimit_headers(b, refused)
    assert refused.limit == "requests"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["retry-after"] == "20"  # a slot of 3 a minute frees every 20 s
    assert headers["x-ratelimit-reset-requests"] == "20s"
    assert headers["x-ratelimit-limit-tokens"] == "1000"
    assert "x-ratelimit-remaining-tokens" not in headers  # the reservation stopped before the tokens
    assert "x-ratelimit-reset-tokens" not in headers


def test_a_refusal_for_tokens_resets_the_tokens_when_retry_after_says():
    limiter, b = LocalLimiter(), buckets(rpm=60, tpm=100)
    now = 1_800_000_000.0
    assert limiter.admit(SERVICE, b, "a", 100, now=now).allowed
    refused = limiter.admit(SERVICE, b, "b", 50, now=now)
    headers = ratelimit_headers(b, refused)
    assert refused.limit == "tokens"
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    assert headers["x-ratelimit-reset-tokens"] == _reset(refused.retry_after_ms)
    assert refused.retry_after_ms > 0
    assert "x-ratelimit-remaining-requests" not in headers


def test_a_concurrency_refusal_gives_the_sizes_only():
    limiter, b = LocalLimiter(), buckets(rpm=60, tpm=1000, concurrency=1)
    now = 1_800_000_000.0
    assert limiter.admit(SERVICE, b, "a", 10, now=now).allowed
    refused = limiter.admit(SERVICE, b, "b", 10, now=now)
    headers = ratelimit_headers(b, refused)
    assert refused.limit == "concurrency"
    assert headers == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-limit-tokens": "1000",
        "retry-after": "1",
    }


def _reset(ms: int) -> str:
    return f"{ms}ms" if ms < 1000 else f"{ms / 1000:.3g}s"


@pytest.fixture
def shared(redis_client: Any) -> Any:
    async def make() -> RedisLimiter:
        return RedisLimiter(RedisBatcher(redis_pool_open(settings.REDIS_URL)))

    return make


async def close(limiter: RedisLimiter) -> None:
    await limiter.batcher.stop()
    await limiter.batcher.redis.aclose()


def test_two_hundred_concurrent_reservations_against_fifty_per_minute_admit_exactly_fifty(shared):
    async def run() -> list[bool]:
        limiter = await shared()
        b = buckets(rpm=50)
        results = await asyncio.gather(*(limiter.admit(SERVICE, b, f"r{i}", 1) for i in range(200)))
        await close(limiter)
        return [r.allowed for r in results]

    assert asyncio.run(run()).count(True) == 50


def refilled(per_minute: int, seconds: float) -> int:
    """The most a bucket of ``per_minute`` can have refilled in ``seconds`` (the test's own duration)."""
    return math.ceil(per_minute * seconds / 60) + 1


def test_concurrent_token_reservations_never_exceed_the_limit_and_settle_to_usage(shared, redis_client):
    async def run() -> tuple[int, int, float]:
        limiter = await shared()
        b = buckets(tpm=10_000)
        started = time.monotonic()
        results = await asyncio.gather(*(limiter.admit(SERVICE, b, f"r{i}", 700) for i in range(40)))
        admitted = [i for i, r in enumerate(results) if r.allowed]
        for i in admitted:
            limiter.settle(SERVICE, b, f"r{i}", reserved=700, used=100)
        await limiter.flush()
        after = await limiter.admit(SERVICE, b, "after", 700)
        took = time.monotonic() - started
        await close(limiter)
        return len(admitted), after.remaining_tokens, took

    admitted, remaining, took = asyncio.run(run())
    assert admitted == 14  # 14 × 700 = 9,800 ≤ 10,000 < 15 × 700
    settled = 10_000 - 14 * 100 - 700  # what is left once the reservations settled to what was used
    assert settled <= remaining <= settled + refilled(10_000, took)


@pytest.mark.parametrize("concurrency", [0, 2])
def test_a_settlement_sent_again_after_its_reply_was_lost_changes_nothing(shared, redis_client, concurrency):
    b = buckets(tpm=10_000, daily_tokens=100_000, concurrency=concurrency)

    async def run() -> tuple[int, float]:
        limiter = await shared()
        started = time.monotonic()
        await limiter.admit(SERVICE, b, "r1", 700)
        limiter.settle(SERVICE, b, "r1", reserved=700, used=100)
        sent = limiter.take()
        for command in sent:  # Redis runs the batch...
            redis_client.execute_command(*command)
        limiter.done(sent, [], ConnectionError("the connection broke before the reply"))  # ...unanswered
        await limiter.flush()  # the retry
        after = await limiter.admit(SERVICE, b, "after", 700)
        took = time.monotonic() - started
        await close(limiter)
        return after.remaining_tokens, took

    remaining, took = asyncio.run(run())
    settled = 10_000 - 100 - 700  # refunded once: 600 of the 700 reserved
    assert settled <= remaining <= settled + refilled(10_000, took)
    assert int(redis_client.get(b.keys(SERVICE.jti)[2])) == 100 + 700  # the daily quota charged once
    assert redis_client.zrange(b.keys(SERVICE.jti)[1], 0, -1) == [b"after"]  # r1's slot is gone


def test_give_backs_waiting_for_redis_are_capped_and_the_cap_frees_as_they_go(shared, monkeypatch):
    monkeypatch.setattr("gateway.ratelimit.MAX_RELEASES", 3)
    b = buckets(tpm=10_000, concurrency=5)

    async def run() -> tuple[int, int, int, int]:
        limiter = await shared()
        limiter.settle(SERVICE, b, "served", reserved=10, used=5)  # a first try: not a give-back
        for i in range(5):
            limiter.release(SERVICE, b, f"lost{i}", 10)
        queued = len(limiter.take())  # one batch leaves: SCRIPT LOAD, the settlement and three give-backs
        for i in range(5):
            limiter.release(SERVICE, b, f"again{i}", 10)
        sent = limiter.take()
        limiter.done(sent, [], ConnectionError("unanswered"))  # all three come back, still give-backs
        limiter.release(SERVICE, b, "one more", 10)  # the cap holds them: dropped
        back = len(limiter.take())
        limiter.release(SERVICE, b, "after they left", 10)  # their batch left: room again
        freed = len(limiter.take())
        await close(limiter)
        return queued, len(sent), back, freed

    assert asyncio.run(run()) == (1 + 1 + 3, 3, 3, 1)


@pytest.mark.parametrize("scripts_lost", [False, True])
def test_a_request_that_outlived_its_slot_is_still_settled(shared, redis_client, scripts_lost):
    b = buckets(daily_tokens=100_000, concurrency=2)

    async def run() -> None:
        limiter = await shared()
        await limiter.admit(SERVICE, b, "first", 1)
        limiter.settle(SERVICE, b, "first", reserved=1, used=0)  # loads the settlement script
        await limiter.flush()
        await limiter.admit(SERVICE, b, "long", 5_000)
        redis_client.zrem(b.keys(SERVICE.jti)[1], "long")  # reclaimed after SLOT_TTL_MS, the stream still on
        if scripts_lost:  # refused with NOSCRIPT: it did not run, and goes again still as a first try
            redis_client.script_flush()
        limiter.settle(SERVICE, b, "long", reserved=5_000, used=200)
        await limiter.flush()
        await limiter.flush()
        await close(limiter)

    asyncio.run(run())
    assert int(redis_client.get(b.keys(SERVICE.jti)[2])) == 200  # charged what it used, not the reservation


def test_the_script_refuses_a_revoked_token_in_the_same_round_trip(shared, redis_client):
    redis_client.set("portcullis:revoked:jti:j-svc", 1)

    async def run() -> None:
        limiter = await shared()
        try:
            await limiter.admit(SERVICE, buckets(rpm=5), "r", 1)
        finally:
            await close(limiter)

    with pytest.raises(RevokedError):
        asyncio.run(run())


def test_concurrency_slots_in_redis_are_released_by_settlement(shared, redis_client):
    async def run() -> list[str]:
        limiter = await shared()
        b = buckets(concurrency=1)
        outcomes = [(await limiter.admit(SERVICE, b, "a", 1)).limit or "ok"]
        outcomes.append((await limiter.admit(SERVICE, b, "b", 1)).limit or "ok")
        limiter.settle(SERVICE, b, "a", reserved=1, used=1)
        await limiter.flush()
        outcomes.append((await limiter.admit(SERVICE, b, "c", 1)).limit or "ok")
        await close(limiter)
        return outcomes

    assert asyncio.run(run()) == ["ok", "concurrency", "ok"]


def test_a_slot_left_by_a_crashed_process_is_reclaimed_when_it_would_refuse_a_request(shared, redis_client):
    b = buckets(concurrency=1)
    in_flight = b.keys(SERVICE.jti)[1]
    redis_client.zadd(in_flight, {"crashed": int(time.time() * 1000) - 1})  # its expiry has passed

    async def run() -> list[str]:
        limiter = await shared()
        outcomes = [(await limiter.admit(SERVICE, b, r, 1)).limit or "ok" for r in ("a", "b")]
        await close(limiter)
        return outcomes

    assert asyncio.run(run()) == ["ok", "concurrency"]  # the live slot counts, the expired one does not
    assert redis_client.zrange(in_flight, 0, -1) == [b"a"]


def test_expired_slots_do_not_pile_up_where_no_concurrency_limit_applies(redis_client):
    from gateway.ratelimit import ADMIT_LUA, _admit_args

    b = buckets(rpm=1_000_000)
    in_flight = b.keys(SERVICE.jti)[1]
    start = 1_800_000_000_000
    redis_client.zadd(in_flight, {f"crashed{i}": start - 1 for i in range(3)})
    for i in range(16):  # a busy client's reservations, one a millisecond
        args = _admit_args(b, f"r{i}", 1, start + i)
        assert redis_client.eval(ADMIT_LUA, 7, *b.keys(SERVICE.jti), *args)[0] == 1
    assert not any(m.startswith(b"crashed") for m in redis_client.zrange(in_flight, 0, -1))
    assert redis_client.zcard(in_flight) == 16


def test_the_days_counter_expires_and_counts_every_reservation_and_settlement(shared, redis_client):
    b = buckets(daily_tokens=100_000)
    day = b.keys(SERVICE.jti)[2]

    async def run() -> None:
        limiter = await shared()
        for r in ("a", "b", "c"):
            await limiter.admit(SERVICE, b, r, 100)
        limiter.settle(SERVICE, b, "a", reserved=100, used=40)
        await limiter.flush()
        await close(limiter)

    asyncio.run(run())
    assert int(redis_client.get(day)) == 3 * 100 - 60
    assert 0 < redis_client.ttl(day) <= 2 * 86_400  # it expires, after the day it counts


def test_a_settlement_the_script_fails_to_run_is_dropped_and_logged_not_retried_for_ever(
    shared, redis_client, caplog
):
    # the daily counter past 64 bits (an upstream's usage count did it) fails the script's INCRBY after its
    # first writes; the error reply was taken for "did not run" and sent again every 5 ms for ever
    b = buckets(daily_tokens=100_000)
    day = b.keys(SERVICE.jti)[2]

    async def run() -> list[Any]:
        limiter = await shared()
        await limiter.admit(SERVICE, b, "a", 100)
        redis_client.set(day, "not a number")
        limiter.settle(SERVICE, b, "a", reserved=100, used=40)
        await limiter.flush()
        await asyncio.sleep(0.05)  # a retry would be queued again by now
        pending = list(limiter._pending)
        await close(limiter)
        return pending

    assert asyncio.run(run()) == []
    assert "dropping 1 settlements Redis failed to run" in caplog.text


def test_a_redis_that_lost_its_scripts_gets_them_again_for_reservations_and_settlements(shared, redis_client):
    async def run() -> list[str]:
        limiter = await shared()
        b = buckets(concurrency=1)
        outcomes = [(await limiter.admit(SERVICE, b, "a", 1)).limit or "ok"]
        redis_client.script_flush()  # as after a Redis restart
        limiter.settle(SERVICE, b, "a", reserved=1, used=1)
        await limiter.flush()  # refused with NOSCRIPT: kept, and the script is loaded with the retry
        await limiter.flush()
        outcomes.append((await limiter.admit(SERVICE, b, "b", 1)).limit or "ok")
        redis_client.script_flush()
        outcomes.append((await limiter.admit(SERVICE, b, "c", 1)).limit or "ok")
        await close(limiter)
        return outcomes

    assert asyncio.run(run()) == ["ok", "ok", "concurrency"]


def test_a_reservation_holds_when_the_scripts_are_flushed_again_while_it_recovers(shared, redis_client):
    """Another client's SCRIPT FLUSH between the NOSCRIPT and the retry (tests sharing one Redis server did
    it) must not fail the request: the retry brings the script with it."""

    async def run() -> list[str]:
        limiter = await shared()
        real_call = limiter.batcher.call

        async def flushing_call(*command: Any) -> Any:
            redis_client.script_flush()  # before every command: nothing stays loaded between two
            return await real_call(*command)

        limiter.batcher.call = flushing_call
        b = buckets(concurrency=1)
        outcomes = [(await limiter.admit(SERVICE, b, r, 1)).limit or "ok" for r in ("a", "b")]
        limiter.batcher.call = real_call
        await close(limiter)
        return outcomes

    assert asyncio.run(run()) == ["ok", "concurrency"]


def test_the_limit_names_agree_across_the_script_the_messages_and_the_metrics():
    import re

    from gateway import admission, metrics, ratelimit

    returned = set(re.findall(r"'([a-z_]+)'", ratelimit.ADMIT_LUA))  # lower case: not Redis commands
    assert returned <= set(ratelimit.LIMITS)
    assert {"concurrency", "daily_tokens", "requests", "tokens"} <= returned
    assert set(admission.LIMIT_MESSAGES) == set(ratelimit.LIMITS)
    assert metrics.LIMITS is ratelimit.LIMITS


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Python 3.12+ warns about fork with threads
def test_reservation_ids_are_unique_and_a_forked_child_takes_its_own_prefix():
    import os

    from gateway.admission import reservation_id

    ids = {reservation_id() for _ in range(1000)}
    assert len(ids) == 1000
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once, whatever happens
        try:
            os.write(write, reservation_id().encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 200).decode()
    os.close(read)
    assert child.split(".")[0] != reservation_id().split(".")[0]


def test_a_reservation_whose_reply_was_lost_is_given_back_once_redis_answers(redis_client, monkeypatch):
    from gateway.redisbatch import RedisUnanswered

    b = buckets(daily_tokens=100_000, concurrency=1)

    async def run() -> list[str]:
        limiter = RedisLimiter(RedisBatcher(redis_pool_open(settings.REDIS_URL), links=1))
        await limiter.batcher.call("PING")  # the one link is connected: the next batch reaches Redis
        connection_class = limiter.batcher.redis.connection_pool.connection_class
        answer = connection_class.read_response

        async def reset(self: Any, *args: Any, **kwargs: Any) -> Any:
            raise redis.ConnectionError("connection reset by peer")  # Redis ran it; the reply is lost

        monkeypatch.setattr(connection_class, "read_response", reset)
        with pytest.raises(RedisUnanswered):
            await limiter.admit(SERVICE, b, "lost", 700)
        monkeypatch.setattr(connection_class, "read_response", answer)
        held = [m.decode() for m in redis_client.zrange(b.keys(SERVICE.jti)[1], 0, -1)]
        limiter.release(SERVICE, b, "lost", 700)
        limiter.release(SERVICE, b, "never-made", 700)  # one Redis did not make changes nothing
        await limiter.flush()
        admitted = (await limiter.admit(SERVICE, b, "next", 1)).allowed
        await close(limiter)
        return [*held, str(admitted)]

    assert asyncio.run(run()) == ["lost", "True"]  # it was held, then given back: the slot is free
    assert int(redis_client.get(b.keys(SERVICE.jti)[2])) == 1  # and the daily quota refunded


def test_the_fallback_gives_back_what_redis_may_have_reserved(settings):
    from types import SimpleNamespace

    from gateway.admission import admit
    from gateway.redisbatch import RedisUnanswered
    from gateway.validation import Validated

    class Unanswered:
        def __init__(self) -> None:
            self.released: list[tuple[str, int]] = []

        async def admit(self, *args: Any) -> Any:
            raise RedisUnanswered("no reply from Redis")

        def release(self, principal: Principal, b: Buckets, reservation: str, reserved: int) -> None:
            self.released.append((reservation, reserved))

    shared_limiter = Unanswered()
    rt = SimpleNamespace(
        limiter_redis=shared_limiter,
        limiter_local=LocalLimiter(),
        upstreams=SimpleNamespace(context_length=lambda model: 4096),
        redis_unavailable=lambda: None,
        recently_cleared=lambda jti: True,
        fallback_ceiling_rpm=600,
    )
    request = Validated(payload={}, model="m1", stream=False, max_tokens=16, n=1, wants_usage=False)
    policy = Policy(models=frozenset({"m1"}), concurrency=2)
    ticket = asyncio.run(admit(rt, SERVICE, policy, request, 40))  # type: ignore[arg-type]
    assert ticket.admission.fallback
    assert shared_limiter.released == [(ticket.reservation, ticket.admission.reserved_tokens)]


@pytest.mark.parametrize(
    ("max_tokens", "body_len", "hint", "param"),
    [
        (2000, 40, "lower max_tokens", "max_tokens"),
        (None, 40, "model's context (4,096 tokens); set max_tokens", "max_tokens"),
        (16, 8000, "its input alone is estimated at more than that", None),
    ],
)
@pytest.mark.parametrize(
    ("limits", "period"), [({"tpm": 1000}, "1,000 a minute"), ({"daily_tokens": 1000}, "1,000 a day")]
)
def test_a_request_costing_more_than_a_minutes_or_a_days_tokens_is_a_400_not_a_429_for_ever(
    max_tokens, body_len, hint, param, limits, period
):
    from types import SimpleNamespace

    from gateway import errors
    from gateway.admission import admit
    from gateway.validation import Validated

    rt = SimpleNamespace(
        limiter_redis=None,
        limiter_local=LocalLimiter(),
        upstreams=SimpleNamespace(context_length=lambda model: 4096),
    )
    policy = Policy(models=frozenset({"m1"}), **limits)
    request = Validated(payload={}, model="m1", stream=False, max_tokens=max_tokens, n=1, wants_usage=False)
    with pytest.raises(errors.InvalidRequest) as refused:
        asyncio.run(admit(rt, SERVICE, policy, request, body_len))  # type: ignore[arg-type]
    assert refused.value.status == 400
    assert refused.value.param == param
    assert hint in str(refused.value)
    assert f"more than the {period} this client may use" in str(refused.value)
    fits = Validated(payload={}, model="m1", stream=False, max_tokens=16, n=1, wants_usage=False)
    assert asyncio.run(admit(rt, SERVICE, policy, fits, 40)).admission.allowed  # type: ignore[arg-type]


def test_a_revoked_token_asking_for_more_than_a_minutes_tokens_gets_its_401_not_the_400():
    from types import SimpleNamespace

    from authserver.revocation import local_revocations
    from gateway import errors
    from gateway.admission import admit
    from gateway.validation import Validated

    rt = SimpleNamespace(
        limiter_redis=None,
        limiter_local=LocalLimiter(),
        upstreams=SimpleNamespace(context_length=lambda model: 4096),
    )
    local_revocations.add({"jtis": [(SERVICE.jti, time.time() + 60)]})
    request = Validated(payload={}, model="m1", stream=False, max_tokens=2000, n=1, wants_usage=False)
    policy = Policy(models=frozenset({"m1"}), tpm=1000)
    with pytest.raises(errors.AuthenticationError):
        asyncio.run(admit(rt, SERVICE, policy, request, 40))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("limits", "limit"), [({"tpm": 1000}, "tokens"), ({"daily_tokens": 1000}, "daily_tokens")]
)
def test_the_shared_limiter_refuses_more_than_a_minutes_or_a_days_tokens_by_that_limits_name(
    shared, limits, limit
):
    """The 400 for a request no minute (or day) would admit hangs on this: Redis's script names the limit."""

    async def run() -> str | None:
        limiter = await shared()
        refused = await limiter.admit(SERVICE, buckets(**limits), "big", 1001)
        await close(limiter)
        return None if refused.allowed else refused.limit

    assert asyncio.run(run()) == limit


def test_a_batch_too_big_for_a_minute_is_told_about_its_prompts_and_token_ids_are_counted_as_reserved():
    from types import SimpleNamespace

    from gateway import errors
    from gateway.admission import admit
    from gateway.validation import Validated

    rt = SimpleNamespace(
        limiter_redis=None,
        limiter_local=LocalLimiter(),
        upstreams=SimpleNamespace(context_length=lambda model: 4096),
    )
    policy = Policy(models=frozenset({"m1"}), tpm=1000)
    batch = Validated(
        payload={}, model="m1", stream=False, max_tokens=100, n=1, wants_usage=False, prompts=20
    )
    with pytest.raises(errors.InvalidRequest) as refused:
        asyncio.run(admit(rt, SERVICE, policy, batch, 40))  # type: ignore[arg-type]
    assert "lower max_tokens (or n or the number of prompts)" in str(refused.value)
    # 1,500 token ids in a small body: the input alone is over the minute's 1,000, as it was reserved
    ids = Validated(
        payload={}, model="m1", stream=False, max_tokens=1, n=1, wants_usage=False, prompt_token_ids=1500
    )
    with pytest.raises(errors.InvalidRequest) as refused:
        asyncio.run(admit(rt, SERVICE, policy, ids, 40))  # type: ignore[arg-type]
    assert "its input alone is estimated at more than that" in str(refused.value)


@given(st.text(alphabet=st.characters(exclude_categories=["Cs"])))
@example("DEL \x7f, é, 中, 😀")  # every width, and the one ASCII character the standard encoder escaped
def test_the_prompt_estimates_basis_is_the_size_of_the_body_with_non_ascii_escaped(text):
    payload = {"model": "m", "messages": [{"role": "user", "content": text}]}
    escaped = json.dumps(payload, separators=(",", ":"))  # ensure_ascii, as outbound bodies were written
    assert escaped_size(json_compact_dump(payload)) == len(escaped)


@pytest.mark.parametrize("user", [None, "alice"])
def test_the_packed_reservation_is_what_hiredis_would_pack(user):
    import hiredis

    from gateway.ratelimit import ADMIT_SHA, _admit_args, _admit_packed

    principal = Principal(jti="j-1", client_id="app", subject=user or "app", scopes=frozenset(), exp=0)
    policy = Policy(
        frozenset({"m"}), rpm=60, tpm=6000, concurrency=4, daily_tokens=9, user_rpm=30, user_tpm=3000
    )
    b = Buckets.of(principal, policy)
    for reservation, cost, now_ms in (("p.1", 17, 1_800_000_000_123), ("p.2", 0, 1_800_086_399_999)):
        expected = hiredis.pack_command(
            ("EVALSHA", ADMIT_SHA, 7, *b.keys("j-1"), *_admit_args(b, reservation, cost, now_ms))
        )
        assert _admit_packed(b, "j-1", reservation, cost, now_ms) == expected


def test_a_running_request_renews_its_slot_so_a_long_stream_gives_its_client_no_extra_one(
    shared, redis_client
):
    # a slot lived 15 minutes whatever ran in it: a stream running longer gave its client one more slot
    # every 15 minutes. A renewal keeps it; only a crashed process's slot is reclaimed.
    from gateway.ratelimit import SLOT_TTL_MS

    local, b = LocalLimiter(), buckets(concurrency=1)
    start = 1_800_000_000.0
    assert local.admit(SERVICE, b, "long", 1, now=start).allowed
    local.hold(b, "long", now=start + SLOT_TTL_MS / 2000)
    assert local.admit(SERVICE, b, "second", 1, now=start + SLOT_TTL_MS / 1000 + 1).limit == "concurrency"
    local.settle(SERVICE, b, "long", reserved=1, used=1)
    local.hold(b, "long", now=start + SLOT_TTL_MS / 1000 + 2)  # settled: a late renewal brings nothing back
    assert local.admit(SERVICE, b, "third", 1, now=start + SLOT_TTL_MS / 1000 + 3).allowed

    async def run() -> tuple[float, float, list[bytes]]:
        limiter = await shared()
        await limiter.admit(SERVICE, b, "long", 1)
        in_flight = b.keys(SERVICE.jti)[1]
        redis_client.zadd(in_flight, {"long": 1})  # its 15 minutes all but over
        limiter.hold(b, "long")
        limiter.hold(b, "gone")  # never admitted, or settled: not added
        await limiter.flush()
        renewed = redis_client.zscore(in_flight, "long")
        await close(limiter)
        return time.time() * 1000, renewed, redis_client.zrange(in_flight, 0, -1)

    now_ms, renewed, held = asyncio.run(run())
    assert now_ms + SLOT_TTL_MS - 5_000 < renewed <= now_ms + SLOT_TTL_MS
    assert held == [b"long"]


def test_a_ticket_with_a_concurrency_limit_is_renewed_until_it_is_settled(monkeypatch):
    from types import SimpleNamespace

    from gateway import admission

    renewed: list[str] = []
    local = SimpleNamespace(hold=lambda buckets, reservation: renewed.append(reservation))
    rt = SimpleNamespace(limiter_redis=None, limiter_local=local)
    ticket = admission.Ticket(
        buckets=buckets(concurrency=1),
        admission=Admission(allowed=True, reserved_tokens=1),
        headers={},
        shared=False,
        reservation="r1",
    )
    hold = admission.SlotHold(rt, ticket)  # type: ignore[arg-type]

    async def run() -> tuple[bool, bool]:
        monkeypatch.setattr(admission, "SLOT_RENEW_S", 0.0)
        hold.late()  # the sweeper calls it once SLOT_RENEW_S has passed: renewed, and due again
        due_again = hold in admission.SLOT_HOLDS.pending
        ticket.hold = hold
        settled = SimpleNamespace(settle=lambda *args: None)
        admission.settle(SimpleNamespace(limiter_redis=None, limiter_local=settled), SERVICE, ticket, 0)  # type: ignore[arg-type]
        return due_again, hold in admission.SLOT_HOLDS.pending

    assert asyncio.run(run()) == (True, False)
    assert renewed == ["r1"]

    from gateway.validation import request_validate

    rt = SimpleNamespace(
        upstreams=SimpleNamespace(context_length=lambda model: 4096),
        limiter_redis=None,
        limiter_local=LocalLimiter(),
    )
    chat = request_validate(
        "chat", b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}', max_tokens_cap=None
    )

    async def admitted(policy: Policy) -> tuple[bool, bool]:
        ticket = await admission.admit(rt, SERVICE, policy, chat, 60)  # type: ignore[arg-type]
        held = ticket.hold is not None and ticket.hold in admission.SLOT_HOLDS.pending
        admission.settle(rt, SERVICE, ticket, 1)  # type: ignore[arg-type]
        return held, ticket.hold is not None and ticket.hold in admission.SLOT_HOLDS.pending

    assert asyncio.run(admitted(Policy(models=frozenset({"m"}), concurrency=2))) == (True, False)
    assert asyncio.run(admitted(Policy(models=frozenset({"m"})))) == (False, False)  # no slot to renew
