"""Celery tasks of the audit app."""

from __future__ import annotations

from celery import shared_task
from django.conf import settings

from audit.ingest import stream_ingest
from audit.redisconn import redis_sync
from audit.sink import STREAM

# A run that leaves at least this much in the stream is behind: the next one starts at once, on whichever
# worker process is free, rather than at the next beat tick (a batch of the ingest's).
INGEST_BEHIND = 500


@shared_task(name="audit.tasks.audit_stream_ingest_task", ignore_result=True)
def audit_stream_ingest_task() -> int:
    """Move what the gateways handed off into the database (beat runs this every second).

    A run stops after a second (``stream_ingest``); one that leaves a backlog queues the next run at once,
    so while the stream is behind every free worker process ingests (each reads its own entries of the
    consumer group), and a caught-up run ends the chain. The queued run expires like beat's, so a backlog
    cannot pile runs up in the queue."""
    if not settings.REDIS_URL:
        return 0
    client = redis_sync(settings.REDIS_URL)
    stored = stream_ingest(client)
    if client.xlen(STREAM) >= INGEST_BEHIND:
        audit_stream_ingest_task.apply_async(expires=5)
    return stored


@shared_task(name="audit.tasks.audit_checkpoint_task", ignore_result=True)
def audit_checkpoint_task() -> int | None:
    """Sign the current chain head (beat runs this every ten minutes)."""
    from audit.chain import checkpoint_sign

    checkpoint = checkpoint_sign()
    return checkpoint.seq if checkpoint is not None else None


@shared_task(name="audit.tasks.audit_anomalies_detect_task", ignore_result=True)
def audit_anomalies_detect_task() -> int:
    """Look for anomalies in what was stored since the last run (beat runs this every minute)."""
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
