"""Audit reports: traffic, denials, latency and security events over a period, as HTML, CSV or JSON.

Every traffic number comes from the usage records (one per gateway request, denied ones too), counted
over the half-open period ``[since, until)`` by the record's ``occurred_at``:

- requests: every usage record; tokens in / out: its prompt / completion tokens.
- errors: status >= 500 (a gateway fault, an upstream 502/503/504, revocation state unavailable), plus
  streams whose 200 was already sent and that ended with ``outcome = upstream_error``.
- denied: status 4xx except 499 (a client that left before sending its request is neither). The reason
  is the ``gateway.denied`` event with the same request id; a record without one falls back to its
  outcome (``denied:<reason>``) or its status. Reasons are grouped by :func:`denial_group`.
- latency: total = gateway_ms + upstream_ms over the requests that were not denied (a flood of cheap
  401s would otherwise hide the real latency); p50/p95 by linear interpolation, PostgreSQL's
  ``percentile_cont`` computed in the database there and the same formula in Python elsewhere (SQLite).

Security events: every ``key.*``, token.revoked, token.refresh_reuse, code.replayed, login.locked_out and
anomaly.detected event in the period, counted exactly and listed up to ``EVENT_LIST_LIMIT``. The chain
head is read after the events, so it covers every listed event (``verifyaudit`` can check them against it).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import Any, NamedTuple

from django.db import connections, transaction
from django.db.models import Aggregate, Count, Exists, F, FloatField, OuterRef, Q, QuerySet, Subquery, Sum
from django.db.models.fields.json import KT
from django.db.models.functions import TruncDay, TruncHour, TruncWeek
from django.template.loader import render_to_string
from django.utils import timezone

from audit import report_charts as charts
from audit.models import AuditEvent, AuditReport, ChainHead, UsageRecord
from audit.services import audit_record

REPORT_VERSION = 1
GENESIS = "0" * 64  # the chain head before the first event
FORMATS = ("html", "csv", "json")
TOP_USERS = 10
# Model names are what clients sent (before the allowlist check): a client could make thousands. The
# tables list the busiest rows; the totals still count every request.
TABLE_ROWS = 100
EVENT_LIST_LIMIT = 1000  # counts stay exact; a period with more events lists the first ones
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


class _Denials(NamedTuple):
    client_id: str
    model: str
    reason: str
    group: str
    requests: int


# --- building ------------------------------------------------------------------------------------------


def report_build(
    *, since: datetime, until: datetime, kind: str = "custom", created_by: str = "system"
) -> ReportData:
    """Compute a report over ``[since, until)`` from the usage records and the audit log."""
    period_check(since, until)
    if kind not in AuditReport.Kind.values:
        raise ValueError(f"unknown report kind {kind!r}")
    since, until = since.astimezone(UTC), until.astimezone(UTC)
    usage = UsageRecord.objects.filter(occurred_at__gte=since, occurred_at__lt=until)
    denials = _denials(usage, since, until)
    clients = _stats_by(usage, "client_id", denials)
    models = _stats_by(usage, "model", denials)
    bucket = bucket_size(since, until)
    events, event_counts = _security_events(since, until)
    head = ChainHead.objects.order_by("pk").first()  # read after the events, so it covers every one listed
    return ReportData(
        kind=kind,
        since=since,
        until=until,
        generated_at=timezone.now().astimezone(UTC),
        created_by=created_by,
        chain_seq=head.seq if head else 0,
        chain_head=head.hash if head else GENESIS,
        bucket=bucket,
        totals=_stats_by(usage, None, denials)[0],
        clients=clients[:TABLE_ROWS],
        models=models[:TABLE_ROWS],
        denial_reasons=_denial_reasons(denials),
        top_users=_top_users(usage),
        series=_series(usage, since, until, bucket),
        event_counts=event_counts,
        events=events,
        clients_omitted=max(len(clients) - TABLE_ROWS, 0),
        models_omitted=max(len(models) - TABLE_ROWS, 0),
    )


def period_check(since: datetime, until: datetime) -> None:
    """Refuse a period that is not two aware datetimes with since before until."""
    if timezone.is_naive(since) or timezone.is_naive(until):
        raise ReportPeriodError("since and until must be timezone-aware")
    if since >= until:
        raise ReportPeriodError(f"since ({since.isoformat()}) must be before until ({until.isoformat()})")


def bucket_size(since: datetime, until: datetime) -> str:
    """Return the chart bucket for a period: hour up to two days, day up to 92 days, week beyond."""
    span = until - since
    return "hour" if span <= HOURLY_UP_TO else "day" if span <= DAILY_UP_TO else "week"


def _traffic() -> dict[str, Aggregate]:
    return {
        "requests": Count("id"),
        "tokens_in": Sum("prompt_tokens", default=0),
        "tokens_out": Sum("completion_tokens", default=0),
        "errors": Count("id", filter=ERROR),
        "denied": Count("id", filter=DENIED),
    }


def _stats_by(usage: QuerySet[UsageRecord], key: str | None, denials: list[_Denials]) -> list[Stats]:
    if key is None:
        rows = [{"key": "", **usage.aggregate(**_traffic())}]
    else:
        rows = [{"key": row.pop(key), **row} for row in usage.values(key).annotate(**_traffic()).order_by()]
    stats = {row["key"]: Stats(**row) for row in rows}
    for key_value, (p50, p95) in latency_percentiles(usage, key).items():
        stats[key_value].p50_ms, stats[key_value].p95_ms = p50, p95
    for denial in denials:
        row_stats = stats[getattr(denial, key) if key else ""]
        row_stats.denials[denial.group] += denial.requests
    return sorted(stats.values(), key=lambda s: (-s.requests, s.key))


def _denials(usage: QuerySet[UsageRecord], since: datetime, until: datetime) -> list[_Denials]:
    """Count the denied requests by client, model and reason (the reason from their gateway.denied event)."""
    denied = (
        usage.filter(DENIED).values_list("client_id", "model", "status", "outcome").annotate(n=Count("id"))
    )
    explained = _denial_events(since, until)
    counts: dict[tuple[str, str, str, str], int] = defaultdict(int)
    for client_id, model, status, outcome, total in denied.order_by():
        for found, count in _allot(total, explained.get((client_id, model, status, outcome), {})):
            reason = found or _fallback_reason(outcome, status)
            counts[(client_id, model, reason, denial_group(reason, status))] += count
    return [_Denials(*key, count) for key, count in sorted(counts.items())]


def _allot(total: int, reasons: dict[str, int]) -> list[tuple[str, int]]:
    """Share ``total`` denied requests among the reasons found; what no event explains gets reason ""."""
    allotted, left = [], total
    for reason, count in sorted(reasons.items(), key=lambda item: (-item[1], item[0])):
        taken = min(count, left)  # a client reusing a request id could bring two events for one record
        if taken:
            allotted.append((reason, taken))
            left -= taken
    return [*allotted, ("", left)] if left else allotted


def _fallback_reason(outcome: str, status: int) -> str:
    code = outcome.removeprefix("denied:") if outcome.startswith("denied:") else ""
    return code if code and not code.isdigit() else f"http_{status}"


def _denial_events(since: datetime, until: datetime) -> dict[tuple[Any, ...], dict[str, int]]:
    """Count gateway.denied reasons by the (client, model, status, outcome) of their usage record."""
    # request_id is unique on usage records: each subquery is one index lookup per denial event
    usage_of = UsageRecord.objects.filter(request_id=OuterRef("request_id")).order_by()
    in_period = usage_of.filter(occurred_at__gte=since, occurred_at__lt=until)

    def column(name: str) -> Subquery:
        return Subquery(usage_of.values(name)[:1])

    rows = (
        AuditEvent.objects.filter(
            Exists(in_period),
            kind="gateway.denied",
            occurred_at__gte=since - DENIAL_EVENT_LEAD,
            occurred_at__lt=until + DENIAL_EVENT_LAG,
        )
        .exclude(request_id="")
        .annotate(u_client=column("client_id"), u_model=column("model"), reason=KT("data__reason"))
        .annotate(u_status=column("status"), u_outcome=column("outcome"))
        .values_list("u_client", "u_model", "u_status", "u_outcome", "reason")
        .annotate(n=Count("id"))
        .order_by()
    )
    explained: dict[tuple[Any, ...], dict[str, int]] = defaultdict(dict)
    for client_id, model, status, outcome, reason, count in rows:
        if reason:
            explained[(client_id, model, status, outcome)][str(reason)] = count
    return explained


def _denial_reasons(denials: list[_Denials]) -> list[DenialReason]:
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for denial in denials:
        counts[(denial.reason, denial.group)] += denial.requests
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [DenialReason(reason, group, count) for (reason, group), count in ranked]


def _top_users(usage: QuerySet[UsageRecord]) -> list[UserUsage]:
    rows = (
        usage.exclude(user="")
        .values("user", "client_id")
        .annotate(
            requests=Count("id"),
            tokens_in=Sum("prompt_tokens", default=0),
            tokens_out=Sum("completion_tokens", default=0),
            tokens=Sum(F("prompt_tokens") + F("completion_tokens"), default=0),
        )
        .order_by("-tokens", "-requests", "user", "client_id")[:TOP_USERS]
    )
    return [UserUsage(**row) for row in rows]


_BUCKET_FIELDS = ("requests", "denied", "errors", "tokens_in", "tokens_out")


def _series(usage: QuerySet[UsageRecord], since: datetime, until: datetime, bucket: str) -> list[Bucket]:
    trunc = {"hour": TruncHour, "day": TruncDay, "week": TruncWeek}[bucket]("occurred_at", tzinfo=UTC)
    rows = usage.annotate(start=trunc).values("start").annotate(**_traffic()).order_by()
    found = {row["start"]: row for row in rows}
    series = []
    for start in bucket_starts(since, until, bucket):
        row = found.get(start, {})
        series.append(Bucket(start, **{name: row.get(name, 0) for name in _BUCKET_FIELDS}))
    return series


def bucket_starts(since: datetime, until: datetime, bucket: str) -> list[datetime]:
    """Return the start of every bucket that overlaps ``[since, until)``, in UTC."""
    start = since.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    if bucket != "hour":
        start = start.replace(hour=0)
    if bucket == "week":
        start -= timedelta(days=start.weekday())  # weeks start on Monday, like the database's trunc
    step = {"hour": timedelta(hours=1), "day": timedelta(days=1), "week": timedelta(weeks=1)}[bucket]
    starts = []
    while start < until:
        starts.append(start)
        start += step
    return starts


def _security_events(since: datetime, until: datetime) -> tuple[list[EventEntry], dict[str, int]]:
    events = AuditEvent.objects.filter(occurred_at__gte=since, occurred_at__lt=until).filter(
        Q(kind__startswith="key.") | Q(kind__in=SECURITY_EVENT_KINDS)
    )
    counts = dict(events.values_list("kind").annotate(n=Count("id")).order_by("kind"))
    listed = [_event_entry(event) for event in events.order_by("occurred_at", "id")[:EVENT_LIST_LIMIT]]
    return listed, counts


def _event_entry(event: AuditEvent) -> EventEntry:
    return EventEntry(
        occurred_at=event.occurred_at.astimezone(UTC),
        seq=event.seq,
        kind=event.kind,
        outcome=event.outcome,
        actor=event.actor,
        client_id=event.client_id,
        ip=event.ip,
        request_id=event.request_id,
        data=event.data if isinstance(event.data, dict) else {"value": event.data},
    )


# --- latency -------------------------------------------------------------------------------------------


class _PercentileCont(Aggregate):
    """PostgreSQL's ordered-set aggregate ``percentile_cont(f) WITHIN GROUP (ORDER BY x)``."""

    function = "PERCENTILE_CONT"
    template = "%(function)s(%(fraction)s) WITHIN GROUP (ORDER BY %(expressions)s)"
    output_field = FloatField()

    def __init__(self, expression: Any, fraction: float) -> None:
        super().__init__(expression, fraction=repr(float(fraction)))  # our constant, never user input


def percentile(values: list[float], fraction: float) -> float | None:
    """Return the percentile of ``values`` by linear interpolation (what percentile_cont computes)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = fraction * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def latency_percentiles(
    usage: QuerySet[UsageRecord], key: str | None, *, in_database: bool | None = None
) -> dict[str, tuple[float | None, float | None]]:
    """Return {key value: (p50, p95)} of gateway_ms + upstream_ms over the requests that were not denied."""
    timed = usage.filter(TIMED)
    if in_database is None:
        in_database = connections[timed.db].vendor == "postgresql"
    if in_database:
        total = F("gateway_ms") + F("upstream_ms")
        aggregates = {"p50": _PercentileCont(total, 0.5), "p95": _PercentileCont(total, 0.95)}
        if key is None:
            row = timed.aggregate(**aggregates)
            rows = [("", row["p50"], row["p95"])] if row["p50"] is not None else []
        else:
            rows = list(timed.values_list(key).annotate(**aggregates).order_by())
        return {k: (_ms(p50), _ms(p95)) for k, p50, p95 in rows}
    samples: dict[str, list[float]] = defaultdict(list)
    columns = (key,) if key else ()
    for row in timed.values_list(*columns, "gateway_ms", "upstream_ms").iterator(chunk_size=5000):
        samples[row[0] if key else ""].append(row[-2] + row[-1])
    return {k: (_ms(percentile(v, 0.5)), _ms(percentile(v, 0.95))) for k, v in samples.items()}


# --- rendering -----------------------------------------------------------------------------------------


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
        ["section", "bucket_start", *_BUCKET_FIELDS],
        *(["series", b.start, *(getattr(b, name) for name in _BUCKET_FIELDS)] for b in data.series),
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
