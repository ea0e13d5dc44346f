"""Audit reports: exact numbers from a known set of usage records and events, every format, the command,
stored reports and the scheduled tasks.

The dataset below is small enough to count by hand; the expected values are written out (and the latency
percentiles recomputed with ``statistics.quantiles``), never read back from the code under test.
"""

from __future__ import annotations

import csv
import io
import json
import re
import statistics
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from audit.models import AuditEvent, AuditReport, ChainHead, UsageRecord
from audit.reports import (
    GENESIS,
    ReportData,
    daily_period,
    latency_percentiles,
    report_build,
    report_from_json,
    report_render,
    report_store,
    weekly_period,
)
from audit.services import audit_record
from audit.tasks import audit_report_daily_task, audit_report_weekly_task

pytestmark = pytest.mark.django_db

SINCE = datetime(2026, 11, 1, tzinfo=UTC)
UNTIL = datetime(2026, 11, 2, tzinfo=UTC)


def at(hour: int, minute: int = 0) -> datetime:
    return SINCE + timedelta(hours=hour, minutes=minute)


def usage(
    rid: str,
    when: datetime,
    client_id: str,
    model: str,
    status: int,
    *,
    user: str = "",
    tokens: tuple[int, int] = (0, 0),
    ms: tuple[float, float] = (1.0, 0.0),
    outcome: str | None = None,
) -> UsageRecord:
    return UsageRecord.objects.create(
        request_id=rid,
        occurred_at=when,
        client_id=client_id,
        user=user,
        endpoint="chat",
        model=model,
        status=status,
        prompt_tokens=tokens[0],
        completion_tokens=tokens[1],
        gateway_ms=ms[0],
        upstream_ms=ms[1],
        outcome=outcome or ("completed" if status < 400 else f"denied:{status}"),
    )


def denied(rid: str, when: datetime, client_id: str, model: str, status: int, reason: str | None, **kw: Any):
    """A denied request: its usage record and (unless reason is None) its gateway.denied event."""
    if reason is not None:
        audit_record(
            kind="gateway.denied",
            outcome="denied",
            client_id=client_id,
            request_id=rid,
            occurred_at=kw.pop("event_at", when - timedelta(milliseconds=3)),
            data={"reason": reason, "status": status, "endpoint": "chat"},
        )
    return usage(rid, when, client_id, model, status, ms=(0.5, 0.0), **kw)


@pytest.fixture
def traffic() -> None:
    """The known dataset (see the module docstring); the numbers in the tests are counted from it."""
    # app-a: three served, one upstream 502, one stream cut by the upstream, two denied
    usage("r1", at(10, 5), "app-a", "m1", 200, user="alice", tokens=(10, 20), ms=(5, 95))
    usage("r2", at(10, 20), "app-a", "m1", 200, user="alice", tokens=(30, 40), ms=(10, 190))
    usage("r3", at(11), "app-a", "m2", 200, user="bob", tokens=(5, 5), ms=(2, 48))
    usage("r4", at(11, 30), "app-a", "m1", 502, tokens=(7, 0), ms=(3, 297))
    usage(
        "r5", at(12), "app-a", "m1", 200, user="alice", tokens=(8, 4), ms=(1, 399), outcome="upstream_error"
    )
    denied("r6", at(12, 10), "app-a", "m1", 429, "requests", user="alice")
    denied("r7", at(12, 20), "app-a", "m2", 403, "model_not_allowed")
    # no valid token, so no client; r17's event was written just before the period began
    denied("r8", at(13), "", "", 401, "missing_token")
    denied("r17", at(0, 5), "", "", 401, "invalid_token", event_at=SINCE - timedelta(minutes=2))
    # app-b
    usage("r9", at(14), "app-b", "m2", 200, user="carol", tokens=(100, 200), ms=(4, 596))
    usage("r10", at(14, 30), "app-b", "m3", 200, user="carol", tokens=(50, 50), ms=(6, 694))
    denied("r11", at(15), "app-b", "", 403, "ip_not_allowed")
    denied("r12", at(15, 10), "app-b", "m2", 400, "invalid_request")
    denied("r13", at(15, 20), "app-b", "m2", 429, None)  # no event: falls back to its status
    usage("r14", at(16), "app-b", "", 499, ms=(1, 0))  # left before sending its request: not a denial
    denied("r15", at(16, 10), "app-b", "", 404, "not_found")
    denied("r16", at(16, 20), "app-b", "m2", 429, "user_tokens", user="carol")
    # outside the period: the last instant before it, and its (excluded) end
    usage("o1", SINCE - timedelta(microseconds=1), "app-a", "m1", 200, user="alice", tokens=(1000, 1000))
    usage("o2", UNTIL, "app-a", "m1", 200, user="alice", tokens=(1000, 1000), ms=(1, 5000))
    denied("o3", UNTIL + timedelta(minutes=1), "app-b", "m2", 429, "requests")
    security_events()


def security_events() -> None:
    listed: list[tuple[str, datetime, dict[str, Any]]] = [
        ("key.created", at(1), {"kid": "k2"}),
        ("key.activated", at(1, 5), {"kid": "k2"}),
        ("key.retired", at(2), {"kid": "k1"}),
        ("token.revoked", at(3), {"jti_count": 1}),
        ("token.refresh_reuse", at(4), {"token_family": "f1"}),
        ("code.replayed", at(5), {}),
        ("login.locked_out", at(6), {"username": "mallory"}),
        ("anomaly.detected", at(7), {"rule": "denial_burst", "evidence": {"denials": 40}}),
    ]
    for kind, when, data in listed:
        audit_record(kind=kind, actor="system", client_id="app-a", occurred_at=when, data=data)
    audit_record(kind="key.created", occurred_at=SINCE - timedelta(hours=1))  # before the period
    audit_record(kind="token.revoked", occurred_at=UNTIL)  # the period's end is excluded
    audit_record(kind="token.issued", client_id="app-a", occurred_at=at(8))  # not a listed kind
    audit_record(kind="login.failed", occurred_at=at(8))


def quantiles(values: list[float]) -> tuple[float, float]:
    """p50 and p95 by linear interpolation between closest ranks, from the standard library."""
    if len(values) == 1:
        return values[0], values[0]
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return round(cuts[49], 3), round(cuts[94], 3)


@pytest.fixture
def report(traffic: None) -> ReportData:
    return report_build(since=SINCE, until=UNTIL, kind="daily", created_by="user:auditor")


def by_key(rows: list[Any]) -> dict[str, Any]:
    return {row.key: row for row in rows}


def test_totals_count_every_request_in_the_period_and_nothing_outside_it(report):
    totals = report.totals
    assert (totals.requests, totals.tokens_in, totals.tokens_out) == (17, 210, 319)
    assert (totals.errors, totals.denied) == (2, 9)
    assert totals.denials == {"auth": 2, "scope": 1, "ip": 1, "rate_limit": 3, "validation": 1, "other": 1}
    assert (totals.p50_ms, totals.p95_ms) == quantiles([50, 100, 200, 300, 400, 600, 700])
    assert (totals.p50_ms, totals.p95_ms) == (300, 670)


def test_the_record_just_before_the_period_belongs_to_the_previous_one(traffic):
    before = report_build(since=SINCE - timedelta(days=1), until=SINCE)
    assert (before.totals.requests, before.totals.tokens_in) == (1, 1000)
    assert before.events[0].kind == "key.created"


def test_per_client_rows_show_requests_tokens_errors_denials_and_latency(report):
    clients = by_key(report.clients)
    assert [row.key for row in report.clients] == ["app-b", "app-a", ""]  # most requests first
    a, b, anonymous = clients["app-a"], clients["app-b"], clients[""]
    assert (a.requests, a.tokens_in, a.tokens_out, a.errors, a.denied) == (7, 60, 69, 2, 2)
    assert a.denials == {"auth": 0, "scope": 1, "ip": 0, "rate_limit": 1, "validation": 0, "other": 0}
    assert (a.p50_ms, a.p95_ms) == quantiles([100, 200, 50, 300, 400]) == (200, 380)
    assert (b.requests, b.tokens_in, b.tokens_out, b.errors, b.denied) == (8, 150, 250, 0, 5)
    assert b.denials == {"auth": 0, "scope": 0, "ip": 1, "rate_limit": 2, "validation": 1, "other": 1}
    assert (b.p50_ms, b.p95_ms) == quantiles([600, 700]) == (650, 695)  # the 499 is not timed
    assert (anonymous.requests, anonymous.denied, anonymous.denials["auth"]) == (2, 2, 2)
    assert (anonymous.p50_ms, anonymous.p95_ms) == (None, None)  # nothing but denials


def test_per_model_rows_show_requests_tokens_errors_denials_and_latency(report):
    models = by_key(report.models)
    m1, m2, m3, none = models["m1"], models["m2"], models["m3"], models[""]
    assert (m1.requests, m1.tokens_in, m1.tokens_out, m1.errors, m1.denied) == (5, 55, 64, 2, 1)
    assert m1.denials["rate_limit"] == 1
    assert (m1.p50_ms, m1.p95_ms) == quantiles([100, 200, 300, 400]) == (250, 385)
    assert (m2.requests, m2.tokens_in, m2.tokens_out, m2.errors, m2.denied) == (6, 105, 205, 0, 4)
    assert m2.denials == {"auth": 0, "scope": 1, "ip": 0, "rate_limit": 2, "validation": 1, "other": 0}
    assert (m2.p50_ms, m2.p95_ms) == quantiles([50, 600]) == (325, 572.5)
    assert (m3.requests, m3.tokens_in, m3.tokens_out, m3.p50_ms, m3.p95_ms) == (1, 50, 50, 700, 700)
    assert (none.requests, none.denied) == (5, 4)
    assert none.denials == {"auth": 2, "scope": 0, "ip": 1, "rate_limit": 0, "validation": 0, "other": 1}
    assert sum(row.requests for row in report.models) == report.totals.requests


def test_tables_list_the_busiest_rows_and_the_totals_still_count_the_rest(traffic, monkeypatch):
    monkeypatch.setattr("audit.reports.build.TABLE_ROWS", 2)  # a client can invent any number of model names
    data = report_build(since=SINCE, until=UNTIL)
    assert [row.key for row in data.clients] == ["app-b", "app-a"]
    assert [row.key for row in data.models] == ["m2", ""]  # 6 and 5 requests; m1 has 5 too, sorts after ""
    assert (data.clients_omitted, data.models_omitted, data.totals.requests) == (1, 2, 17)
    html = report_render(data, "html")
    assert "1 more clients with fewer requests are not listed" in html
    assert "2 more model names with fewer requests are not listed" in html


def test_denials_are_attributed_to_the_reason_in_their_gateway_event(report):
    reasons = {d.reason: (d.group, d.count) for d in report.denial_reasons}
    assert reasons == {
        "missing_token": ("auth", 1),
        "invalid_token": ("auth", 1),  # its event predates the period; it is still matched
        "model_not_allowed": ("scope", 1),
        "ip_not_allowed": ("ip", 1),
        "requests": ("rate_limit", 1),  # o3's event is after the period and not counted
        "user_tokens": ("rate_limit", 1),
        "http_429": ("rate_limit", 1),  # r13 has no event: its status decides
        "invalid_request": ("validation", 1),
        "not_found": ("other", 1),
    }


def test_a_client_reusing_a_request_id_cannot_count_one_denial_twice(db):
    denied("dup", at(9), "app-c", "m1", 401, "invalid_token")
    audit_record(kind="gateway.denied", client_id="app-c", request_id="dup", occurred_at=at(9),
                 data={"reason": "invalid_token", "status": 401})  # fmt: skip
    data = report_build(since=SINCE, until=UNTIL)
    assert [(d.reason, d.count) for d in data.denial_reasons] == [("invalid_token", 1)]
    assert data.totals.denials["auth"] == data.totals.denied == 1


def test_top_users_are_ranked_by_tokens(report):
    ranked = [
        (u.user, u.client_id, u.requests, u.tokens_in, u.tokens_out, u.tokens) for u in report.top_users
    ]
    assert ranked == [
        ("carol", "app-b", 3, 150, 250, 400),
        ("alice", "app-a", 4, 48, 64, 112),
        ("bob", "app-a", 1, 5, 5, 10),
    ]  # fmt: skip


def test_the_series_has_one_bucket_per_hour_and_adds_up(report):
    assert report.bucket == "hour"
    assert [b.start for b in report.series] == [SINCE + timedelta(hours=h) for h in range(24)]
    buckets = {b.start.hour: b for b in report.series}
    assert (buckets[10].requests, buckets[10].tokens_in, buckets[10].tokens_out) == (2, 40, 60)
    assert (buckets[12].requests, buckets[12].denied, buckets[12].errors) == (3, 2, 1)
    assert (buckets[9].requests, buckets[23].requests) == (0, 0)
    assert sum(b.requests for b in report.series) == 17
    assert sum(b.tokens_out for b in report.series) == 319


def test_longer_periods_are_charted_by_day_and_by_week(traffic):
    week = report_build(since=SINCE - timedelta(days=3), until=UNTIL + timedelta(days=4))
    assert week.bucket == "day"
    assert len(week.series) == 8
    assert {b.start: b.requests for b in week.series}[SINCE] == 17
    year = report_build(since=datetime(2026, 1, 1, tzinfo=UTC), until=datetime(2027, 1, 1, tzinfo=UTC))
    assert year.bucket == "week"
    assert year.series[0].start == datetime(2025, 12, 29, tzinfo=UTC)  # the Monday of the first week
    assert {b.start: b.requests for b in year.series}[datetime(2026, 10, 26, tzinfo=UTC)] == 18  # + o1
    assert sum(b.requests for b in year.series) == 20


def test_security_events_in_the_period_are_listed_and_counted(report):
    assert [e.kind for e in report.events] == [
        "key.created",
        "key.activated",
        "key.retired",
        "token.revoked",
        "token.refresh_reuse",
        "code.replayed",
        "login.locked_out",
        "anomaly.detected",
    ]
    assert report.event_counts == dict.fromkeys(
        ["anomaly.detected", "code.replayed", "key.activated", "key.created", "key.retired",
         "login.locked_out", "token.refresh_reuse", "token.revoked"], 1
    )  # fmt: skip
    assert report.events[-1].data == {"rule": "denial_burst", "evidence": {"denials": 40}}
    assert report.events[0].occurred_at == at(1)


def test_the_report_names_the_chain_head_covering_every_listed_event(report):
    newest = AuditEvent.objects.order_by("-seq").first()
    assert newest is not None
    assert newest.seq
    assert (report.chain_seq, report.chain_head) == (newest.seq, newest.hash)
    assert all(e.seq is not None and e.seq <= report.chain_seq for e in report.events)


def test_an_empty_log_reports_the_genesis_head_and_zeros(db):
    ChainHead.objects.all().delete()
    data = report_build(since=SINCE, until=UNTIL)
    assert (data.chain_seq, data.chain_head) == (0, GENESIS)
    assert (data.totals.requests, data.totals.p50_ms, data.clients, data.events) == (0, None, [], [])
    assert "<svg" in report_render(data, "html")


def test_latency_in_python_interpolates_like_percentile_cont(traffic):
    rows = UsageRecord.objects.filter(occurred_at__gte=SINCE, occurred_at__lt=UNTIL)
    assert latency_percentiles(rows, "model", in_database=False) == {
        "m1": (250, 385),
        "m2": (325, 572.5),
        "m3": (700, 700),
    }
    assert latency_percentiles(rows, None, in_database=False) == {"": (300, 670)}


@pytest.mark.skipif(connection.vendor != "postgresql", reason="percentile_cont is PostgreSQL's")
def test_percentile_cont_in_postgresql_agrees_with_python(traffic):
    rows = UsageRecord.objects.filter(occurred_at__gte=SINCE, occurred_at__lt=UNTIL)
    for key in (None, "client_id", "model"):
        in_database = latency_percentiles(rows, key, in_database=True)
        assert in_database == latency_percentiles(rows, key, in_database=False)
    assert in_database["m2"] == (325, 572.5)


def test_a_period_must_run_forwards_with_aware_datetimes(db):
    with pytest.raises(ValueError, match="must be before"):
        report_build(since=UNTIL, until=SINCE)
    with pytest.raises(ValueError, match="timezone-aware"):
        report_build(since=SINCE.replace(tzinfo=None), until=UNTIL)


# --- rendering -----------------------------------------------------------------------------------------

HOSTILE_CLIENT = "<script>alert(1)</script>"
HOSTILE_MODEL = '"><img src=x onerror=alert(2)>'


def test_html_is_one_offline_page_with_svg_charts(report):
    html = report_render(report, "html")
    assert html.startswith("<!DOCTYPE html>")
    assert html.count("<svg") == 3  # requests and tokens over time, denials by reason
    assert "11-01 10:00 · Served: 2" in html  # a bar of the requests chart
    assert "11-01 12:00 · Denied: 2" in html
    assert "requests: 1" in html
    assert "http_429" in html
    assert "http://" not in html
    assert "https://" not in html
    assert not re.search(r"<[a-z][^>]*\s(?:src|href)\s*=", html, re.I)  # no tag loads anything
    assert not re.search(r"<(?:script|link|iframe|object|embed)\b|@import|url\(", html, re.I)
    assert report.chain_head in html


def test_html_escapes_client_ids_models_users_and_event_data(db):
    denied("x1", at(9), HOSTILE_CLIENT, HOSTILE_MODEL, 403, "model_not_allowed", user="<b>eve</b>")
    usage("x2", at(9), HOSTILE_CLIENT, HOSTILE_MODEL, 200, user="<b>eve</b>", tokens=(1, 1))
    audit_record(kind="anomaly.detected", client_id=HOSTILE_CLIENT, occurred_at=at(9),
                 data={"rule": "ip_spread", "evidence": {"ips": ["</td><script>x()</script>"]}})  # fmt: skip
    html = report_render(report_build(since=SINCE, until=UNTIL), "html")
    assert "<script" not in html.lower()
    assert "<img" not in html
    assert "<b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&quot;&gt;&lt;img src=x onerror=alert(2)&gt;" in html
    assert "&lt;b&gt;eve&lt;/b&gt;" in html


def test_csv_neutralises_spreadsheet_formulas(db):
    usage("f1", at(9), "=cmd()", "+SUM(A1)", 200, user="@evil", tokens=(3, 4), ms=(1, 9))
    usage("f2", at(9, 1), "-2+3", "m1", 200, user="\t=x", tokens=(1, 1))
    text = report_render(report_build(since=SINCE, until=UNTIL), "csv")
    rows = [row for row in csv.reader(io.StringIO(text)) if row]
    cells = [cell for row in rows for cell in row]
    assert not [cell for cell in cells if cell[:1] in ("=", "+", "-", "@", "\t")]
    clients = {row[1]: row for row in rows if row[0] == "client"}
    assert set(clients) == {"'=cmd()", "'-2+3"}
    assert clients["'=cmd()"][2:5] == ["1", "3", "4"]  # requests, tokens in, tokens out
    assert {row[1] for row in rows if row[0] == "model"} == {"'+SUM(A1)", "m1"}
    assert {row[1] for row in rows if row[0] == "top_user"} == {"'@evil", "'\t=x"}


def test_csv_has_a_section_for_each_part_of_the_report(report):
    rows = list(csv.reader(io.StringIO(report_render(report, "csv"))))
    sections = [row[0] for row in rows if row]
    total = next(row for row in rows if row and row[0] == "total")
    header = rows[rows.index(total) - 1]
    assert dict(zip(header, total, strict=True)) | {"section": "total"} == {
        "section": "total", "requests": "17", "tokens_in": "210", "tokens_out": "319", "errors": "2",
        "denied": "9", "denied_auth": "2", "denied_scope": "1", "denied_ip": "1", "denied_rate_limit": "3",
        "denied_validation": "1", "denied_other": "1", "p50_ms": "300.0", "p95_ms": "670.0",
    }  # fmt: skip
    assert Counter(sections) == {
        "section": 9,  # the header row of each of the nine blocks
        "report": 1,
        "total": 1,
        "client": 3,
        "model": 4,
        "denial_reason": 9,
        "top_user": 3,
        "series": 24,
        "event_count": 8,
        "event": 8,
    }


def test_json_round_trips_to_the_same_report(report):
    text = report_render(report, "json")
    raw = json.loads(text)
    assert raw["totals"]["requests"] == 17
    assert raw["since"] == "2026-11-01T00:00:00+00:00"
    assert raw["chain_head"] == report.chain_head
    again = report_from_json(text)
    assert again == report
    assert report_render(again, "html") == report_render(report, "html")


def test_an_unknown_format_is_refused(report):
    with pytest.raises(ValueError, match="unknown report format"):
        report_render(report, "xlsx")


# --- storing, the command and the tasks ---------------------------------------------------------------


def test_report_store_saves_the_report_and_audits_it(traffic):
    stored = report_store(since=SINCE, until=UNTIL, kind="custom", fmt="csv", created_by="user:auditor")
    stored.refresh_from_db()
    head = ChainHead.objects.get()
    created = AuditEvent.objects.get(kind="report.created")
    assert (stored.kind, stored.format, stored.since, stored.until) == ("custom", "csv", SINCE, UNTIL)
    assert stored.created_by == "user:auditor"
    assert created.seq is not None
    assert stored.chain_seq == created.seq - 1 == head.seq - 1  # built before its own event was added
    assert stored.content.startswith("section,version,kind")
    assert ",17,210,319," in stored.content
    assert stored.filename() == "portcullis-audit-custom-20261101-20261102.csv"
    assert created.actor == "user:auditor"
    assert created.data == {
        "report_id": stored.pk,
        "report_kind": "custom",
        "format": "csv",
        "since": SINCE.isoformat(),
        "until": UNTIL.isoformat(),
        "chain_seq": stored.chain_seq,
        "chain_head": stored.chain_head,
    }


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("auditreport", *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def test_the_command_prints_a_report_over_the_given_dates(traffic):
    raw = json.loads(run("--since", "2026-11-01", "--until", "2026-11-02", "--format", "json"))
    assert (raw["kind"], raw["since"], raw["until"]) == ("custom", SINCE.isoformat(), UNTIL.isoformat())
    assert (raw["totals"]["requests"], raw["totals"]["denied"]) == (17, 9)
    assert not AuditReport.objects.exists()


def test_the_command_reads_iso_datetimes_with_offsets_as_utc(traffic):
    raw = json.loads(
        run("--since", "2026-11-01T11:00:00+01:00", "--until", "2026-11-01T12:00Z", "--format", "json")
    )
    assert (raw["since"], raw["until"]) == ("2026-11-01T10:00:00+00:00", "2026-11-01T12:00:00+00:00")
    assert raw["totals"]["requests"] == 4  # r1, r2, r3, r4


def test_the_command_runs_until_now_by_default(db):
    since = (datetime.now(UTC) - timedelta(days=2)).date().isoformat()
    raw = json.loads(run("--since", since, "--format", "json"))
    assert abs(datetime.fromisoformat(raw["until"]) - datetime.now(UTC)) < timedelta(minutes=1)


def test_the_command_writes_a_file_and_stores_the_report(traffic, tmp_path):
    target = tmp_path / "report.html"
    output = run("--since", "2026-11-01", "--until", "2026-11-02", "--out", str(target), "--store")
    assert output == f"Wrote the html report to {target}.\n"
    assert target.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    stored = AuditReport.objects.get()
    assert (stored.kind, stored.format, stored.since, stored.until) == ("custom", "html", SINCE, UNTIL)
    assert AuditEvent.objects.filter(kind="report.created", data__report_id=stored.pk).count() == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "2026-11-02", "--until", "2026-11-01"], "must be before --until"),
        (["--since", "2026-11-01", "--until", "2026-11-01"], "must be before --until"),
        (["--since", "2026-13-45"], "--since: '2026-13-45' is not a date"),
        (["--since", "2026-11-01", "--until", "yesterday"], "--until: 'yesterday' is not a date"),
        (["--since", "2026-11-01", "--format", "xlsx"], "invalid choice: 'xlsx'"),
    ],
)
def test_the_command_refuses_bad_input_clearly(db, args, message):
    with pytest.raises(CommandError, match=re.escape(message)):
        run(*args)
    assert not AuditReport.objects.exists()


def test_the_scheduled_periods_are_the_last_settled_day_and_week():
    assert daily_period(datetime(2026, 11, 2, 5, tzinfo=UTC)) == (SINCE, UNTIL)
    assert daily_period(datetime(2026, 11, 2, 0, 15, tzinfo=UTC)) == (SINCE, UNTIL)
    assert daily_period(datetime(2026, 11, 2, 0, 5, tzinfo=UTC)) == (SINCE - timedelta(days=1), SINCE)
    monday = datetime(2026, 11, 2, tzinfo=UTC)  # 2026-11-02 is a Monday
    last_week = (monday - timedelta(weeks=1), monday)
    assert weekly_period(datetime(2026, 11, 2, 0, 30, tzinfo=UTC)) == last_week
    assert weekly_period(datetime(2026, 11, 8, 23, 59, tzinfo=UTC)) == last_week


def test_the_daily_task_stores_yesterday_in_three_formats_once(traffic):
    ids = audit_report_daily_task(now="2026-11-02T05:00:00+00:00")
    reports = AuditReport.objects.filter(pk__in=ids)
    assert sorted(r.format for r in reports) == ["csv", "html", "json"]
    assert {(r.kind, r.since, r.until, r.created_by) for r in reports} == {("daily", SINCE, UNTIL, "system")}
    assert len({(r.chain_seq, r.chain_head) for r in reports}) == 1  # one build, three renderings
    assert json.loads(reports.get(format="json").content)["totals"]["requests"] == 17
    assert AuditEvent.objects.filter(kind="report.created").count() == 3
    assert audit_report_daily_task(now="2026-11-02T06:00:00+00:00") == []  # a rerun adds nothing
    assert AuditReport.objects.count() == 3


def test_the_weekly_task_stores_the_previous_monday_to_monday_week(traffic):
    ids = audit_report_weekly_task(now="2026-11-04T12:00:00+00:00")
    reports = AuditReport.objects.filter(pk__in=ids)
    assert reports.count() == 3
    week = {(r.kind, r.since, r.until) for r in reports}
    assert week == {("weekly", datetime(2026, 10, 26, tzinfo=UTC), datetime(2026, 11, 2, tzinfo=UTC))}
    assert json.loads(reports.get(format="json").content)["totals"]["requests"] == 18  # with o1
