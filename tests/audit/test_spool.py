"""The audit spool: what a stopping gateway could not hand off to Redis is written to a file, and the next
process adopts it, hands it off first, and deletes the file once Redis has taken every record."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from django.conf import settings

from audit import spool
from audit.sink import STREAM, RedisStreamSink, usage_entry
from audit.spool import STALE_TMP_S, Scan, spool_adopt, spool_release, spool_write
from gateway.runtime import redis_pool_open


class Host:
    def rider_add(self, rider: Any) -> None:
        pass

    def nudge(self, within_s: float) -> None:
        pass


def entries(*numbers: int) -> list[dict[str, str]]:
    return [usage_entry({"record_id": f"{n:032x}", "status": 200}) for n in numbers]


def test_a_spool_is_read_back_whole_in_order_oldest_file_first_and_only_its_owner_may_read_it(tmp_path):
    first = spool_write(tmp_path, entries(1, 2))
    second = spool_write(tmp_path, entries(3))
    assert first.name < second.name
    assert stat.S_IMODE(first.stat().st_mode) == 0o600
    assert not list(tmp_path.glob("*.tmp"))
    adopted = spool_adopt(tmp_path, 100).adopted
    assert [a.path for a in adopted] == [first, second]
    assert [r for a in adopted for r in a.records] == entries(1, 2, 3)
    for a in adopted:
        spool_release(a)
    assert not list(tmp_path.iterdir())


def test_a_file_another_process_holds_is_left_to_it(tmp_path):
    spool_write(tmp_path, entries(1))
    # a second open of the file is another lock holder, as another process's would be
    held = spool_adopt(tmp_path, 100).adopted
    assert len(held) == 1
    assert spool_adopt(tmp_path, 100).adopted == []
    spool_release(held[0])
    assert spool_adopt(tmp_path, 100).adopted == []  # handed off and deleted: nothing for anyone


def test_a_file_deleted_by_its_adopter_between_listing_and_locking_is_not_read_again(tmp_path, monkeypatch):
    path = spool_write(tmp_path, entries(1))
    held = spool_adopt(tmp_path, 100).adopted
    real_open = os.open

    def open_then_release(file: Any, flags: int, *args: Any) -> int:
        fd = real_open(file, flags, *args)
        if Path(file) == path and held:
            spool_release(held.pop())  # the owner finishes just after this process opened the file
        return fd

    monkeypatch.setattr(os, "open", open_then_release)
    assert spool_adopt(tmp_path, 100).adopted == []


def test_a_damaged_spool_file_is_set_aside_whole_and_logged_once_and_the_others_are_adopted(tmp_path, caplog):
    good = spool_write(tmp_path, entries(1))
    damaged = tmp_path / "audit-00000000000000000000-1-00000000.jsonl"
    damaged.write_text('{"t": "usage", "v": "{}"}\nnot json\n')
    scan = spool_adopt(tmp_path, 100)
    assert [a.path for a in scan.adopted] == [good]
    assert scan.set_aside == [damaged.name]
    assert not damaged.exists()
    kept = tmp_path / f"{damaged.name}.set-aside"
    assert kept.read_text() == '{"t": "usage", "v": "{}"}\nnot json\n'  # whole, for a person to read
    assert caplog.text.count("could not be parsed; set aside") == 1
    spool_release(scan.adopted[0])
    assert spool_adopt(tmp_path, 100) == Scan()  # not read again
    assert kept.exists()


def test_a_line_nested_too_deep_for_json_is_damage_too_and_leaves_nothing_locked(tmp_path):
    good = spool_write(tmp_path, entries(1))
    deep = tmp_path / "audit-99999999999999999999-1-00000000.jsonl"
    deep.write_text("[" * 100_000 + "\n")  # json.loads raises RecursionError, not ValueError
    scan = spool_adopt(tmp_path, 100)
    assert [a.path for a in scan.adopted] == [good]
    assert scan.set_aside == [deep.name]
    spool_release(scan.adopted[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{deep.name}.set-aside"]


def test_a_scan_that_fails_lets_go_of_every_file_it_locked(tmp_path, monkeypatch):
    first = spool_write(tmp_path, entries(1))
    spool_write(tmp_path, entries(2))
    real_read = spool._read_locked

    def fails_on_the_second(path: Path, fd: int, scan: Scan) -> Any:
        if path != first:
            raise RuntimeError("a bug")
        return real_read(path, fd, scan)

    monkeypatch.setattr(spool, "_read_locked", fails_on_the_second)
    with pytest.raises(RuntimeError):
        spool_adopt(tmp_path, 100)
    monkeypatch.setattr(spool, "_read_locked", real_read)
    scan = spool_adopt(tmp_path, 100)  # a second open is another lock holder: both free again
    assert [r for a in scan.adopted for r in a.records] == entries(1, 2)
    for a in scan.adopted:
        spool_release(a)


def test_a_file_that_cannot_be_read_is_left_in_place_and_logged_once(tmp_path, caplog, monkeypatch):
    path = spool_write(tmp_path, entries(1))

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(spool, "open", failing, raising=False)  # the disk fails, not the file
    assert spool_adopt(tmp_path, 100) == Scan()
    assert spool_adopt(tmp_path, 100) == Scan()
    assert caplog.text.count(f"the audit spool file {path} could not be read") == 1
    monkeypatch.undo()
    (adopted,) = spool_adopt(tmp_path, 100).adopted  # still there, whole
    assert adopted.records == entries(1)
    spool_release(adopted)


def test_a_lock_that_fails_is_logged_once_and_again_for_a_file_that_comes_back(tmp_path, caplog, monkeypatch):
    path = spool_write(tmp_path, entries(1))

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(37, "No locks available")  # a network file system without lock support

    monkeypatch.setattr(fcntl, "flock", no_locks)
    spool_adopt(tmp_path, 100)
    spool_adopt(tmp_path, 100)
    assert caplog.text.count("could not be locked") == 1
    content = path.read_bytes()
    path.unlink()
    spool_adopt(tmp_path, 100)  # gone: forgotten
    path.write_bytes(content)
    spool_adopt(tmp_path, 100)
    assert caplog.text.count("could not be locked") == 2


def test_a_spool_file_that_cannot_be_opened_is_logged_once_and_left_where_it_is(
    tmp_path, caplog, monkeypatch
):
    path = spool_write(tmp_path, entries(1))
    real_open = os.open

    def refused(file: Any, flags: int, *args: Any) -> int:
        if Path(file) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, flags, *args)

    monkeypatch.setattr(os, "open", refused)
    assert spool_adopt(tmp_path, 100) == Scan()
    assert spool_adopt(tmp_path, 100) == Scan()
    assert caplog.text.count(f"the audit spool file {path} could not be opened") == 1
    assert path.exists()


def test_a_temporary_file_a_dead_writer_left_is_recovered_and_adopted_and_a_fresh_one_is_left(tmp_path):
    stale = spool_write(tmp_path, entries(1, 2)).rename(
        tmp_path / "audit-00000000000000000001-7-0000aaaa.tmp"
    )
    torn = tmp_path / "audit-00000000000000000002-8-0000bbbb.tmp"
    torn.write_text(stale.read_text()[:-20])  # cut short mid-record
    fresh = spool_write(tmp_path, entries(3)).rename(tmp_path / "audit-00000000000000000003-9-0000cccc.tmp")
    old = time.time() - STALE_TMP_S - 1
    for path in (stale, torn):
        os.utime(path, (old, old))
    scan = spool_adopt(tmp_path, 100)
    recovered, cut = (
        "audit-00000000000000000001-7-0000aaaa.jsonl",
        "audit-00000000000000000002-8-0000bbbb.jsonl",
    )
    assert scan.recovered == [recovered, cut]
    assert [a.path.name for a in scan.adopted] == [recovered, cut]
    assert [a.records for a in scan.adopted] == [entries(1, 2), entries(1)]  # the record cut off is dropped
    assert scan.cut_short == [cut]
    assert scan.set_aside == []
    assert fresh.exists()  # being written, as far as anyone can tell
    for a in scan.adopted:
        spool_release(a)
    assert [p.name for p in tmp_path.iterdir()] == [fresh.name]


def test_a_last_record_whole_but_without_its_line_break_is_kept(tmp_path):
    path = spool_write(tmp_path, entries(1, 2))
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    scan = spool_adopt(tmp_path, 100)
    assert scan.adopted[0].records == entries(1, 2)
    assert scan.cut_short == []
    spool_release(scan.adopted[0])


def test_adopted_records_go_first_and_their_file_is_deleted_once_redis_took_them_all(tmp_path):
    asyncio.run(adopted_records_go_first(tmp_path))


async def adopted_records_go_first(tmp_path: Path) -> None:
    spooled = spool_write(tmp_path, entries(1, 2))
    sink = RedisStreamSink(None, Host())
    sink.usage({"record_id": f"{3:032x}", "status": 200})
    assert sink.adopt(spool_adopt(tmp_path, 100).adopted) == 2
    sent = sink.take()
    assert [json.loads(c[6])["record_id"] for c in sent if c[0] == "XADD"] == [f"{n:032x}" for n in (1, 2, 3)]
    sink.done(sent, [b"1-0"], redis.ConnectionError("gone"))  # the first taken, then Redis went away
    assert spooled.exists()  # one of its records still waits
    again = sink.take()
    sink.done(again, [b"2-0", b"3-0"], None)
    assert not spooled.exists()
    assert sink.backlog == 0


def test_a_stop_spools_what_is_held_and_lets_go_of_the_adopted_files_it_holds(tmp_path):
    asyncio.run(a_stop_spools(tmp_path))
    assert not list(tmp_path.iterdir())  # nothing held at the second stop: no empty file


async def a_stop_spools(tmp_path: Path) -> None:
    adopted_file = spool_write(tmp_path, entries(1, 2))
    sink = RedisStreamSink(None, Host())
    sink.adopt(spool_adopt(tmp_path, 100).adopted)
    sent = sink.take()
    sink.done(sent, [b"1-0"], redis.ConnectionError("gone"))
    sink.usage({"record_id": f"{3:032x}", "status": 200})
    assert sink.spool(tmp_path) == 2  # the adopted record not taken, and the new one
    assert not adopted_file.exists()
    assert sink.backlog == 0
    (new,) = spool_adopt(tmp_path, 100).adopted
    assert [json.loads(r["v"])["record_id"] for r in new.records] == [f"{n:032x}" for n in (2, 3)]
    spool_release(new)
    assert sink.spool(tmp_path) == 0


def test_without_a_host_the_flush_hands_off_adopted_records_and_deletes_their_file(tmp_path, redis_client):
    spooled = spool_write(tmp_path, entries(1, 2))

    async def run() -> int:
        client = redis_pool_open(settings.REDIS_URL)
        sink = RedisStreamSink(client)
        sink.adopt(spool_adopt(tmp_path, 100).adopted)
        await sink.flush()
        await client.aclose()
        return sink.backlog

    assert asyncio.run(run()) == 0
    assert redis_client.xlen(STREAM) == 2
    assert not spooled.exists()


def test_adoption_stops_at_its_limit_and_leaves_the_other_files_for_later(tmp_path):
    files = [spool_write(tmp_path, entries(2 * n, 2 * n + 1)) for n in range(3)]
    adopted = spool_adopt(tmp_path, 5).adopted  # whole files, as many as hold five records at most
    assert [a.path for a in adopted] == files[:2]
    later = spool_adopt(tmp_path, 1).adopted
    assert [a.path for a in later] == files[2:]  # the first file it finds, whatever that holds
    for a in adopted + later:
        spool_release(a)


def test_a_spool_file_that_cannot_be_deleted_is_logged_and_its_lock_let_go(tmp_path, caplog, monkeypatch):
    spool_write(tmp_path, entries(1))
    (adopted,) = spool_adopt(tmp_path, 1).adopted

    def refused(self: Path, missing_ok: bool = False) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    with monkeypatch.context() as patched:
        patched.setattr(Path, "unlink", refused)
        spool_release(adopted)  # does not raise
    assert "could not be deleted" in caplog.text
    (again,) = spool_adopt(tmp_path, 1).adopted  # still there, and no longer locked: adopted again
    spool_release(again)
