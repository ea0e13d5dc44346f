"""The Redis batcher: concurrent callers share round trips, yet each gets its own reply or error."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from typing import Any

import pytest
import redis
from django.conf import settings

from gateway.redisbatch import Command, RedisBatcher, RedisUnanswered
from gateway.runtime import redis_pool_open


class Recorder:
    """A rider that sends what it is given and remembers what came back."""

    def __init__(self) -> None:
        self.pending: list[Command] = []
        self.outcomes: list[tuple[list[Any], BaseException | None]] = []

    def take(self) -> list[Command]:
        batch, self.pending = self.pending, []
        return batch

    def done(self, sent: list[Command], replies: list[Any], error: BaseException | None) -> None:
        self.outcomes.append((replies, error))
        self.pending[:0] = sent[len(replies) :]  # what got no reply goes again


async def closed(batcher: RedisBatcher) -> None:
    await batcher.stop()
    await batcher.redis.aclose()


def test_concurrent_calls_each_get_their_own_reply_in_order(redis_client):
    async def run() -> tuple[list[Any], list[int]]:
        batcher = RedisBatcher(redis_pool_open(settings.REDIS_URL))
        replies = await asyncio.gather(*(batcher.call("INCR", "counter") for _ in range(200)))
        sizes = []
        original = batcher._batch

        async def counting(link: int, *, wait: bool = False) -> bool:
            sizes.append(len(batcher._calls))
            return await original(link, wait=wait)

        batcher._batch = counting  # type: ignore[method-assign]
        await asyncio.gather(*(batcher.call("PING") for _ in range(50)))
        await closed(batcher)
        return replies, sizes

    replies, sizes = asyncio.run(run())
    assert replies == list(range(1, 201))  # every caller got the reply to its own command, in call order
    assert redis_client.get("counter") == b"200"
    assert max(sizes) > 1  # calls made in one turn of the event loop travelled together


def test_one_failing_command_does_not_fail_its_batch(redis_client):
    redis_client.set("text", "not a number")

    async def run() -> tuple[list[Any], Any]:
        batcher = RedisBatcher(redis_pool_open(settings.REDIS_URL))
        results = await asyncio.gather(
            batcher.call("INCR", "a"),
            batcher.call("INCR", "text"),
            batcher.call("INCR", "b"),
            return_exceptions=True,
        )
        await closed(batcher)
        return list(results), redis_client.get("b")

    results, b = asyncio.run(run())
    assert results[0] == 1
    assert results[2] == 1
    assert isinstance(results[1], redis.ResponseError)
    assert b == b"1"


def test_riders_travel_with_calls_and_get_their_replies(redis_client):
    async def run() -> Recorder:
        batcher = RedisBatcher(redis_pool_open(settings.REDIS_URL))
        rider = Recorder()
        batcher.rider_add(rider)
        rider.pending = [("SET", "r1", "x"), ("INCR", "r2")]
        await batcher.call("PING")
        await closed(batcher)
        return rider

    rider = asyncio.run(run())
    assert rider.outcomes == [([b"OK", 1], None)]
    assert redis_client.get("r1") == b"x"


def test_riders_go_on_their_own_after_a_nudge(redis_client):
    async def run() -> Recorder:
        batcher = RedisBatcher(redis_pool_open(settings.REDIS_URL))
        batcher.start()
        rider = Recorder()
        batcher.rider_add(rider)
        rider.pending = [("SET", "alone", "1")]
        batcher.nudge(0.01)
        for _ in range(100):
            if rider.outcomes:
                break
            await asyncio.sleep(0.01)
        await closed(batcher)
        return rider

    assert asyncio.run(run()).outcomes == [([b"OK"], None)]
    assert redis_client.get("alone") == b"1"


def test_redis_down_fails_the_callers_and_keeps_the_riders_commands():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket closes

    async def run() -> tuple[BaseException | None, Recorder]:
        batcher = RedisBatcher(redis_pool_open(f"redis://127.0.0.1:{port}/0"))
        rider = Recorder()
        batcher.rider_add(rider)
        rider.pending = [("SET", "kept", "1")]
        error = None
        try:
            await batcher.call("PING")
        except redis.ConnectionError as exc:
            error = exc
        await closed(batcher)
        return error, rider

    error, rider = asyncio.run(run())
    assert isinstance(error, redis.ConnectionError)
    assert not isinstance(error, RedisUnanswered)  # refused: the command never left
    assert rider.pending == [("SET", "kept", "1")]  # handed back, for the next batch
    assert rider.outcomes
    assert rider.outcomes[0][0] == []  # no reply: all of it came back


@pytest.mark.parametrize("calls", [0, 3])
def test_stop_sends_what_the_riders_still_hold(redis_client, calls):
    async def run() -> None:
        batcher = RedisBatcher(redis_pool_open(settings.REDIS_URL))
        rider = Recorder()
        batcher.rider_add(rider)
        for _i in range(calls):
            await batcher.call("INCR", "before")
        rider.pending = [("SET", f"late{i}", "1") for i in range(5)]
        await closed(batcher)

    asyncio.run(run())
    assert redis_client.exists(*(f"late{i}" for i in range(5))) == 5


BUSY = (  # keeps Redis busy for ARGV[1] microseconds: a batch that is in flight for a while
    "EVAL",
    "local s=redis.call('TIME') local e=s[1]*1000000+s[2]+tonumber(ARGV[1]) "
    "while true do local t=redis.call('TIME') if t[1]*1000000+t[2]>e then return 1 end end",
    0,
)


def test_stop_lets_the_batch_in_flight_finish_and_sends_nothing_twice(redis_client):
    async def run() -> None:
        batcher = RedisBatcher(redis_pool_open(settings.REDIS_URL))
        rider = Recorder()
        batcher.rider_add(rider)
        rider.pending = [("INCR", "once")]
        busy = asyncio.ensure_future(batcher.call(*BUSY, 200_000))
        await asyncio.sleep(0.05)  # the batch (the rider's INCR, then the busy script) is in flight
        await closed(batcher)
        assert await busy == 1

    asyncio.run(run())
    assert redis_client.get("once") == b"1"


def test_stop_hands_off_everything_the_riders_hold_while_redis_takes_it(redis_client):
    class OneAtATime(Recorder):
        def take(self) -> list[Command]:
            batch, self.pending = self.pending[:1], self.pending[1:]
            return batch

    async def run() -> Recorder:
        batcher = RedisBatcher(redis_pool_open(settings.REDIS_URL))
        rider = OneAtATime()
        batcher.rider_add(rider)
        rider.pending = [("INCR", "stopped")] * 120  # more batches than a fixed number of tries once allowed
        await closed(batcher)
        return rider

    assert asyncio.run(run()).pending == []
    assert redis_client.get("stopped") == b"120"


def test_a_call_after_stop_is_refused_as_redis_down_and_starts_nothing(redis_client):
    async def run() -> RedisBatcher:
        batcher = RedisBatcher(redis_pool_open(settings.REDIS_URL))
        await batcher.call("PING")
        await closed(batcher)
        with pytest.raises(redis.ConnectionError):
            await batcher.call("PING")
        return batcher

    assert asyncio.run(run())._tasks == []


def test_flush_waits_for_batches_already_in_flight(redis_client):
    async def run() -> None:
        batcher = RedisBatcher(redis_pool_open(settings.REDIS_URL))
        rider = Recorder()
        batcher.rider_add(rider)
        await batcher.call("PING")  # the links are running
        rider.pending = [(*BUSY, 100_000), ("SET", "flushed", "1")]
        batcher.nudge(0)
        await asyncio.sleep(0.01)  # another link took them and is waiting on the busy script
        assert await batcher.flush()
        assert redis_client.get("flushed") == b"1"
        await closed(batcher)

    asyncio.run(run())


def test_a_batch_that_times_out_fails_the_callers_queued_behind_it_at_once(redis_client, monkeypatch):
    from gateway import redisbatch

    monkeypatch.setattr(redisbatch, "BATCH_TIMEOUT_S", 0.1)

    async def run() -> list[Any]:
        batcher = RedisBatcher(redis_pool_open(settings.REDIS_URL), links=1)
        slow = asyncio.ensure_future(batcher.call(*BUSY, 300_000))
        await asyncio.sleep(0.02)
        queued = [asyncio.ensure_future(batcher.call("PING")) for _ in range(3)]
        results = await asyncio.gather(slow, *queued, return_exceptions=True)
        await closed(batcher)
        return list(results)

    results = asyncio.run(run())
    redis_client.ping()  # the busy script outlives the timeout: wait, so that the next test finds Redis free
    assert all(isinstance(r, redis.TimeoutError) for r in results)
    assert isinstance(results[0], RedisUnanswered)  # it reached Redis, which may have run it
    assert not any(isinstance(r, RedisUnanswered) for r in results[1:])  # these never left


def test_a_call_on_a_quiet_batcher_leaves_before_its_caller_first_waits(redis_client):
    """With no batch in flight, the caller sends its own batch: no turn of the event loop to hand over."""

    async def run() -> tuple[Any, Any]:
        batcher = RedisBatcher(redis_pool_open(settings.REDIS_URL))
        await batcher.call("PING")  # the links are running, and now parked
        await asyncio.sleep(0.01)  # Redis has been quiet for longer than CARRY_AFTER_QUIET_S
        call = asyncio.ensure_future(batcher.call("RPUSH", "quiet", "sent"))
        await asyncio.sleep(0)  # one turn: the call's task ran up to its first wait
        seen = redis_client.blpop(["quiet"], timeout=2)  # blocks the loop on purpose: no link task can run
        reply = await call
        await closed(batcher)
        return seen, reply

    seen, reply = asyncio.run(run())
    assert seen == (b"quiet", b"sent")
    assert reply == 1


def test_a_call_right_after_a_batch_waits_for_a_link_to_take_it(redis_client, monkeypatch):
    """Under load batches follow each other closely: a call then travels with the next link's batch."""
    from gateway import redisbatch

    monkeypatch.setattr(redisbatch, "CARRY_AFTER_QUIET_S", 60.0)  # "closely", whatever the machine's pace

    async def run() -> tuple[Any, Any]:
        batcher = RedisBatcher(redis_pool_open(settings.REDIS_URL))
        await batcher.call("PING")
        call = asyncio.ensure_future(batcher.call("RPUSH", "busy", "sent"))
        await asyncio.sleep(0)
        seen = redis_client.blpop(["busy"], timeout=0.2)  # blocks the loop: the link cannot send it yet
        reply = await call
        await closed(batcher)
        return seen, reply

    seen, reply = asyncio.run(run())
    assert seen is None
    assert reply == 1
    assert redis_client.lrange("busy", 0, -1) == [b"sent"]


WAIT_200MS = ("BLPOP", "never-pushed", 0.2)  # in flight for 200 ms without holding up other connections


def test_a_call_while_a_carried_batch_is_in_flight_goes_on_another_link(redis_client):
    async def run() -> tuple[Any, bool]:
        batcher = RedisBatcher(redis_pool_open(settings.REDIS_URL))
        await batcher.call("PING")
        await asyncio.sleep(0.01)
        blocked = asyncio.ensure_future(batcher.call(*WAIT_200MS))
        await asyncio.sleep(0.02)  # the blocking pop is in flight on the caller's own task
        pong = await batcher.call("PING")
        blocked_done = blocked.done()
        assert await blocked is None
        await closed(batcher)
        return pong, blocked_done

    pong, blocked_done = asyncio.run(run())
    assert pong == b"PONG"
    assert not blocked_done  # answered on a second connection, not queued behind the carried batch


def test_a_cancelled_carrier_hands_the_riders_their_commands_and_the_link_recovers(redis_client):
    async def run() -> tuple[Recorder, Any]:
        batcher = RedisBatcher(redis_pool_open(settings.REDIS_URL))
        await batcher.call("PING")
        rider = Recorder()
        batcher.rider_add(rider)
        rider.pending = [("INCR", "ridden")]
        await asyncio.sleep(0.01)
        carrier = asyncio.ensure_future(batcher.call("BLPOP", "never-pushed", 2))
        # the rider's INCR is answered, the blocking pop is not (a wide margin: beside another test worker
        # on two cores the INCR's reply was read later than 50 ms in more than one run in three)
        await asyncio.sleep(0.5)
        carrier.cancel()
        with pytest.raises(asyncio.CancelledError):
            await carrier
        after = await asyncio.gather(*(batcher.call("INCR", "after") for _ in range(3)))
        await closed(batcher)
        return rider, after

    rider, after = asyncio.run(run())
    assert rider.outcomes == [([1], None)]  # its command was answered before the break: nothing to resend
    assert rider.pending == []
    assert redis_client.get("ridden") == b"1"
    assert sorted(after) == [1, 2, 3]  # the dropped connection was replaced


async def quiet_batcher(**kwargs: Any) -> RedisBatcher:
    """A batcher whose links are running and parked, and whose Redis has been quiet long enough that the
    next call is carried by its caller."""
    batcher = RedisBatcher(redis_pool_open(settings.REDIS_URL), **kwargs)
    await batcher.call("PING")
    await asyncio.sleep(0.01)
    return batcher


async def done_after_one_turn(batcher: RedisBatcher, *command: Any) -> tuple[bool, Any]:
    """Whether a call was answered by the time its task first gave the event loop back, and its reply."""
    call = asyncio.ensure_future(batcher.call(*command))
    await asyncio.sleep(0)  # the call's task runs until it first waits
    done = call.done()
    return done, await call


def test_a_carried_call_reads_its_reply_without_giving_the_event_loop_back(redis_client):
    """The caller of a carried batch waits for the reply on the spot (here up to a generous 0.5 s, so a
    slow CI machine cannot fail it), so its reply is read in the same step that sent the batch."""
    waits: list[bool] = []

    async def run() -> tuple[bool, Any, list[tuple[list[Any], BaseException | None]]]:
        batcher = await quiet_batcher(reply_wait_s=0.5, waited=waits.append)
        rider = Recorder()
        batcher.rider_add(rider)
        rider.pending = [("INCR", "ridden"), ("INCR", "ridden")]
        done, reply = await done_after_one_turn(batcher, "INCR", "called")
        await closed(batcher)
        return done, reply, rider.outcomes

    done, reply, outcomes = asyncio.run(run())
    assert done
    assert reply == 1
    assert outcomes == [([1, 2], None)]  # the riders' replies, read from the same bytes, went to them
    assert waits == [True]


def test_without_the_wait_a_carried_call_gives_the_event_loop_back(redis_client):
    async def run() -> tuple[bool, Any]:
        batcher = await quiet_batcher(reply_wait_s=0.0)
        result = await done_after_one_turn(batcher, "PING")
        await closed(batcher)
        return result

    assert asyncio.run(run()) == (False, b"PONG")


def test_a_reply_larger_than_one_read_is_whole(redis_client):
    from gateway import redisbatch

    value = os.urandom(redisbatch.REPLY_READ_BYTES * 3)
    redis_client.set("large", value)
    waits: list[bool] = []

    async def run() -> tuple[bool, Any]:
        batcher = await quiet_batcher(reply_wait_s=0.5, waited=waits.append)
        result = await done_after_one_turn(batcher, "GET", "large")
        await closed(batcher)
        return result

    done, reply = asyncio.run(run())
    assert waits == [True]  # the first part came during the wait
    assert reply == value  # and the rest the usual way
    assert not done


def test_a_wait_in_vain_pauses_waiting_and_the_reply_still_comes(redis_client, monkeypatch):
    from gateway import redisbatch

    monkeypatch.setattr(redisbatch, "REPLY_WAIT_PAUSE_S", 0.5)
    waits: list[bool] = []

    async def run() -> list[tuple[bool, Any]]:
        batcher = await quiet_batcher(reply_wait_s=0.05, waited=waits.append)
        results = [await done_after_one_turn(batcher, "BLPOP", "never-pushed", 0.2)]  # answers in 200 ms
        await asyncio.sleep(0.01)
        results.append(await done_after_one_turn(batcher, "PING"))  # within the pause: not waited for
        await asyncio.sleep(0.5)
        results.append(await done_after_one_turn(batcher, "PING"))  # after it: waited for again
        await closed(batcher)
        return results

    results = asyncio.run(run())
    assert results == [(False, None), (False, b"PONG"), (True, b"PONG")]
    assert waits == [False, True]


def test_waits_block_the_event_loop_for_at_most_their_budget_in_each_second(redis_client, monkeypatch):
    from gateway import redisbatch

    monkeypatch.setattr(redisbatch, "REPLY_WAIT_BUDGET_S", 0.05)
    waits: list[bool] = []

    async def run() -> list[tuple[bool, Any]]:
        batcher = await quiet_batcher(reply_wait_s=0.5, waited=waits.append)
        results = [await done_after_one_turn(batcher, "BLPOP", "never-pushed", 0.1)]  # blocks 100 ms
        await asyncio.sleep(0.01)
        results.append(await done_after_one_turn(batcher, "PING"))  # the second's budget is spent
        await asyncio.sleep(1.0)
        results.append(await done_after_one_turn(batcher, "PING"))  # a new second: waited for again
        await closed(batcher)
        return results

    results = asyncio.run(run())
    assert results == [(True, None), (False, b"PONG"), (True, b"PONG")]
    assert waits == [True, True]


def test_the_wait_reads_what_arrives_within_it_and_nothing_after_it():
    from gateway.redisbatch import _read_within

    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    try:
        assert _read_within(ours.fileno(), 0.01) == b""  # nothing came within the wait
        theirs.send(b"+PONG\r\n")
        assert _read_within(ours.fileno(), 1.0) == b"+PONG\r\n"  # there already
        sender = threading.Timer(0.05, theirs.send, args=(b"+LATE\r\n",))
        sender.start()
        started = time.monotonic()
        assert _read_within(ours.fileno(), 5.0) == b"+LATE\r\n"  # came during the wait, taken at once
        assert time.monotonic() - started < 4.0
        sender.join()
        theirs.close()
        assert _read_within(ours.fileno(), 1.0) == b""  # the peer has gone: the read that follows says so
    finally:
        ours.close()
        theirs.close()  # closed already unless an assertion failed first


def test_a_blocking_descriptor_is_not_waited_on():
    """Polled with reads, a blocking descriptor would hold the event loop until the reply came."""
    from gateway.redisbatch import _read_within

    ours, theirs = socket.socketpair()
    try:
        sender = threading.Timer(0.5, theirs.send, args=(b"+PONG\r\n",))
        sender.start()
        started = time.monotonic()
        assert _read_within(ours.fileno(), 0.01) == b""
        assert time.monotonic() - started < 0.4
        sender.join()
    finally:
        ours.close()
        theirs.close()


def test_a_tls_connection_is_never_read_behind_its_tls_layer(redis_client, monkeypatch):
    """Over TLS the socket's bytes are ciphertext: the wait must leave them to the TLS layer. (No Redis
    with TLS runs here, so the connection is made to report a TLS context.)"""
    waits: list[bool] = []

    async def run() -> tuple[bool, Any]:
        batcher = await quiet_batcher(reply_wait_s=0.5, waited=waits.append)
        for connection in batcher._links:
            writer = connection._writer if connection is not None else None
            if writer is not None:
                plain = writer.get_extra_info
                monkeypatch.setattr(
                    writer,
                    "get_extra_info",
                    lambda name, default=None, plain=plain: (
                        object() if name == "sslcontext" else plain(name, default)
                    ),
                )
        result = await done_after_one_turn(batcher, "PING")
        await closed(batcher)
        return result

    assert asyncio.run(run()) == (False, b"PONG")
    assert waits == []


def test_a_connection_closed_during_the_wait_fails_the_call_and_the_batcher_recovers(redis_client):
    waits: list[bool] = []

    def kill_soon(addresses: list[str]) -> None:
        time.sleep(0.1)  # the carried pop is in its wait by then
        for address in addresses:  # the batcher's own connections only: other tests share this Redis
            redis.Redis.from_url(settings.REDIS_URL).client_kill_filter(addr=address)

    async def run() -> tuple[Any, Any]:
        batcher = await quiet_batcher(reply_wait_s=0.5, waited=waits.append)
        addresses = [
            "{}:{}".format(*link._writer.get_extra_info("sockname"))
            for link in batcher._links
            if link is not None and link._writer is not None
        ]
        killer = threading.Thread(target=kill_soon, args=(addresses,))
        killer.start()
        (result,) = await asyncio.gather(batcher.call("BLPOP", "never-pushed", 2), return_exceptions=True)
        killer.join()
        after = await batcher.call("PING")
        await closed(batcher)
        return result, after

    result, after = asyncio.run(run())
    assert isinstance(result, RedisUnanswered)  # Redis hung up without a reply: the usual Redis-down path
    assert waits == [False]
    assert after == b"PONG"
