"""Prometheus metrics of the gateway, recorded once per request from its usage record.

Label values come only from allowlists: routes are the fixed endpoint kinds, models are those an upstream
serves (anything else is ``other``), statuses are classes (``2xx`` …), limits are the known limit names.
So random model names or paths cannot grow the number of series.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from gateway.ratelimit import LIMITS

ROUTES = frozenset({"chat", "completions", "embeddings", "models", "unknown"})
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
)

REQUESTS = Counter("portcullis_gateway_requests", "Gateway requests", ["route", "model", "status_class"])
OVERHEAD = Histogram(
    "portcullis_gateway_overhead_seconds",
    "Time spent in the gateway itself",
    ["route"],
    buckets=LATENCY_BUCKETS,
)
UPSTREAM = Histogram(
    "portcullis_gateway_upstream_seconds",
    "Time spent waiting on the upstream",
    ["route", "model"],
    buckets=LATENCY_BUCKETS,
)
TOKENS = Counter("portcullis_gateway_tokens", "LLM tokens through the gateway", ["direction", "model"])
REJECTIONS = Counter("portcullis_gateway_ratelimit_rejections", "Requests refused by a limit", ["limit"])
ACTIVE_STREAMS = Gauge(
    "portcullis_gateway_active_streams", "Streams being relayed now", multiprocess_mode="livesum"
)
UPSTREAM_HEALTHY = Gauge(
    "portcullis_gateway_upstream_healthy",
    "1 if the upstream passed its last health check",
    ["upstream"],
    multiprocess_mode="liveall",
)
REDIS_FALLBACKS = Counter("portcullis_gateway_redis_fallbacks", "Requests served on the Redis-down fallback")
AUDIT_FULL_REFUSALS = Counter(
    "portcullis_gateway_audit_full_refusals",
    "Requests refused (503 audit_backlog_full), and refused connections not recorded one by one, because the "
    "audit records waiting to be stored had reached their limit",
)
REDIS_REPLY_WAITS = Counter(
    "portcullis_gateway_redis_reply_waits",
    "Waits for a quiet Redis's reply without yielding the event loop, by outcome: answered (the reply "
    "came within the wait) or in_vain (it did not; the usual read takes it)",
    ["outcome"],
)
STREAM_WRITES = Counter(
    "portcullis_gateway_stream_writes",
    "Stream body parts written to clients, by path: read (in the upstream read that brought them) or task "
    "(by the request's task: what arrived before the relay started or with the response's end, and "
    "everything while the client's connection is paused for a slow reader or when the server offers no "
    "direct write)",
    ["path"],
)
METERING_BACKLOG = Gauge(
    "portcullis_gateway_metering_backlog", "Usage records waiting for hand-off", multiprocess_mode="livesum"
)


_WAIT_ANSWERED = REDIS_REPLY_WAITS.labels("answered")
_WAIT_IN_VAIN = REDIS_REPLY_WAITS.labels("in_vain")


def redis_reply_waited(answered: bool) -> None:
    """Count one wait for a carried Redis batch's reply (``gateway.redisbatch``)."""
    (_WAIT_ANSWERED if answered else _WAIT_IN_VAIN).inc()


_WRITES_READ = STREAM_WRITES.labels("read")
_WRITES_TASK = STREAM_WRITES.labels("task")


def stream_writes_observe(read: int, task: int) -> None:
    """Count one stream's body parts by the path that wrote them (``gateway.streaming``)."""
    if read:
        _WRITES_READ.inc(read)
    if task:
        _WRITES_TASK.inc(task)


def status_class(status: int) -> str:
    """Return ``2xx``, ``4xx`` … for a status code."""
    return f"{status // 100}xx" if 100 <= status < 600 else "other"


@cache
def _series(route: str, model: str, status: str) -> tuple[Any, Any, Any, Any, Any]:
    """The labelled children one kind of request updates (looked up once: ``labels()`` is not free).

    The cache is bounded by the allowlists above: routes, served models and status classes."""
    return (
        REQUESTS.labels(route, model, status),
        OVERHEAD.labels(route),
        UPSTREAM.labels(route, model),
        TOKENS.labels("in", model),
        TOKENS.labels("out", model),
    )


def request_observe(record: dict[str, Any], known_models: set[str] | frozenset[str]) -> None:
    """Record one finished request."""
    route = record["endpoint"] if record["endpoint"] in ROUTES else "unknown"
    model = record["model"] if record["model"] in known_models else ("" if not record["model"] else "other")
    requests, overhead, upstream, tokens_in, tokens_out = _series(
        route, model, status_class(record["status"])
    )
    requests.inc()
    overhead.observe(max(0.0, record.get("gateway_ms", 0.0)) / 1000)
    if record.get("upstream_ms"):
        upstream.observe(record["upstream_ms"] / 1000)
    if record.get("prompt_tokens"):
        tokens_in.inc(record["prompt_tokens"])
    if record.get("completion_tokens"):
        tokens_out.inc(record["completion_tokens"])
    limit = record.get("limit")
    if limit:
        REJECTIONS.labels(limit if limit in LIMITS else "other").inc()
