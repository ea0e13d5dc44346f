"""Build a report's data from the usage records and audit events of a period (see the package docstring)."""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db import connections
from django.db.models import (
    Aggregate,
    Case,
    CharField,
    Count,
    Exists,
    F,
    FloatField,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
    Sum,
    Value,
    When,
)
from django.db.models.fields.json import KT
from django.db.models.functions import Collate, TruncDay, TruncHour, TruncWeek
from django.utils import timezone

from audit.models import AuditEvent, AuditReport, ChainHead, UsageRecord
from audit.reports.data import (
    BUCKET_FIELDS,
    DAILY_UP_TO,
    DENIAL_EVENT_LAG,
    DENIAL_EVENT_LEAD,
    DENIED,
    ERROR,
    GENESIS,
    HOURLY_UP_TO,
    SECURITY_EVENT_KINDS,
    TIMED,
    Bucket,
    DenialReason,
    Denials,
    EventEntry,
    ReportData,
    ReportPeriodError,
    Stats,
    UserUsage,
    denial_group,
)

TOP_USERS = 10
# Model names are what clients sent (before the allowlist check): a client could make thousands. The
# tables list the busiest rows, cut in the database; the totals still count every request.
TABLE_ROWS = 100
EVENT_LIST_LIMIT = 1000  # counts stay exact; a period with more events lists the first ones


def report_build(
    *, since: datetime, until: datetime, kind: str = "custom", created_by: str = "system"
) -> ReportData:
    """Compute a report over ``[since, until)`` from the usage records and the audit log."""
    period_check(since, until)
    if kind not in AuditReport.Kind.values:
        raise ValueError(f"unknown report kind {kind!r}")
    since, until = since.astimezone(UTC), until.astimezone(UTC)
    usage = UsageRecord.objects.filter(occurred_at__gte=since, occurred_at__lt=until)
    clients, models = _busiest(usage, "client_id"), _busiest(usage, "model")
    denials = _denials(usage, since, until, list(models))
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
        totals=_stats_by(usage, None, {"": usage.aggregate(**_traffic())}, denials)[0],
        clients=_stats_by(usage, "client_id", clients, denials),
        models=_stats_by(usage, "model", models, denials),
        denial_reasons=_denial_reasons(denials),
        top_users=_top_users(usage),
        series=_series(usage, since, until, bucket),
        event_counts=event_counts,
        events=events,
        clients_omitted=_omitted(usage, "client_id", clients),
        models_omitted=_omitted(usage, "model", models),
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


def _busiest(usage: QuerySet[UsageRecord], key: str) -> dict[str, dict[str, Any]]:
    """The traffic of the ``TABLE_ROWS`` keys with the most requests, by key, busiest first.

    Cut in the database: model names are what clients sent, so a period can hold any number of them, and
    only the rows listed are read. Ties go by key in code-point order, as Python sorts the rows after."""
    ordered = usage.values(key).annotate(**_traffic()).order_by("-requests", _code_points(usage, key))
    return {row.pop(key): row for row in ordered[:TABLE_ROWS]}


def _code_points(usage: QuerySet[UsageRecord], key: str) -> F | Collate:
    # PostgreSQL's "C" collation orders by bytes, which in UTF-8 is code-point order; SQLite's default
    # (BINARY) already does, and knows no collation named "C".
    return Collate(F(key), "C") if connections[usage.db].vendor == "postgresql" else F(key)


def _omitted(usage: QuerySet[UsageRecord], key: str, listed: dict[str, dict[str, Any]]) -> int:
    """How many keys the table leaves out (counted in the database only when the table is full)."""
    if len(listed) < TABLE_ROWS:
        return 0
    return max(usage.values(key).distinct().count() - len(listed), 0)


def _stats_by(
    usage: QuerySet[UsageRecord], key: str | None, rows: dict[str, dict[str, Any]], denials: list[Denials]
) -> list[Stats]:
    """The rows' stats (their traffic, latency and denials), busiest first; key None: the period's totals."""
    stats = {key_value: Stats(key=key_value, **row) for key_value, row in rows.items()}
    listed = usage if key is None else usage.filter(**{f"{key}__in": list(stats)})
    for key_value, (p50, p95) in latency_percentiles(listed, key).items():
        stats[key_value].p50_ms, stats[key_value].p95_ms = p50, p95
    for denial in denials:
        row_stats = stats.get(getattr(denial, key) if key else "")
        if row_stats is not None:  # None: a key the table leaves out
            row_stats.denials[denial.group] += denial.requests
    return sorted(stats.values(), key=lambda s: (-s.requests, s.key))


def _denials(
    usage: QuerySet[UsageRecord], since: datetime, until: datetime, models: list[str]
) -> list[Denials]:
    """Count the denied requests by client, model and reason (the reason from their gateway.denied event).

    Only the ``models`` the table lists are told apart; the others count as model None, one group however
    many names clients made up. The totals, clients and reasons count them all the same: their events'
    reasons are shared out over the group as a whole, which is the sum of sharing them per model unless a
    client reused a request id (then a group can hold more events than requests, and the excess is cut)."""
    listed = _listed_model(models)
    denied = (
        usage.filter(DENIED)
        .annotate(listed=listed)
        .values_list("client_id", "listed", "status", "outcome")
        .annotate(n=Count("id"))
    )
    explained = _denial_events(since, until, listed)
    counts: dict[tuple[str, str | None, str, str], int] = defaultdict(int)
    for client_id, model, status, outcome, total in denied.order_by():
        for found, count in _allot(total, explained.get((client_id, model, status, outcome), {})):
            reason = found or _fallback_reason(outcome, status)
            counts[(client_id, model, reason, denial_group(reason, status))] += count
    return [Denials(*key, count) for key, count in counts.items()]


def _listed_model(models: list[str]) -> Case | Value:
    """A usage record's model if the table lists it, else NULL."""
    if not models:
        return Value(None, output_field=CharField())
    return Case(When(model__in=models, then=F("model")), default=Value(None), output_field=CharField())


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


def _denial_events(
    since: datetime, until: datetime, listed: Case | Value
) -> dict[tuple[Any, ...], dict[str, int]]:
    """Count gateway.denied reasons by the (client, listed model, status, outcome) of their usage record."""
    # request_id is unique on usage records: each subquery is one index lookup per denial event
    usage_of = UsageRecord.objects.filter(request_id=OuterRef("request_id")).order_by()
    in_period = usage_of.filter(occurred_at__gte=since, occurred_at__lt=until)

    def column(name: str) -> Subquery:
        return Subquery(usage_of.annotate(listed=listed).values(name)[:1])

    rows = (
        AuditEvent.objects.filter(
            Exists(in_period),
            kind="gateway.denied",
            occurred_at__gte=since - DENIAL_EVENT_LEAD,
            occurred_at__lt=until + DENIAL_EVENT_LAG,
        )
        .exclude(request_id="")
        .annotate(u_client=column("client_id"), u_model=column("listed"), reason=KT("data__reason"))
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


def _denial_reasons(denials: list[Denials]) -> list[DenialReason]:
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


def _series(usage: QuerySet[UsageRecord], since: datetime, until: datetime, bucket: str) -> list[Bucket]:
    trunc = {"hour": TruncHour, "day": TruncDay, "week": TruncWeek}[bucket]("occurred_at", tzinfo=UTC)
    rows = usage.annotate(start=trunc).values("start").annotate(**_traffic()).order_by()
    found = {row["start"]: row for row in rows}
    series = []
    for start in bucket_starts(since, until, bucket):
        row = found.get(start, {})
        series.append(Bucket(start, **{name: row.get(name, 0) for name in BUCKET_FIELDS}))
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
