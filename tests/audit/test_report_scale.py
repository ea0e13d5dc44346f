"""Reports at scale: model names are what clients sent, so a period can hold any number of them, and the
tables are cut in the database; scheduled runs that overlap store a period's reports once."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.db import connection

from audit.models import AuditEvent, AuditReport, UsageRecord
from audit.reports import build, report_build, store
from audit.reports.data import Denials, Stats
from audit.services import audit_record

SINCE = datetime(2026, 3, 2, tzinfo=UTC)
UNTIL = SINCE + timedelta(days=1)
# Busiest first: 90 models with three requests each (two served, one denied), then 40 with two (one each),
# among them two whose order differs between code points ("Z" < "b") and a language's collation.
BUSY = [f"m{i:03d}" for i in range(90)]
TIED = [*(f"m{i:03d}" for i in range(90, 128)), "Zeta", "beta"]


def _many_models() -> None:
    rows, n = [], 0
    for model in BUSY + TIED:
        served = 2 if model in BUSY else 1
        for _ in range(served):
            rows.append(_record(f"s{n}", model, 200))
            n += 1
        rows.append(_record(f"d{n}", model, 403))
        audit_record(
            kind="gateway.denied",
            client_id="app",
            request_id=f"d{n}",
            occurred_at=SINCE + timedelta(minutes=1),
            data={"reason": "model_not_allowed", "status": 403},
        )
        n += 1
    UsageRecord.objects.bulk_create(rows)


def _record(rid: str, model: str, status: int) -> UsageRecord:
    return UsageRecord(
        request_id=rid,
        occurred_at=SINCE + timedelta(minutes=1, milliseconds=1),
        client_id="app",
        endpoint="chat",
        model=model,
        status=status,
        prompt_tokens=2,
        completion_tokens=3,
        gateway_ms=1.0,
        upstream_ms=9.0 if status == 200 else 0.0,
        outcome="completed" if status == 200 else "denied:model_not_allowed",
    )


@pytest.mark.django_db
def test_the_model_table_lists_the_busiest_and_the_totals_count_every_request():
    _many_models()
    data = report_build(since=SINCE, until=UNTIL)
    listed = sorted(TIED)[: build.TABLE_ROWS - len(BUSY)]  # ties by name, in code-point order
    assert [row.key for row in data.models] == BUSY + listed
    assert data.models_omitted == len(BUSY) + len(TIED) - build.TABLE_ROWS == 30
    assert (data.clients_omitted, [row.key for row in data.clients]) == (0, ["app"])
    requests = 3 * len(BUSY) + 2 * len(TIED)
    assert (data.totals.requests, data.totals.denied, data.totals.errors) == (requests, 130, 0)
    assert (data.totals.tokens_in, data.totals.tokens_out) == (2 * requests, 3 * requests)
    assert data.totals.denials["scope"] == 130  # the omitted models' denials too
    assert data.clients[0].denials["scope"] == 130
    assert [(d.reason, d.group, d.count) for d in data.denial_reasons] == [
        ("model_not_allowed", "scope", 130)
    ]
    for row in data.models:
        assert (row.denied, row.denials["scope"], row.p50_ms, row.p95_ms) == (1, 1, 10.0, 10.0)
        assert row.requests == (3 if row.key in BUSY else 2)


@pytest.mark.django_db
def test_no_more_rows_than_a_table_lists_are_read_per_model(monkeypatch):
    _many_models()
    stats: list[str] = []
    denials: list[str | None] = []

    def counted_stats(key: str, **fields: Any) -> Stats:
        stats.append(key)
        return Stats(key, **fields)

    def counted_denials(client_id: str, model: str | None, *rest: Any) -> Denials:
        denials.append(model)
        return Denials(client_id, model, *rest)

    monkeypatch.setattr(build, "Stats", counted_stats)
    monkeypatch.setattr(build, "Denials", counted_denials)
    data = report_build(since=SINCE, until=UNTIL)
    assert data.models_omitted == 30
    assert len(stats) == 1 + 1 + build.TABLE_ROWS  # the totals, one client, the models listed
    # one row per listed model (each has a denial), and one for every model the table leaves out
    assert sorted(denials, key=str) == sorted([*(row.key for row in data.models), None], key=str)


# --- scheduled runs that overlap ---------------------------------------------------------------------------


def _in_thread(run: Callable[[], object]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def target() -> None:
        try:
            out.append(run())
        except BaseException as exc:  # noqa: BLE001 (raised again in the test's thread)
            out.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=target)
    thread.start()
    return thread, out


def _daily() -> list[AuditReport]:
    return store.scheduled_reports_store(kind="daily", since=SINCE, until=UNTIL)


def _stored() -> list[str]:
    return sorted(AuditReport.objects.filter(kind="daily", since=SINCE).values_list("format", flat=True))


@pytest.mark.django_db(transaction=True)
def test_a_run_that_overlaps_one_that_stored_the_period_stores_nothing(monkeypatch):
    real_build, building, other_done = store.report_build, threading.Event(), threading.Event()

    def slow_build(**kwargs: Any) -> Any:  # the first run's build outlasts the whole second run
        if not building.is_set():
            building.set()
            assert other_done.wait(30)
        return real_build(**kwargs)

    monkeypatch.setattr(store, "report_build", slow_build)
    first, first_out = _in_thread(_daily)
    assert building.wait(30)
    second = _daily()
    other_done.set()
    first.join(30)
    assert [r.format for r in second] == ["html", "csv", "json"]
    assert first_out == [[]]
    assert _stored() == ["csv", "html", "json"]
    assert AuditEvent.objects.filter(kind="report.created").count() == 3


@pytest.mark.django_db(transaction=True)
def test_two_runs_storing_at_once_store_the_period_once(monkeypatch):
    """The first run has stored its reports but not committed when the second looks again: the second
    waits for the lock, and then finds them stored."""
    real_insert, real_lock = store._report_insert, store._scheduled_reports_lock
    inserted, second_at_lock = threading.Event(), threading.Event()
    inserts = 0

    def insert(**kwargs: Any) -> AuditReport:
        nonlocal inserts
        report = real_insert(**kwargs)
        inserts += 1
        if inserts == 3:  # the first run's last format, not committed yet
            inserted.set()
            second_at_lock.wait(30)
        return report

    def lock() -> None:
        if inserted.is_set():
            second_at_lock.set()
        real_lock()

    monkeypatch.setattr(store, "_report_insert", insert)
    monkeypatch.setattr(store, "_scheduled_reports_lock", lock)
    first, first_out = _in_thread(_daily)
    assert inserted.wait(30)
    second, second_out = _in_thread(_daily)
    first.join(30)
    second.join(30)
    assert [[r.format for r in out] for out in first_out + second_out] == [["html", "csv", "json"], []]
    assert _stored() == ["csv", "html", "json"]
    assert AuditEvent.objects.filter(kind="report.created").count() == 3
