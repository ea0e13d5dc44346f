"""Render built report data as HTML (with charts), CSV (safe in spreadsheets) or JSON, and read JSON back."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import asdict
from datetime import datetime
from typing import Any

from django.template.loader import render_to_string

from audit import report_charts as charts
from audit.reports.data import (
    BUCKET_FIELDS,
    DENIAL_GROUP_LABELS,
    DENIAL_GROUPS,
    FORMATS,
    Bucket,
    DenialReason,
    EventEntry,
    ReportData,
    Stats,
    UserUsage,
)


def report_render(data: ReportData, fmt: str) -> str:
    """Render a report as a self-contained HTML page, a CSV file or JSON."""
    renderers = {"html": _render_html, "csv": _render_csv, "json": _render_json}
    if fmt not in renderers:
        raise ValueError(f"unknown report format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return renderers[fmt](data)


def _render_html(data: ReportData) -> str:
    context = {
        "report": data,
        "charts": _charts(data),
        "group_names": [DENIAL_GROUP_LABELS[group] for group in DENIAL_GROUPS],
        "events_cut": data.events_total > len(data.events),
    }
    return render_to_string("audit/report.html", context)


_LABEL_FORMAT = {"hour": "%m-%d %H:00", "day": "%Y-%m-%d", "week": "%Y-%m-%d"}


def _charts(data: ReportData) -> list[charts.Chart]:
    starts = [bucket.start for bucket in data.series]
    label_format = _LABEL_FORMAT[data.bucket]
    requests = [
        charts.Series("Served", "s-ok", [max(b.requests - b.denied - b.errors, 0) for b in data.series]),
        charts.Series("Denied", "s-denied", [b.denied for b in data.series]),
        charts.Series("Errors", "s-error", [b.errors for b in data.series]),
    ]
    tokens = [
        charts.Series("Tokens in", "s-in", [b.tokens_in for b in data.series]),
        charts.Series("Tokens out", "s-out", [b.tokens_out for b in data.series]),
    ]
    groups_seen = {denial.group for denial in data.denial_reasons}
    legend = [
        charts.LegendItem(f"g-{group}", DENIAL_GROUP_LABELS[group])
        for group in DENIAL_GROUPS
        if group in groups_seen
    ]
    rows = [(denial.reason, f"g-{denial.group}", denial.count) for denial in data.denial_reasons]
    return [
        charts.time_chart(f"Requests per {data.bucket}", starts, requests, label_format),
        charts.time_chart(f"Tokens per {data.bucket}", starts, tokens, label_format),
        charts.bar_rows_chart("Denials by reason", rows, legend),
    ]


# OWASP "CSV injection": a spreadsheet runs a cell starting with one of these as a formula.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """Return a value as a CSV cell that a spreadsheet shows as text and never runs as a formula."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _render_csv(data: ReportData) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    for number, block in enumerate(_csv_blocks(data)):
        if number:
            writer.writerow([])  # a blank line between sections
        writer.writerows([csv_cell(cell) for cell in row] for row in block)
    return buffer.getvalue()


def _stats_cells(stats: Stats) -> list[Any]:
    return [stats.requests, stats.tokens_in, stats.tokens_out, stats.errors, stats.denied,
            *stats.denial_counts(), stats.p50_ms, stats.p95_ms]  # fmt: skip


def _csv_blocks(data: ReportData) -> Iterable[list[list[Any]]]:
    yield [
        ["section", "version", "kind", "since", "until", "generated_at", "created_by", "chain_seq",
         "chain_head", "bucket", "clients_omitted", "models_omitted"],
        ["report", data.version, data.kind, data.since, data.until, data.generated_at, data.created_by,
         data.chain_seq, data.chain_head, data.bucket, data.clients_omitted, data.models_omitted],
    ]  # fmt: skip
    traffic = ["requests", "tokens_in", "tokens_out", "errors", "denied"]
    traffic += [*(f"denied_{group}" for group in DENIAL_GROUPS), "p50_ms", "p95_ms"]
    yield [["section", *traffic], ["total", *_stats_cells(data.totals)]]
    yield [["section", "client_id", *traffic], *(["client", s.key, *_stats_cells(s)] for s in data.clients)]
    yield [["section", "model", *traffic], *(["model", s.key, *_stats_cells(s)] for s in data.models)]
    yield [
        ["section", "reason", "group", "count"],
        *(["denial_reason", d.reason, d.group, d.count] for d in data.denial_reasons),
    ]
    yield [
        ["section", "user", "client_id", "requests", "tokens_in", "tokens_out", "tokens"],
        *(["top_user", u.user, u.client_id, u.requests, u.tokens_in, u.tokens_out, u.tokens]
          for u in data.top_users),
    ]  # fmt: skip
    yield [
        ["section", "bucket_start", *BUCKET_FIELDS],
        *(["series", b.start, *(getattr(b, name) for name in BUCKET_FIELDS)] for b in data.series),
    ]
    yield [["section", "kind", "count"], *(["event_count", k, n] for k, n in data.event_counts.items())]
    event_head = ["occurred_at", "seq", "kind", "outcome", "actor", "client_id", "ip", "request_id", "data"]
    yield [
        ["section", *event_head],
        *(["event", e.occurred_at, e.seq, e.kind, e.outcome, e.actor, e.client_id, e.ip, e.request_id,
           e.data_json()] for e in data.events),
    ]  # fmt: skip


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _render_json(data: ReportData) -> str:
    return json.dumps(asdict(data), default=_json_default, indent=2) + "\n"


def report_from_json(text: str) -> ReportData:
    """Rebuild a report's data from its JSON rendering (so a stored report can be shown as HTML again)."""
    raw = json.loads(text)
    when = datetime.fromisoformat
    plain = ["kind", "created_by", "chain_seq", "chain_head", "bucket", "event_counts", "version"]
    plain += ["clients_omitted", "models_omitted"]
    return ReportData(
        **{name: raw[name] for name in plain},
        since=when(raw["since"]),
        until=when(raw["until"]),
        generated_at=when(raw["generated_at"]),
        totals=Stats(**raw["totals"]),
        clients=[Stats(**row) for row in raw["clients"]],
        models=[Stats(**row) for row in raw["models"]],
        denial_reasons=[DenialReason(**row) for row in raw["denial_reasons"]],
        top_users=[UserUsage(**row) for row in raw["top_users"]],
        series=[Bucket(**{**row, "start": when(row["start"])}) for row in raw["series"]],
        events=[EventEntry(**{**row, "occurred_at": when(row["occurred_at"])}) for row in raw["events"]],
    )


# --- storing -------------------------------------------------------------------------------------------
