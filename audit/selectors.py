"""Reads over the audit log and usage records: filtered event lists, live traffic figures, usage series.

The console and the admin API call these; nothing here writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db.models import Count, Q, QuerySet, Sum
from django.db.models.functions import Coalesce, TruncHour, TruncMinute
from django.utils import timezone

from audit.models import AuditEvent, AuditReport, UsageRecord

# Event kinds the dashboard lists as security events even when they succeeded.
SECURITY_KINDS = (
    "token.refresh_reuse",
    "code.replayed",
    "login.locked_out",
    "client.disabled",
    "client.secret_rotated",
    "key.activated",
    "key.revoked",
    "key.resealed",
    "user.locked",
    "user.changed",  # rights given or taken past the console's lock (the Django admin, a shell)
    "user.groups_changed",
    "user.permissions_changed",
    "group.permissions_changed",
    "gateway.redis_unavailable",
)


def audit_events_filter(
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    actor: str = "",
    client_id: str = "",
    kind: str = "",
    outcome: str = "",
) -> QuerySet[AuditEvent]:
    """Return audit events matching every given filter, newest first (kind matches a prefix)."""
    events = AuditEvent.objects.all()
    if since is not None:
        events = events.filter(occurred_at__gte=since)
    if until is not None:
        events = events.filter(occurred_at__lt=until)
    if actor:
        events = events.filter(actor__icontains=actor)
    if client_id:
        events = events.filter(client_id=client_id)
    if kind:
        events = events.filter(kind__startswith=kind)
    if outcome:
        events = events.filter(outcome=outcome)
    return events.order_by("-occurred_at", "-id")


def audit_kinds() -> list[str]:
    """Return every event kind recorded so far, sorted (for filter suggestions)."""
    return sorted(AuditEvent.objects.values_list("kind", flat=True).distinct())


def security_events_latest(*, limit: int = 10) -> list[AuditEvent]:
    """Return the latest security events: denials, failures, anomalies and sensitive changes."""
    query = (
        ~Q(outcome=AuditEvent.Outcome.SUCCESS) | Q(kind__startswith="anomaly.") | Q(kind__in=SECURITY_KINDS)
    )
    return list(AuditEvent.objects.filter(query).order_by("-occurred_at", "-id")[:limit])


def anomalies_latest(*, limit: int = 10) -> list[AuditEvent]:
    """Return the latest anomaly events (kinds starting with ``anomaly.``)."""
    return list(
        AuditEvent.objects.filter(kind__startswith="anomaly.").order_by("-occurred_at", "-id")[:limit]
    )


def usage_live_figures(*, window_s: float = 10.0, now: datetime | None = None) -> dict[str, Any]:
    """Return traffic over the last ``window_s`` seconds: rates per second and counts.

    ``active_streams`` counts streams that started within the window: a stream's record is written
    when it ends, so streams still running are not visible here.
    """
    now = now or timezone.now()
    records = UsageRecord.objects.filter(
        occurred_at__gt=now - timedelta(seconds=window_s), occurred_at__lte=now
    )
    totals = records.aggregate(
        requests=Count("id"),
        tokens=Coalesce(Sum("prompt_tokens"), 0) + Coalesce(Sum("completion_tokens"), 0),
        errors=Count("id", filter=Q(status__gte=500)),
        denials=Count("id", filter=Q(status__gte=400, status__lt=500)),
        streams=Count("id", filter=Q(stream=True)),
    )
    return {
        "window_s": window_s,
        "requests_per_s": round(totals["requests"] / window_s, 2),
        "tokens_per_s": round(totals["tokens"] / window_s, 2),
        "errors": totals["errors"],
        "denials": totals["denials"],
        "active_streams": totals["streams"],
        "at": now.isoformat(),
    }


@dataclass(frozen=True)
class UsageBucket:
    """Usage of one client over one period (a minute or an hour)."""

    start: datetime
    requests: int
    tokens: int
    errors: int


def usage_series(
    *, client_id: str, since: datetime, until: datetime | None = None, unit: str = "hour"
) -> list[UsageBucket]:
    """Return one client's usage per minute or per hour between two times, empty periods included."""
    until = until or timezone.now()
    trunc = TruncMinute if unit == "minute" else TruncHour
    step = timedelta(minutes=1) if unit == "minute" else timedelta(hours=1)
    rows = (
        UsageRecord.objects.filter(client_id=client_id, occurred_at__gte=since, occurred_at__lt=until)
        .annotate(bucket=trunc("occurred_at"))
        .values("bucket")
        .annotate(
            requests=Count("id"),
            tokens=Coalesce(Sum("prompt_tokens"), 0) + Coalesce(Sum("completion_tokens"), 0),
            errors=Count("id", filter=Q(status__gte=400)),
        )
    )
    found = {row["bucket"]: row for row in rows}
    start = since.replace(second=0, microsecond=0)
    if unit != "minute":
        start = start.replace(minute=0)
    buckets = []
    while start < until:
        row = found.get(start, {})
        buckets.append(
            UsageBucket(
                start=start,
                requests=int(row.get("requests", 0)),
                tokens=int(row.get("tokens", 0)),
                errors=int(row.get("errors", 0)),
            )
        )
        start += step
    return buckets


def reports_list() -> QuerySet[AuditReport]:
    """Return stored audit reports, newest first, without their content."""
    return AuditReport.objects.defer("content").order_by("-created_at")
