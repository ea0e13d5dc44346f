"""The gateway's audit hand-off: nothing handed off is trimmed, and how full the backlog is stays known."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import redis
from django.conf import settings

from audit.sink import BACKLOG_CHECK_S, STREAM, LocalSink, RedisStreamSink, usage_entry, xadd_command
from gateway.redisbatch import RedisBatcher
from gateway.runtime import redis_pool_open


def record(n: int) -> dict[str, Any]:
    return {"record_id": f"{n:032x}", "request_id": f"{n:032x}", "status": 200}


async def until(condition: Callable[[], bool], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def test_an_append_never_trims_the_stream():
    command = xadd_command({"t": "usage", "v": "{}"})
    assert not {"MAXLEN", "MINID"} & {str(part).upper() for part in command}  # trims stored or not


def test_the_sink_reads_the_backlog_with_its_batches_and_is_full_from_its_limit_until_it_drains(
    redis_client,
):
    async def run() -> list[Any]:
        batcher = RedisBatcher(redis_pool_open(settings.REDIS_URL))
        batcher.start()
        sink = RedisStreamSink(batcher.redis, batcher, backlog_limit=10)
        seen: list[Any] = []
        for n in range(9):
            sink.usage(record(n))
        seen.append(await until(lambda: sink.stream_backlog == 9, 2))  # read after its appends
        seen.append(sink.full)
        sink.usage(record(9))
        seen.append(await until(lambda: sink.full, BACKLOG_CHECK_S + 1))  # read again a second after the last
        redis_client.xtrim(STREAM, maxlen=9, approximate=False)  # the ingest stores one and deletes it
        seen.append(await until(lambda: sink.stream_backlog == 9, BACKLOG_CHECK_S + 1))  # read while full
        seen.append(sink.full)  # still: not below nine tenths of the limit
        redis_client.xtrim(STREAM, maxlen=8, approximate=False)
        seen.append(await until(lambda: not sink.full, BACKLOG_CHECK_S + 1))  # no request needed to see it
        await sink.stop()
        await batcher.stop()
        await batcher.redis.aclose()
        return seen

    assert asyncio.run(run()) == [True, False, True, True, True, True]
    assert redis_client.xlen(STREAM) == 8


def test_records_redis_does_not_take_stay_in_the_process_and_fill_it_to_its_limit():
    asyncio.run(records_redis_does_not_take())  # the sink's timers need a running loop


async def records_redis_does_not_take() -> None:
    class Host:
        def rider_add(self, rider: Any) -> None:
            pass

        def nudge(self, within_s: float) -> None:
            pass

    sink = RedisStreamSink(None, Host(), backlog_limit=100, buffer_limit=3)
    for n in range(3):
        sink.usage(record(n))
    sent = sink.take()
    assert [c[0] for c in sent] == ["XADD", "XADD", "XADD", "XLEN"]
    assert not sink.full  # handed to the batch
    sink.done(sent, [b"1-0"], redis.ConnectionError("gone"))  # one appended, then Redis went away
    assert sink.backlog == 2
    assert not sink.full
    sink.usage(record(3))
    assert sink.full  # three wait in the process
    again = sink.take()  # they go again in order, the stream's length not asked again within the second
    assert again == [sent[1], sent[2], xadd_command(usage_entry(record(3)))]
    sink.done(again, [b"2-0", b"3-0", b"4-0"], None)
    assert sink.backlog == 0
    assert not sink.full
    assert sink.stream_backlog == 0  # the failed read left it as it was


def test_without_a_host_the_flush_reads_the_backlog_with_its_appends(redis_client):
    async def run() -> tuple[int, bool]:
        client = redis_pool_open(settings.REDIS_URL)
        sink = RedisStreamSink(client, backlog_limit=2)
        sink.usage(record(1))
        sink.usage(record(2))
        await sink.flush()
        await client.aclose()
        return sink.stream_backlog, sink.full

    assert asyncio.run(run()) == (2, True)
    assert redis_client.xlen(STREAM) == 2


def test_the_embedded_sink_is_full_from_its_limit_until_the_database_has_taken_a_tenth(db):
    sink = LocalSink(buffer_limit=10)  # its thread not started: nothing is written but by drain()
    for n in range(9):
        sink.usage(record(n))
    assert not sink.full
    sink.event({"kind": "x"})
    assert sink.full
    assert sink.stream_backlog == 0
    sink._queue.get_nowait()  # the database took one: nine wait, nine tenths of the limit
    assert sink.full
    sink._queue.get_nowait()
    assert not sink.full
