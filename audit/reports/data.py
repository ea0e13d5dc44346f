"""The shapes of a report (what it counts, how denials are grouped), and its fixed vocabulary."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from django.db.models import Q

REPORT_VERSION = 1
GENESIS = "0" * 64  # the chain head before the first event
FORMATS = ("html", "csv", "json")
# A denial event is written before its usage record, at most one request duration earlier (the upstream
# read timeout, ten minutes by default); events this far outside the period are still matched.
DENIAL_EVENT_LEAD = timedelta(minutes=15)
DENIAL_EVENT_LAG = timedelta(minutes=1)
HOURLY_UP_TO = timedelta(days=2)  # longer periods are charted by day, beyond DAILY_UP_TO by week
DAILY_UP_TO = timedelta(days=92)
# Usage records reach the database seconds after their request (longer if PostgreSQL was down a minute):
# a scheduled report covers a period only once it has settled this long.
SCHEDULE_SETTLE = timedelta(minutes=10)

DENIAL_GROUPS = ("auth", "scope", "ip", "rate_limit", "validation", "other")
DENIAL_GROUP_LABELS = {
    "auth": "Auth",
    "scope": "Scope",
    "ip": "IP",
    "rate_limit": "Rate limit",
    "validation": "Validation",
    "other": "Other",
}
_GROUP_REASONS = {
    "auth": ("missing_token", "invalid_token"),
    "scope": ("insufficient_scope", "model_not_allowed"),
    "ip": ("ip_not_allowed",),
    "rate_limit": ("requests", "tokens", "concurrency", "daily_tokens", "rate_limit_exceeded"),
    "validation": (
        "invalid_request",
        "request_too_large",
        "unsupported_media_type",
        "model_not_found",
        "upstream_rejected",  # vLLM refused the request with a 4xx: it was about the request
    ),
}
DENIAL_GROUP_OF = {reason: group for group, reasons in _GROUP_REASONS.items() for reason in reasons}
_STATUS_GROUP = {
    401: "auth",
    403: "scope",
    429: "rate_limit",
    400: "validation",
    413: "validation",
    415: "validation",
}
SECURITY_EVENT_KINDS = (
    "token.revoked",
    "token.refresh_reuse",
    "code.replayed",
    "login.locked_out",
    "anomaly.detected",
    "audit.checkpoint_refused",  # beat would not sign the chain head: the chain does not verify
)  # and every key.* event

DENIED = Q(status__gte=400, status__lt=500) & ~Q(status=499)
ERROR = Q(status__gte=500) | Q(status__lt=400, outcome="upstream_error")
TIMED = Q(status__lt=400) | Q(status__gte=500)


class ReportPeriodError(ValueError):
    """The period is not a valid report period."""


def denial_group(reason: str, status: int) -> str:
    """Return the group (auth, scope, ip, rate_limit, validation, other) of a denial reason."""
    if reason in DENIAL_GROUP_OF:
        return DENIAL_GROUP_OF[reason]
    if reason.startswith("user_"):  # user_requests, user_tokens: the per-user limits
        return "rate_limit"
    return _STATUS_GROUP.get(status, "other")


# --- the report's data ---------------------------------------------------------------------------------


@dataclass
class Stats:
    """Traffic figures for one client, one model, or the whole period (key "")."""

    key: str
    requests: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    errors: int = 0
    denied: int = 0
    denials: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DENIAL_GROUPS, 0))
    p50_ms: float | None = None
    p95_ms: float | None = None

    def denial_counts(self) -> list[int]:
        """Return the denials per group, in ``DENIAL_GROUPS`` order."""
        return [self.denials.get(group, 0) for group in DENIAL_GROUPS]


@dataclass
class UserUsage:
    """One user's traffic through one client."""

    user: str
    client_id: str
    requests: int
    tokens_in: int
    tokens_out: int
    tokens: int


@dataclass
class Bucket:
    """Traffic in one time bucket [start, start + bucket)."""

    start: datetime
    requests: int = 0
    denied: int = 0
    errors: int = 0
    tokens_in: int = 0
    tokens_out: int = 0


BUCKET_FIELDS = ("requests", "denied", "errors", "tokens_in", "tokens_out")  # a Bucket's counts


@dataclass
class DenialReason:
    """How many requests were denied for one reason."""

    reason: str
    group: str
    count: int

    def group_label(self) -> str:
        """Return the group's display name."""
        return DENIAL_GROUP_LABELS.get(self.group, self.group)


@dataclass
class EventEntry:
    """One security event as listed in the report."""

    occurred_at: datetime
    seq: int | None
    kind: str
    outcome: str
    actor: str
    client_id: str
    ip: str | None
    request_id: str
    data: dict[str, Any]

    def data_json(self) -> str:
        """Return the event's data as compact JSON."""
        return json.dumps(self.data, sort_keys=True, ensure_ascii=False, separators=(", ", ": "))


@dataclass
class ReportData:
    """Everything a report shows; rendered by :func:`report_render`, rebuilt by :func:`report_from_json`."""

    kind: str
    since: datetime
    until: datetime
    generated_at: datetime
    created_by: str
    chain_seq: int
    chain_head: str
    bucket: str
    totals: Stats
    clients: list[Stats]
    models: list[Stats]
    denial_reasons: list[DenialReason]
    top_users: list[UserUsage]
    series: list[Bucket]
    event_counts: dict[str, int]
    events: list[EventEntry]
    clients_omitted: int = 0  # rows past TABLE_ROWS, counted in the totals only
    models_omitted: int = 0
    version: int = REPORT_VERSION

    @property
    def events_total(self) -> int:
        """Return how many security events the period holds (the list may stop at the limit)."""
        return sum(self.event_counts.values())


class Denials(NamedTuple):
    client_id: str
    model: str | None  # None: a model the report's table does not list
    reason: str
    group: str
    requests: int


# --- building ------------------------------------------------------------------------------------------
