"""Store rendered reports (audited), and the periods and clock of the scheduled daily and weekly ones (stored
once a period, however their runs overlap)."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

from django.db import transaction
from django.utils import timezone

from audit.locks import advisory_xact_lock
from audit.models import AuditReport
from audit.reports.build import report_build
from audit.reports.data import (
    FORMATS,
    SCHEDULE_SETTLE,
    ReportData,
)
from audit.reports.render import report_render
from audit.services import audit_record

SCHEDULED_REPORTS_LOCK = 0x61756472  # PostgreSQL advisory lock id ("audr"), held while a scheduled run stores


def report_save(*, data: ReportData, fmt: str, created_by: str = "system") -> AuditReport:
    """Render built report data in one format, store it, and audit that it was made."""
    content = report_render(data, fmt)
    return _report_insert(data=data, fmt=fmt, content=content, created_by=created_by)


def _report_insert(*, data: ReportData, fmt: str, content: str, created_by: str) -> AuditReport:
    with transaction.atomic():
        report = AuditReport.objects.create(
            kind=data.kind,
            format=fmt,
            since=data.since,
            until=data.until,
            chain_head=data.chain_head,
            chain_seq=data.chain_seq,
            created_by=created_by[:200],
            content=content,
        )
        audit_record(
            kind="report.created",
            actor=created_by,
            data={
                "report_id": report.pk,
                "report_kind": data.kind,
                "format": fmt,
                "since": data.since.isoformat(),
                "until": data.until.isoformat(),
                "chain_seq": data.chain_seq,
                "chain_head": data.chain_head,
            },
        )
    return report


def report_store(
    *, since: datetime, until: datetime, kind: str = "custom", fmt: str = "html", created_by: str = "system"
) -> AuditReport:
    """Build, render and store a report over ``[since, until)``, and audit that it was made."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown report format {fmt!r}; expected one of {', '.join(FORMATS)}")
    data = report_build(since=since, until=until, kind=kind, created_by=created_by)
    return report_save(data=data, fmt=fmt, created_by=created_by)


def report_clock(now: str | None = None) -> datetime:
    """Return ``now`` (an aware ISO 8601 string: tests, backfills) or the current time, for a schedule."""
    if not now:
        return timezone.now()
    moment = datetime.fromisoformat(now)
    if timezone.is_naive(moment):
        raise ValueError(f"now must carry a UTC offset: {now!r}")
    return moment


def daily_period(now: datetime) -> tuple[datetime, datetime]:
    """Return the last settled UTC day, 00:00 to 24:00 (yesterday, shortly after midnight)."""
    day = (now - SCHEDULE_SETTLE).astimezone(UTC).date()
    until = datetime.combine(day, time.min, tzinfo=UTC)
    return until - timedelta(days=1), until


def weekly_period(now: datetime) -> tuple[datetime, datetime]:
    """Return the last settled week, Monday 00:00 to Monday 00:00 UTC."""
    settled = (now - SCHEDULE_SETTLE).astimezone(UTC).date()
    until = datetime.combine(settled - timedelta(days=settled.weekday()), time.min, tzinfo=UTC)
    return until - timedelta(weeks=1), until


def scheduled_reports_store(
    *, kind: str, since: datetime, until: datetime, created_by: str = "system"
) -> list[AuditReport]:
    """Store a period's report in every format once, from one build; a rerun stores only what is missing.

    Runs can overlap (an hourly tick while a slow run, or its retry, goes on): each builds and renders
    unlocked, then looks again for what is missing and stores it under a lock, so one of them stores the
    period's reports and the other nothing."""
    missing = _missing_formats(kind=kind, since=since, until=until)
    if not missing:
        return []
    data = report_build(since=since, until=until, kind=kind, created_by=created_by)
    contents = {fmt: report_render(data, fmt) for fmt in missing}  # before the lock: rendering takes a while
    with transaction.atomic():
        _scheduled_reports_lock()
        missing = _missing_formats(kind=kind, since=since, until=until)
        return [
            _report_insert(data=data, fmt=fmt, content=contents[fmt], created_by=created_by)
            for fmt in missing
            if fmt in contents  # else stored by an earlier run and deleted since: the next run stores it
        ]


def _missing_formats(*, kind: str, since: datetime, until: datetime) -> list[str]:
    stored = set(
        AuditReport.objects.filter(kind=kind, since=since, until=until).values_list("format", flat=True)
    )
    return [fmt for fmt in FORMATS if fmt not in stored]


def _scheduled_reports_lock() -> None:
    """Hold, until the transaction ends, the lock that scheduled runs store their reports under.

    A PostgreSQL advisory lock. SQLite needs none: there a transaction takes the database's write lock
    when it begins (``transaction_mode`` IMMEDIATE), so a second run's transaction starts only once the
    first committed, and its second look sees what that one stored."""
    advisory_xact_lock(SCHEDULED_REPORTS_LOCK)
