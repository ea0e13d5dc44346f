"""A Redis that is up but refuses writes, or that closed an idle link: what admission and settlement do.

Each test runs its own Redis server (a read-only replica, a failed snapshot or a `timeout` is the whole
server's state, which tests sharing one server must not see), on a port the system picks.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from redis._parsers import BaseParser

from gateway import errors
from gateway.admission import admit, cost_estimate
from gateway.auth import Principal
from gateway.conf import gateway_settings
from gateway.ratelimit import Buckets, RedisLimiter
from gateway.redisbatch import RIDER_RETRY_S, RedisBatcher, _closed_by_peer
from gateway.runtime import Runtime, redis_pool_open
from gateway.selectors import Policy
from gateway.validation import Validated

CLEARED = Principal(jti="j-cleared", client_id="c1", subject="c1", scopes=frozenset(), exp=0)
UNSEEN = Principal(jti="j-unseen", client_id="c1", subject="c1", scopes=frozenset(), exp=0)
POLICY = Policy(models=frozenset({"m1"}), daily_tokens=100_000)
ONE_SLOT = Policy(models=frozenset({"m1"}), concurrency=1, daily_tokens=100_000)
REQUEST = Validated(payload={}, model="m1", stream=False, max_tokens=16, n=1, wants_usage=False)

# What Redis answers when it refuses a write, as redis-py reads it
REFUSALS = [
    "READONLY You can't write against a read only replica. script: 1234, on @user_script:3.",
    "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.",
    "NOREPLICAS Not enough good replicas to write.",
    "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
    "OOM command not allowed when used memory > 'maxmemory'.",
    "LOADING Redis is loading the dataset in memory",
    "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
]


def refuse(kind: str, client: redis.Redis, directory: Path) -> Callable[[], object]:
    """Make the server refuse writes as it does in production; return what makes it take them again."""
    if kind == "read-only replica":  # a failover's old primary, made a replica of a primary not there
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            nowhere = sock.getsockname()[1]
        client.replicaof("127.0.0.1", nowhere)
        return lambda: client.replicaof("NO", "ONE")
    if kind == "failed snapshot":  # MISCONF: a snapshot could not be written (here: its directory is gone)
        directory.rmdir()
        client.config_set("save", "3600 1")
        client.bgsave()
        deadline = time.monotonic() + 10
        while client.info("persistence")["rdb_last_bgsave_status"] != "err":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        return lambda: client.config_set("save", "")
    assert kind == "too few replicas"  # NOREPLICAS
    client.config_set("min-replicas-to-write", "1")
    return lambda: client.config_set("min-replicas-to-write", "0")


events: list[str] = []  # the kinds of the audit events a runtime recorded of its own


async def close_seen(batcher: RedisBatcher) -> None:
    """Wait until the event loop has seen a link's connection closed by its peer (at most 5 s)."""
    for _ in range(250):
        if any(c is not None and _closed_by_peer(c) for c in batcher._links):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the close never reached the event loop")


def runtime_on(url: str, settings: Any) -> Runtime:
    """A gateway runtime (not started: the batcher starts with the first call) on this Redis."""
    settings.REDIS_URL = url
    runtime = Runtime(gateway_settings())
    runtime._system_event = lambda kind, outcome, data: events.append(kind)  # type: ignore[method-assign]
    return runtime


async def runtime_close(runtime: Runtime) -> None:
    assert runtime.batcher is not None
    assert runtime.redis is not None
    await runtime.batcher.stop()
    await runtime.http.close()
    await runtime.redis.aclose()


@pytest.fixture(autouse=True)
def _no_events() -> None:
    events.clear()


@pytest.mark.parametrize("kind", ["read-only replica", "failed snapshot", "too few replicas"])
def test_a_redis_refusing_writes_is_redis_unavailable_not_a_500(own_redis, settings, kind):
    url, client, directory = own_redis

    async def run() -> list[Any]:
        runtime = runtime_on(url, settings)
        seen: list[Any] = [(await admit(runtime, CLEARED, POLICY, REQUEST, 40)).shared]
        taken = refuse(kind, client, directory)
        ticket = await admit(runtime, CLEARED, POLICY, REQUEST, 40)  # cleared a moment ago: served
        seen += [ticket.shared, ticket.admission.fallback, runtime.redis_fallbacks]
        with pytest.raises(errors.RevocationUnavailable):  # fails closed for a token not cleared lately
            await admit(runtime, UNSEEN, POLICY, REQUEST, 40)
        assert runtime.limiter_redis is not None
        seen.append(len(runtime.limiter_redis._pending))  # refused before it ran: nothing to give back
        taken()
        seen.append((await admit(runtime, UNSEEN, POLICY, REQUEST, 40)).shared)
        await runtime_close(runtime)
        return seen

    assert asyncio.run(run()) == [True, False, True, 1, 0, True]
    assert events == ["gateway.redis_unavailable", "gateway.redis_recovered"]


@pytest.mark.parametrize("line", REFUSALS)
def test_every_refusal_before_the_reservation_ran_is_redis_unavailable(line):
    class Refusing:
        async def call(self, *command: Any) -> Any:
            raise BaseParser.parse_error(line)

        def rider_add(self, rider: Any) -> None:
            pass

    limiter = RedisLimiter(Refusing())  # type: ignore[arg-type]
    buckets = Buckets.of(CLEARED, POLICY)
    with pytest.raises(redis.ConnectionError, match=line.split(" ", 1)[1][:20]):  # admission's Redis down
        asyncio.run(limiter.admit(CLEARED, buckets, "r", 56))


def test_an_error_the_reservation_script_raised_is_not_taken_for_an_outage():
    class Failing:
        async def call(self, *command: Any) -> Any:
            raise BaseParser.parse_error("ERR Error running script: user_script:7: bad argument")

        def rider_add(self, rider: Any) -> None:
            pass

    limiter = RedisLimiter(Failing())  # type: ignore[arg-type]
    with pytest.raises(redis.ResponseError) as raised:
        asyncio.run(limiter.admit(CLEARED, Buckets.of(CLEARED, POLICY), "r", 56))
    assert not isinstance(raised.value, redis.ConnectionError)


@pytest.mark.parametrize("kind", ["read-only replica", "failed snapshot", "too few replicas"])
def test_a_settlement_refused_by_redis_is_kept_and_applied_once_redis_takes_writes(own_redis, kind):
    url, client, directory = own_redis
    buckets = Buckets.of(CLEARED, ONE_SLOT)
    day = buckets.keys(CLEARED.jti)[2]

    async def run() -> list[Any]:
        limiter = RedisLimiter(RedisBatcher(redis_pool_open(url)))
        seen: list[Any] = [(await limiter.admit(CLEARED, buckets, "held", 1000)).allowed]
        taken = refuse(kind, client, directory)
        limiter.settle(CLEARED, buckets, "held", reserved=1000, used=10)
        await limiter.flush()
        seen.append(len(limiter._pending))  # refused: kept, not dropped
        taken()
        await limiter.flush()
        seen.append(len(limiter._pending))
        seen.append((await limiter.admit(CLEARED, buckets, "next", 1)).allowed)  # the one slot is free
        await limiter.batcher.stop()
        await limiter.batcher.redis.aclose()
        return seen

    assert asyncio.run(run()) == [True, 1, 0, True]
    assert int(client.get(day)) == 10 + 1  # the reservation was refunded to what was used


@pytest.mark.parametrize("line", REFUSALS)
def test_a_settlement_refused_before_it_ran_goes_again_as_it_was_after_a_pause(line):
    class Host:
        def __init__(self) -> None:
            self.nudged: list[float] = []

        def rider_add(self, rider: Any) -> None:
            pass

        def nudge(self, within_s: float) -> None:
            self.nudged.append(within_s)

    host = Host()
    limiter = RedisLimiter(host)  # type: ignore[arg-type]
    buckets = Buckets.of(CLEARED, POLICY)
    limiter.settle(CLEARED, buckets, "r", reserved=100, used=10)
    sent = limiter.take()
    limiter.done(sent, [b"sha", BaseParser.parse_error(line)], None)
    assert limiter._pending == sent[1:]  # the settlement, unchanged (a first try), without the script load
    assert host.nudged[-1] == RIDER_RETRY_S  # not every 5 ms while Redis refuses


def test_a_link_redis_closed_while_idle_is_made_again_and_the_next_request_is_not_an_outage(
    own_redis, settings
):
    url, client, _directory = own_redis
    client.config_set("timeout", "1")  # Redis closes a connection idle for more than a second

    async def run() -> list[Any]:
        runtime = runtime_on(url, settings)
        seen: list[Any] = [(await admit(runtime, CLEARED, POLICY, REQUEST, 40)).shared]
        deadline = time.monotonic() + 10
        while len(client.client_list()) > 1:  # until only this client is left: the link was closed
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert runtime.batcher is not None
        await close_seen(runtime.batcher)
        ticket = await admit(runtime, UNSEEN, POLICY, REQUEST, 40)  # a token never cleared: else a 503
        seen += [ticket.shared, runtime.redis_fallbacks]
        await runtime_close(runtime)
        return seen

    assert asyncio.run(run()) == [True, True, 0]
    assert events == []  # no outage recorded
    buckets = Buckets.of(CLEARED, POLICY)
    day = buckets.keys(CLEARED.jti)[2]
    assert int(client.get(day)) == 2 * cost_estimate(REQUEST, 40, None)  # each reservation made once


def test_a_batcher_link_closed_by_its_peer_is_made_again_before_the_batch_is_written(own_redis):
    url, client, _directory = own_redis

    async def run() -> list[Any]:
        batcher = RedisBatcher(redis_pool_open(url), links=1)
        replies = [await batcher.call("INCR", "n")]
        client.client_kill_filter(_type="normal", skipme=True)  # as Redis's timeout or a proxy does
        await close_seen(batcher)
        replies.append(await batcher.call("INCR", "n"))
        await batcher.stop()
        await batcher.redis.aclose()
        return replies

    assert asyncio.run(run()) == [1, 2]
