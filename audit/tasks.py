"""Celery tasks of the audit app."""

from __future__ import annotations

from functools import cache
from typing import Any

import redis
from celery import shared_task
from django.conf import settings

from audit.ingest import stream_ingest


@cache
def _redis(url: str) -> Any:
    return redis.Redis.from_url(url, socket_timeout=5)


@shared_task(name="audit.tasks.audit_stream_ingest_task", ignore_result=True)
def audit_stream_ingest_task() -> int:
    """Move what the gateways handed off into the database (beat runs this every second)."""
    if not settings.REDIS_URL:
        return 0
    return stream_ingest(_redis(settings.REDIS_URL))


@shared_task(name="audit.tasks.audit_checkpoint_task", ignore_result=True)
def audit_checkpoint_task() -> int | None:
    """Sign the current chain head (beat runs this every ten minutes)."""
    from audit.chain import checkpoint_sign

    checkpoint = checkpoint_sign()
    return checkpoint.seq if checkpoint is not None else None


@shared_task(name="audit.tasks.audit_anomalies_detect_task", ignore_result=True)
def audit_anomalies_detect_task() -> int:
    """Look for anomalies in the last minute (beat runs this every minute)."""
    from audit.anomaly import anomalies_detect

    return len(anomalies_detect())


from django.db import DatabaseError  # noqa: E402  (appended with the report tasks below)


@shared_task(
    name="audit.tasks.audit_report_daily_task",
    ignore_result=True,
    autoretry_for=(DatabaseError,),
    retry_backoff=60,
    max_retries=5,
)
def audit_report_daily_task(now: str | None = None) -> list[int]:
    """Store yesterday's report (00:00-24:00 UTC) as html, csv and json, once (beat runs this daily)."""
    from audit.reports import daily_period, report_clock, scheduled_reports_store

    since, until = daily_period(report_clock(now))
    return [report.pk for report in scheduled_reports_store(kind="daily", since=since, until=until)]


@shared_task(
    name="audit.tasks.audit_report_weekly_task",
    ignore_result=True,
    autoretry_for=(DatabaseError,),
    retry_backoff=60,
    max_retries=5,
)
def audit_report_weekly_task(now: str | None = None) -> list[int]:
    """Store last week's report (Monday to Monday, UTC) as html, csv and json, once (beat: Mondays)."""
    from audit.reports import report_clock, scheduled_reports_store, weekly_period

    since, until = weekly_period(report_clock(now))
    return [report.pk for report in scheduled_reports_store(kind="weekly", since=since, until=until)]
