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
