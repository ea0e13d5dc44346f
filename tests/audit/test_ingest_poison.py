"""Ingest: an entry that cannot be stored is set aside with a stand-in, and never holds back the stream."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from django.db import OperationalError

from audit import ingest
from audit.chain import chain_verify
from audit.ingest import GROUP, entries_store, stream_ingest
from audit.models import AuditEvent, UsageRecord
from audit.sink import STREAM, LocalSink, event_entry, usage_entry
from tests.audit.test_ingest import record
from tests.conftest import embedded_sqlite_run

pytestmark = pytest.mark.django_db

MARK = "sk-poison-4f1d"  # what an entry's content carries: never in a stand-in, nor in a log line


def event(**overrides: Any) -> dict[str, Any]:
    base = {
        "kind": "gateway.denied",
        "outcome": "denied",
        "actor": "anonymous",
        "event_id": str(uuid.uuid4()),
        "occurred_at": 1_764_000_000.0,
        "data": {"reason": "invalid_token", "note": MARK},
    }
    base.update(overrides)
    return base


def raw_event(**overrides: Any) -> dict[str, str]:
    return {"t": "event", "v": json.dumps(event(**overrides))}


POISON = {
    "usage, a JSON list": ({"t": "usage", "v": f'["{MARK}"]'}, "TypeError"),
    "usage, JSON null": ({"t": "usage", "v": "null"}, "TypeError"),
    "event, a JSON list": ({"t": "event", "v": f'[1, "{MARK}"]'}, "TypeError"),
    "event, a JSON string": ({"t": "event", "v": f'"{MARK}"'}, "TypeError"),
    "not JSON": ({"t": "event", "v": f"{{{MARK}"}, "JSONDecodeError"),
    "JSON nested 100,000 deep": ({"t": "event", "v": "[" * 100_000 + "]" * 100_000}, "RecursionError"),
    "a type that is not UTF-8": (
        {b"t": b"\xff\xfe", b"v": json.dumps(event()).encode()},
        "UnicodeDecodeError",
    ),
    "a field name that is not UTF-8": (
        {b"\xff": b"x", b"t": b"event", b"v": json.dumps(event()).encode()},
        "UnicodeDecodeError",
    ),
    "an unknown type": ({"t": "audit", "v": json.dumps(event())}, "ValueError"),
    "no fields": ({}, "ValueError"),
    "event data, a list": (raw_event(data=[1, MARK]), "TypeError"),
    "event data, a string": (raw_event(data=MARK), "TypeError"),
    "event ip, a number": (raw_event(ip=5), "TypeError"),
    "event ip, not an address": (raw_event(ip=MARK), "ValueError"),
    "event id, not a UUID": (raw_event(event_id="not-a-uuid"), "ValueError"),
    "event id, a number": (raw_event(event_id=5), "TypeError"),
    "event time, 1e300": (raw_event(occurred_at=1e300), "OverflowError"),
    "event time, Infinity": (raw_event(occurred_at=float("inf")), "OverflowError"),
    "event time, text": (raw_event(occurred_at=MARK), "ValueError"),
    "event kind, a number": (raw_event(kind=5), "TypeError"),
    "event outcome, a number": (raw_event(outcome=1), "TypeError"),
    "event actor, a list": (raw_event(actor=["a", MARK]), "TypeError"),
    "event client id, an object": (raw_event(client_id={"a": MARK}), "TypeError"),
    "event request id, a number": (raw_event(request_id=12345678), "TypeError"),
    "usage time, 1e300": (
        {"t": "usage", "v": json.dumps(record(occurred_at=1e300, user=MARK))},
        "OverflowError",
    ),
    "usage time, Infinity": (
        {"t": "usage", "v": json.dumps(record(occurred_at=float("inf")))},
        "OverflowError",
    ),
    "usage record id, not a UUID": (
        {"t": "usage", "v": json.dumps(record(record_id="zz", user=MARK))},
        "ValidationError",
    ),
    "usage stream flag, a list": ({"t": "usage", "v": json.dumps(record(stream=[MARK]))}, "ValidationError"),
    "usage address, a list": ({"t": "usage", "v": json.dumps(record(client_ip=[MARK]))}, "ValueError"),
}


def refused() -> list[dict[str, Any]]:
    return [e.data for e in AuditEvent.objects.filter(kind="audit.event_refused").order_by("seq")]


@pytest.mark.parametrize(("poison", "error"), list(POISON.values()), ids=list(POISON))
def test_an_entry_that_cannot_be_stored_is_set_aside_with_a_stand_in_and_its_batch_is_stored(
    poison, error, caplog
):
    good_usage, good_event = record(), event(data={"reason": "invalid_token"})
    entries_store([usage_entry(good_usage), poison, event_entry(good_event)])
    assert UsageRecord.objects.filter(request_id=good_usage["request_id"]).count() == 1
    assert UsageRecord.objects.count() == 1
    assert AuditEvent.objects.filter(event_id=good_event["event_id"]).count() == 1
    stand_ins = refused()
    assert len(stand_ins) == 1, stand_ins
    assert stand_ins[0]["error"] == error
    assert set(stand_ins[0]) <= {"kind", "event_id", "type", "record_id", "error"}
    assert MARK not in json.dumps(stand_ins)
    assert MARK not in caplog.text
    assert chain_verify().ok


def test_a_poisoned_stream_is_read_to_its_end_in_one_run_and_left_empty(redis_client):
    poison = [
        POISON[name][0] for name in ("usage, a JSON list", "event data, a list", "a type that is not UTF-8")
    ]
    ids = [redis_client.xadd(STREAM, fields) for fields in poison]
    goods = [record() for _ in range(3)]
    for good in goods:
        redis_client.xadd(STREAM, usage_entry(good))
    stream_ingest(redis_client, count=500)
    assert UsageRecord.objects.count() == 3
    assert redis_client.xlen(STREAM) == 0
    assert redis_client.xpending(STREAM, GROUP)["pending"] == 0
    assert [data["stream_id"] for data in refused()] == [i.decode() for i in ids]
    redis_client.xadd(STREAM, usage_entry(record()))  # and the next run reads what comes after
    assert stream_ingest(redis_client, count=500) == 1
    assert UsageRecord.objects.count() == 4


def test_a_record_the_database_refuses_leaves_a_stand_in_naming_its_stream_entry(redis_client):
    bad = record(prompt_tokens=-5)
    entry_id = redis_client.xadd(STREAM, usage_entry(bad)).decode()
    redis_client.xadd(STREAM, usage_entry(record()))
    stream_ingest(redis_client, count=500)
    assert UsageRecord.objects.count() == 1
    assert refused() == [
        {"type": "usage", "record_id": bad["record_id"], "stream_id": entry_id, "error": "IntegrityError"}
    ]
    assert redis_client.xlen(STREAM) == 0


def test_a_batch_waits_unacknowledged_while_the_database_is_down(redis_client, monkeypatch):
    real = ingest.audit_record
    failures: list[str] = []

    def drops_once(**fields: Any) -> Any:
        if not failures:  # the connection is lost as the batch's first event is written
            failures.append(fields["kind"])
            raise OperationalError("server closed the connection unexpectedly")
        return real(**fields)

    monkeypatch.setattr(ingest, "audit_record", drops_once)
    redis_client.xadd(STREAM, usage_entry(record()))
    redis_client.xadd(STREAM, event_entry(event()))
    redis_client.xadd(STREAM, POISON["event data, a list"][0])
    with pytest.raises(OperationalError):
        stream_ingest(redis_client, count=500)
    assert failures == ["gateway.denied"]
    assert redis_client.xpending(STREAM, GROUP)["pending"] == 3  # read, and waiting to be read again
    assert UsageRecord.objects.count() == 0
    assert not AuditEvent.objects.exists()
    assert stream_ingest(redis_client, count=500) == 3  # the worker's own entries, read again
    assert (UsageRecord.objects.count(), len(refused()), redis_client.xlen(STREAM)) == (1, 1, 0)
    assert AuditEvent.objects.filter(kind="gateway.denied").count() == 1  # stored, not set aside


def test_the_embedded_sink_sets_a_bad_entry_aside_and_empties_its_queue():
    sink = LocalSink()  # its thread not started: nothing is written but by drain()
    sink.usage(record())
    sink.event(event(data=[1, 2]))
    sink.usage(record(record_id="zz"))
    sink.event(event(data={"reason": "x"}))
    assert sink.drain() == 4
    assert sink.backlog == 0
    assert UsageRecord.objects.count() == 1
    assert [e.kind for e in AuditEvent.objects.order_by("seq")] == [
        "audit.event_refused",  # the record id, refused when the usage records are stored
        "audit.event_refused",  # the event, in its place in the batch
        "gateway.denied",
    ]
    assert [data["error"] for data in refused()] == ["ValidationError", "TypeError"]
    assert chain_verify().ok


def test_the_embedded_default_on_sqlite_sets_bad_entries_aside(tmp_path):
    goods = json.dumps(json.dumps([usage_entry(record()), event_entry(event(data={"ms": 1e16}))]))
    code = f"""
import json
from audit.chain import chain_verify
from audit.ingest import entries_store
from audit.models import AuditEvent, UsageRecord
goods = json.loads({goods})
bad = [{{"t": "usage", "v": "[]"}}, {{"t": "event", "v": '{{"kind": 5}}'}}, {{"t": "usage", "v": "1e999"}}]
entries_store([bad[0], goods[0], bad[1], goods[1], bad[2]])
print(UsageRecord.objects.count(), list(AuditEvent.objects.order_by("seq").values_list("kind", flat=True)))
print(chain_verify().ok)
"""
    result = embedded_sqlite_run(tmp_path, code)
    assert result.returncode == 0, result.stderr[-3000:]
    counted, verified = result.stdout.strip().splitlines()[-2:]
    assert (
        counted == "1 ['audit.event_refused', 'audit.event_refused', 'gateway.denied', 'audit.event_refused']"
    )
    assert verified == "True"


def test_events_set_aside_as_they_are_read_cost_their_batch_no_second_pass(monkeypatch):
    stores = []
    usage_store = ingest._usage_store

    def counted(records: list[dict[str, Any]]) -> Any:
        stores.append(len(records))
        return usage_store(records)

    monkeypatch.setattr(ingest, "_usage_store", counted)
    bad = [
        raw_event(kind=5),
        raw_event(actor=["a"]),
        raw_event(data=[1]),
        raw_event(ip="x"),
        raw_event(event_id="z"),
    ]
    assert entries_store([usage_entry(record()), *bad, event_entry(event())]) == (1, 6)
    assert stores == [1]  # the batch went in once: no event of it failed in its transaction
    assert len(refused()) == 5
    assert chain_verify().ok
