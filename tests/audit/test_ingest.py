"""Ingest: usage records from the gateway's hand-off are stored once each, as the ORM would store them."""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from audit.chain import chain_verify
from audit.ingest import _usage_row, entries_store, stream_ingest
from audit.models import AuditEvent, UsageRecord
from audit.sink import STREAM, event_entry, usage_entry
from tests.conftest import embedded_sqlite_run

pytestmark = pytest.mark.django_db


def record(**overrides: Any) -> dict[str, Any]:
    """A usage record as the gateway hands it off (gateway/consumers/base.py ``_usage``)."""
    base = {
        "record_id": os.urandom(16).hex(),
        "request_id": os.urandom(16).hex(),
        "occurred_at": time.time(),
        "client_id": "client-1",
        "token_id": "0b4c3f0e-3a8b-4b9e-9d1a-6a5f1b2c3d4e",
        "user": "",
        "status": 200,
        "client_ip": "2001:db8::7",
        "endpoint": "chat",
        "model": "m1",
        "stream": True,
        "upstream": "http://127.0.0.1:8001",
        "upstream_ms": 12.5,
        "prompt_tokens": 12,
        "completion_tokens": 16,
        "gateway_ms": 0.31,
        "outcome": "completed",
        "unknown_field": "ignored",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not ...}


def entry(value: dict[str, Any]) -> dict[bytes, bytes]:
    return {b"t": b"usage", b"v": json.dumps(value).encode()}


def stored(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of a batch, in its order, without the fields that identify them (ids)."""
    rows = {
        str(r["record_id"]).replace("-", ""): r
        for r in UsageRecord.objects.filter(record_id__in=[b["record_id"] for b in batch]).values()
    }
    return [{k: v for k, v in rows[b["record_id"]].items() if k not in IDS} for b in batch]


IDS = ("id", "record_id", "request_id")


def test_a_copied_batch_holds_what_the_orm_would_have_stored():
    batch = [
        record(),
        record(client_ip=None, user="42", stream=False, status=429, outcome="denied:429"),
        # what a denial before any upstream call leaves out: model, upstream and the timings
        record(model=..., upstream=..., upstream_ms=..., prompt_tokens=..., completion_tokens=...),
    ]
    with CaptureQueriesContext(connection) as queries:
        assert entries_store([entry(r) for r in batch]) == (3, 0)
    assert not any("INSERT" in q["sql"] for q in queries.captured_queries)  # it went by COPY
    twins = [{**r, "record_id": os.urandom(16).hex(), "request_id": os.urandom(16).hex()} for r in batch]
    UsageRecord.objects.bulk_create([_usage_row(json.loads(json.dumps(r))) for r in twins])  # the ORM's way
    copied = stored(batch)
    assert copied == stored(twins)
    assert copied[0]["occurred_at"].tzinfo is not None
    assert (copied[2]["model"], copied[2]["upstream_ms"]) == ("", 0)  # the model's defaults


def test_a_replayed_batch_and_one_that_overlaps_it_store_each_record_once():
    a, b, c = record(), record(), record()
    entries_store([entry(a), entry(b)])
    with CaptureQueriesContext(connection) as queries:
        entries_store([entry(a), entry(b)])  # a worker that died before acknowledging
    assert any("ON CONFLICT DO NOTHING" in q["sql"] for q in queries.captured_queries)
    entries_store([entry(b), entry(c)])
    assert UsageRecord.objects.count() == 3
    assert {str(r.record_id).replace("-", "") for r in UsageRecord.objects.all()} == {
        a["record_id"],
        b["record_id"],
        c["record_id"],
    }


def test_a_malformed_entry_is_dropped_and_the_rest_of_its_batch_stored():
    good = record()
    assert entries_store([{b"t": b"usage", b"v": b"{not json"}, entry(good)]) == (1, 0)
    assert UsageRecord.objects.get().request_id == good["request_id"]


def test_the_embedded_default_stores_a_batch_once(tmp_path):
    records = json.dumps(json.dumps([record(), record()]))  # a Python string literal of JSON
    code = f"""
import json
from audit.ingest import entries_store
from audit.models import UsageRecord
batch = [{{"t": "usage", "v": json.dumps(r)}} for r in json.loads({records})]
entries_store(batch)
entries_store(batch)
print(UsageRecord.objects.count())
"""
    result = embedded_sqlite_run(tmp_path, code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "2"


def test_values_the_orm_prepares_are_stored_as_the_orm_stores_them():
    batch = [record(client_ip="fe80::1%eth0"), record(client_ip=""), record(prompt_tokens=12.0)]
    assert entries_store([entry(r) for r in batch]) == (3, 0)
    rows = stored(batch)
    assert [row["client_ip"] for row in rows] == ["fe80::1", None, "2001:db8::7"]
    assert rows[2]["prompt_tokens"] == 12


def test_a_record_the_database_refuses_is_dropped_and_does_not_hold_back_its_batch(caplog):
    good = [record(), record()]
    bad = [record(model="m" * 201), record(occurred_at=...)]
    entries = [entry(good[0]), *[entry(r) for r in bad], entry(good[1])]
    assert entries_store(entries) == (4, 0)
    assert len(stored(good)) == 2
    assert UsageRecord.objects.count() == 2
    assert caplog.text.count("dropping a usage record the database refuses") == 2


def test_an_event_the_database_refuses_stands_recorded_as_refused_and_does_not_hold_back_its_batch(caplog):
    good = record()
    fine = event_entry({"kind": "gateway.denied", "outcome": "denied", "data": {"reason": "x"}})
    # JSON PostgreSQL refuses: a NaN as the standard library writes it (a spool file of an older gateway;
    # the sink itself now writes null)
    odd = {
        "kind": "gateway.odd",
        "event_id": str(uuid.uuid4()),
        "occurred_at": 1_764_000_000.0,
        "data": {"ms": float("nan")},
    }
    nan = {"t": "event", "v": json.dumps(odd)}
    no_time = {"t": "event", "v": json.dumps({"kind": "gateway.timeless", "event_id": "e-1"})}
    assert entries_store([entry(good), nan, fine, no_time]) == (1, 3)
    assert len(stored([good])) == 1
    kinds = list(AuditEvent.objects.order_by("id").values_list("kind", flat=True))
    assert kinds == ["audit.event_refused", "gateway.denied", "audit.event_refused"]
    refused = [e.data for e in AuditEvent.objects.filter(kind="audit.event_refused").order_by("id")]
    assert refused[0]["kind"] == "gateway.odd"
    assert refused[0]["error"] == "DataError"
    assert refused[1] == {"kind": "gateway.timeless", "event_id": "e-1", "error": "KeyError"}
    assert caplog.text.count("an audit event the database refuses") == 2
    assert chain_verify().ok


def test_text_postgresql_cannot_hold_is_replaced_and_the_record_stored(caplog):
    # A denied request's model is the client's own text: a lone surrogate ("x\ud800" in its JSON) or a
    # NUL is stored replaced, as audit events store such text (audit.chain.storable), never dropped.
    batch = [record(model="x\ud800", status=403, outcome="denied:model_not_allowed"), record(user="u\x00")]
    good = record()
    assert entries_store([entry(batch[0]), entry(good), entry(batch[1])]) == (3, 0)
    rows = stored([*batch, good])
    assert [row["model"] for row in rows] == ["x?", "m1", "m1"]
    assert rows[1]["user"] == "u\ufffd"
    assert rows[0]["status"] == 403
    assert "dropping" not in caplog.text


def test_a_model_name_postgresql_cannot_hold_keeps_its_batch_on_copy(monkeypatch):
    from django.db.models.query import QuerySet

    def orm_path(*args, **kwargs):
        raise AssertionError("the batch left COPY for the ORM's path")

    monkeypatch.setattr(QuerySet, "bulk_create", orm_path)
    batch = [record(model="x\ud800\x00", status=403, outcome="denied:model_not_allowed"), record()]
    assert entries_store([entry(r) for r in batch]) == (2, 0)
    assert [row["model"] for row in stored(batch)] == ["x?\ufffd", "m1"]


class ReadCounter:
    """The suite's Redis, counting the reads of new entries that ``stream_ingest`` makes."""

    def __init__(self, client: Any) -> None:
        self.client, self.fresh_reads = client, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def xreadgroup(self, group: str, consumer: str, streams: dict[str, str], **kwargs: Any) -> Any:
        self.fresh_reads += streams.get(STREAM) == ">"
        return self.client.xreadgroup(group, consumer, streams, **kwargs)


def hand_off(client: Any, count: int) -> list[dict[str, Any]]:
    records = [record() for _ in range(count)]
    for r in records:
        client.xadd(STREAM, usage_entry(r))
    return records


def test_a_backlog_is_read_batch_after_batch_until_it_is_caught_up(redis_client):
    records = hand_off(redis_client, 125)  # twelve and a half batches: more than ten rounds of them
    reads = ReadCounter(redis_client)
    assert stream_ingest(reads, count=10) == 125
    assert reads.fresh_reads == 13  # the thirteenth came back short: caught up, no read that waits
    assert UsageRecord.objects.count() == 125
    assert redis_client.xlen(STREAM) == 0  # acknowledged and deleted
    assert len(stored(records)) == 125


def test_an_ingest_run_stops_reading_when_its_time_is_up(redis_client):
    hand_off(redis_client, 25)
    assert stream_ingest(redis_client, count=10, budget_s=0) == 10  # one batch, then the budget is spent
    assert redis_client.xlen(STREAM) == 15  # left for the next run
    assert stream_ingest(redis_client, count=10) == 15
    assert UsageRecord.objects.count() == 25


def test_a_run_that_leaves_a_backlog_queues_the_next_at_once_and_one_caught_up_ends_the_chain(
    redis_client, monkeypatch
):
    from audit import tasks

    runs = []

    def one_batch_a_run(client: Any) -> int:  # a run whose second is up after one batch of ten
        runs.append(client.xlen(STREAM))
        return stream_ingest(client, count=10, budget_s=0)

    monkeypatch.setattr(tasks, "stream_ingest", one_batch_a_run)
    monkeypatch.setattr(tasks, "INGEST_BEHIND", 10)
    hand_off(redis_client, 35)
    tasks.audit_stream_ingest_task()  # the suite runs tasks eagerly: a queued run runs here
    assert runs == [35, 25, 15]  # the third left 5, less than a batch: no fourth until the next tick
    assert UsageRecord.objects.count() == 30
    assert redis_client.xlen(STREAM) == 5
