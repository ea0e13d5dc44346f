"""The /metrics endpoint: Prometheus text for the process (or every worker, in multiprocess mode), plus
gauges computed at scrape time from the database by providers other apps register (key age, anomalies).

Reachable only from ``PORTCULLIS_METRICS_ALLOW`` addresses (the true client IP) or with
``Authorization: Bearer $PORTCULLIS_METRICS_TOKEN``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import redis
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.utils.crypto import constant_time_compare
from django.views.decorators.http import require_safe
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Gauge,
    generate_latest,
    multiprocess,
)

from audit.context import ip_in_networks, trusted_networks
from audit.models import AuditEvent
from audit.redisconn import redis_sync
from audit.sink import STREAM


def audit_stream_backlog() -> float:
    """Entries in the audit stream that the ingest has not stored yet (it deletes what it stored): 0 without
    Redis (the embedded default has no stream), NaN when Redis does not answer."""
    if not settings.REDIS_URL:
        return 0.0
    try:
        return float(redis_sync(settings.REDIS_URL).xlen(STREAM))
    except redis.RedisError:
        return math.nan


ScrapeGauge = tuple[str, str, Callable[[], float]]  # name, help, value
_scrape_gauges: list[ScrapeGauge] = [
    (
        "portcullis_anomalies_total",
        "Anomaly findings recorded in the audit log",
        lambda: float(AuditEvent.objects.filter(kind="anomaly.detected").count()),
    ),
    (
        "portcullis_audit_stream_backlog",
        "Usage records and events handed off to the Redis stream and not yet stored; at the gateways' "
        "limit (PORTCULLIS_AUDIT_BACKLOG_LIMIT) they refuse new requests until it drains",
        audit_stream_backlog,
    ),
]


def scrape_gauge_register(name: str, help_text: str, value: Callable[[], float]) -> None:
    """Add a gauge computed at each scrape (other apps register theirs at start)."""
    if all(existing[0] != name for existing in _scrape_gauges):
        _scrape_gauges.append((name, help_text, value))


def _allowed(request: HttpRequest) -> bool:
    token = settings.PORTCULLIS_METRICS_TOKEN
    header = request.META.get("HTTP_AUTHORIZATION", "")
    if token and header.lower().startswith("bearer ") and constant_time_compare(header[7:].strip(), token):
        return True
    allowed = trusted_networks(tuple(settings.PORTCULLIS_METRICS_ALLOW))
    return ip_in_networks(getattr(request, "client_ip", None), allowed)


@require_safe
def metrics_view(request: HttpRequest) -> HttpResponse:
    """Serve the metrics in Prometheus text format (GET and HEAD: a scrape changes nothing)."""
    if not _allowed(request):
        return HttpResponse("forbidden\n", status=403, content_type="text/plain")
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        process = CollectorRegistry()
        multiprocess.MultiProcessCollector(process)
    else:
        process = REGISTRY
    scrape = CollectorRegistry()
    for name, help_text, value in _scrape_gauges:
        Gauge(name, help_text, registry=scrape).set(value())
    body = generate_latest(process) + generate_latest(scrape)
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)
