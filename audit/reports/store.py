"""Store rendered reports (audited), and the periods and clock of the scheduled daily and weekly ones."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

from django.db import transaction
from django.utils import timezone

from audit.models import AuditReport
from audit.reports.build import report_build
from audit.reports.data import (
    FORMATS,
    SCHEDULE_SETTLE,
    ReportData,
)
from audit.reports.render import report_render
from audit.services import audit_record


def report_save(*, data: ReportData, fmt: str, created_by: str = "system") -> AuditReport:
    """Render built report data in one format, store it, and audit that it was made."""
    content = report_render(data, fmt)
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
    """Store a period's report in every format once, from one build; a rerun stores only what is missing."""
    stored = AuditReport.objects.filter(kind=kind, since=since, until=until)
    missing = [fmt for fmt in FORMATS if fmt not in set(stored.values_list("format", flat=True))]
    if not missing:
        return []
    data = report_build(since=since, until=until, kind=kind, created_by=created_by)
    return [report_save(data=data, fmt=fmt, created_by=created_by) for fmt in missing]
