"""A stopping gateway's audit records that Redis did not take: spooled with an event that counts them, or,
if the spool cannot be written, logged as lost without failing the stop."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from audit.sink import RedisStreamSink, usage_entry
from audit.spool import STALE_TMP_S, spool_adopt, spool_release, spool_write
from gateway.conf import gateway_settings
from gateway.runtime import Runtime


def stop_holding(spool: Path, records: int) -> None:
    """Build a runtime (not started: its Redis is never reached), give its sink records, and stop it as
    ``Runtime.stop`` ends: the records are what Redis did not take."""

    async def run() -> None:
        runtime = Runtime(dataclasses.replace(gateway_settings(), audit_spool_dir=spool))
        for n in range(records):
            runtime.sink.usage({"record_id": f"{n:032x}", "status": 200})
        runtime._spool()
        await runtime.http.close()
        assert runtime.redis is not None
        await runtime.redis.aclose()

    asyncio.run(run())


def test_a_stop_spools_the_records_held_with_an_event_that_counts_them(tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="gateway.runtime"):
        stop_holding(tmp_path, 3)
    (spooled,) = spool_adopt(tmp_path, 100).adopted
    kinds = [json.loads(r["v"]).get("kind") or json.loads(r["v"])["record_id"] for r in spooled.records]
    assert kinds[:3] == [f"{n:032x}" for n in range(3)]
    assert kinds[3] == "gateway.audit_spooled"
    assert json.loads(spooled.records[3]["v"])["data"] == {"records": 3}
    spool_release(spooled)
    assert "3 audit records could not be handed off before stopping; spooled in" in caplog.text


def test_a_spool_that_cannot_be_written_is_logged_as_a_loss_and_the_stop_goes_on(tmp_path, caplog):
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    with caplog.at_level(logging.ERROR, logger="gateway.runtime"):
        stop_holding(blocked, 2)
    assert "2 audit records could not be handed off nor spooled" in caplog.text


def test_nothing_held_writes_no_spool(tmp_path):
    stop_holding(tmp_path, 0)
    assert not list(tmp_path.iterdir())


def test_spool_files_are_adopted_only_while_redis_is_up_and_within_half_the_buffer(tmp_path):
    spool_write(tmp_path, [usage_entry({"record_id": f"{n:032x}"}) for n in range(3)])
    spool_write(tmp_path, [usage_entry({"record_id": f"{n:032x}"}) for n in range(3, 6)])

    async def run() -> list[int]:
        conf = dataclasses.replace(gateway_settings(), audit_spool_dir=tmp_path, audit_buffer_limit=8)
        runtime = Runtime(conf)
        backlogs = []
        runtime.redis_down_since = 1.0
        await runtime._spool_adopt()
        backlogs.append(runtime.sink.backlog)  # Redis down: left for later
        runtime.redis_down_since = None
        await runtime._spool_adopt()
        backlogs.append(runtime.sink.backlog)  # one file: three records reach half of eight
        await runtime._spool_adopt()
        backlogs.append(runtime.sink.backlog)  # no room left for the other
        await runtime.http.close()
        assert runtime.redis is not None
        await runtime.redis.aclose()
        return backlogs

    assert asyncio.run(run()) == [0, 4, 4]  # the three records and the adoption's event


def test_spool_files_set_aside_cut_short_or_left_by_a_dead_writer_are_audited(tmp_path):
    (tmp_path / "audit-00000000000000000000-1-00000000.jsonl").write_text("not json\n")
    cut = spool_write(tmp_path, [usage_entry({"record_id": f"{2:032x}"})])
    cut.write_bytes(cut.read_bytes()[:-10])
    left = spool_write(tmp_path, [usage_entry({"record_id": f"{1:032x}"})])
    left = left.rename(left.with_suffix(".tmp"))
    old = time.time() - STALE_TMP_S - 1
    os.utime(left, (old, old))

    async def run() -> list[dict[str, Any]]:
        runtime = Runtime(dataclasses.replace(gateway_settings(), audit_spool_dir=tmp_path))
        runtime.redis_down_since = None
        await runtime._spool_adopt()
        assert isinstance(runtime.sink, RedisStreamSink)
        sent = runtime.sink.take()
        await runtime.http.close()
        assert runtime.redis is not None
        await runtime.redis.aclose()
        return [json.loads(command[6]) for command in sent if command[0] == "XADD"]

    held = asyncio.run(run())
    events = {record["kind"]: record for record in held if "kind" in record}
    assert events["gateway.audit_spool_set_aside"]["data"] == {
        "files": ["audit-00000000000000000000-1-00000000.jsonl"]
    }
    assert events["gateway.audit_spool_recovered"]["data"] == {"files": [left.with_suffix(".jsonl").name]}
    assert events["gateway.audit_spool_cut_short"]["data"] == {"files": [cut.name]}
    assert events["gateway.audit_spool_adopted"]["data"] == {"records": 1}
    assert [r["record_id"] for r in held if "record_id" in r and "kind" not in r] == [f"{1:032x}"]


def test_settlements_redis_never_took_are_said_lost_at_stop_with_an_event(tmp_path, caplog, settings):
    # they were left to a "will retry" log by a process about to end; their slots expire after 15 minutes
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens: Redis takes nothing

    async def run() -> None:
        runtime = Runtime(dataclasses.replace(gateway_settings(), audit_spool_dir=tmp_path))
        assert runtime.limiter_redis is not None
        unsettled = [("EVALSHA", "sha", 0, 1, "r1", -5), ("EVALSHA", "sha", 0, 1, "r2", 0)]
        runtime.limiter_redis._pending += unsettled
        await runtime.stop()

    with caplog.at_level(logging.ERROR, logger="gateway.runtime"):
        asyncio.run(run())
    assert "2 settlements could not reach Redis before stopping; they are lost" in caplog.text
    (spooled,) = spool_adopt(tmp_path, 100).adopted
    events = [json.loads(r["v"]) for r in spooled.records]
    assert {"kind": "gateway.settlements_lost", "data": {"settlements": 2}}.items() <= events[0].items()
    spool_release(spooled)
