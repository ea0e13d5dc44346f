"""Anomaly detection over what was stored since the last run (a beat job runs it every minute).

Rules, per client and minute of ``occurred_at`` (the gateway's clock): a request or token rate far above
the client's own baseline (the hour before); a burst of 401/403/429 answers from one address; one access
token used from several addresses; each refresh-token reuse, code replay and locked-out account. Per
account, over an hour: failed sign-ins from many addresses, which the lockout (kept per account and
address) does not stop.

Records reach the database late: the ingest runs seconds behind the gateways, or minutes to hours when the
stream is behind or PostgreSQL was down. So a run does not look at "the last minute": it reads the records
stored since the last run (high-water marks of usage ids and audit-chain seqs, in ``AnomalyScan``) and
evaluates each minute they fall in, whole, whenever that was (for sign-ins, the hour up to that minute).
A minute evaluated again as more of it arrives is recorded once per rule, client, subject and minute; a
sign-in spread once an hour per account.

Each finding is one ``anomaly.detected`` audit event with its evidence. A finding names the one end user it
is attributable to when its records do (``user``: the tokens' subject), so a handler can act on that user
rather than on every user of a shared client. Handlers registered by other apps act on findings (the
gateway quarantines what a client's policy says to), since the audit app imports no other app. A finding
is recorded in the transaction its handlers run in: when one fails, neither its record nor its action is
kept, and the next run (the marks did not move) finds it again and tries again.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from django.db import OperationalError, connection, transaction
from django.db.models import Count, Max, QuerySet, Sum
from django.db.models.functions import Trunc
from django.utils import timezone

from audit.models import AnomalyScan, AuditEvent, UsageRecord
from audit.services import audit_record

logger = logging.getLogger(__name__)

WINDOW = timedelta(minutes=1)
BASELINE = timedelta(minutes=60)
RATE_FACTOR = 5.0  # "far above": five times the baseline minute...
RATE_FLOOR_REQUESTS = 60  # ...and at least this many requests in the minute (quiet clients are not flagged)
RATE_FLOOR_TOKENS = 20_000
DENIAL_BURST = 20  # 401/403/429 answers to one client (or one address) in a minute
TOKEN_IPS = 3  # one access token seen from this many addresses in a minute
LOGIN_SPREAD_WINDOW = timedelta(hours=1)
LOGIN_SPREAD_FAILURES = 20  # failed sign-ins to one account within the hour...
LOGIN_SPREAD_ADDRESSES = 5  # ...from at least this many addresses
FIRST_LOOKBACK = LOGIN_SPREAD_WINDOW  # a first run (no marks yet) reads what occurred in the longest window
LOCK_TIMEOUT = "2s"  # the wait for in-flight ingest transactions; past it the usage mark stays where it was
EVENT_RULES = {
    "token.refresh_reuse": "refresh_reuse",
    "login.locked_out": "account_locked",
    "code.replayed": "code_replay",
}

Handler = Callable[["Finding"], None]
_handlers: list[Handler] = []


@dataclass(frozen=True)
class Finding:
    rule: str
    client_id: str
    evidence: dict[str, Any]
    subject: str = ""  # what, within the rule and client, it is recorded once per window for
    window: timedelta = WINDOW
    start: datetime | None = None  # the window's start (of occurred_at); None: the window before detection
    sliding: bool = False  # overlapping windows (sign-ins): recorded once per ``window`` of detection time
    user: str = ""  # the one end user it is attributable to (a user id, the tokens' sub); "": not one user

    @property
    def key(self) -> str:
        """What it is recorded once for: rule, client, subject and (tumbling windows) the window."""
        minute = "" if self.sliding or self.start is None else f"@{self.start.isoformat()}"
        return f"{self.rule}:{self.client_id}:{self.subject}{minute}"


def anomaly_handler_register(handler: Handler) -> None:
    """Call ``handler`` with every new finding (the gateway registers its quarantine here)."""
    if handler not in _handlers:
        _handlers.append(handler)


def _minute(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(second=0, microsecond=0)


def _minutes(rows: QuerySet[Any]) -> list[datetime]:
    """The minutes (UTC) of the rows' ``occurred_at``, oldest first."""
    found = rows.order_by().annotate(m=Trunc("occurred_at", "minute", tzinfo=UTC)).values_list("m", flat=True)
    return sorted({_minute(m) for m in found.distinct()})


def _in_minute(start: datetime) -> QuerySet[UsageRecord]:
    return UsageRecord.objects.filter(occurred_at__gte=start, occurred_at__lt=start + WINDOW).order_by()


def _alone(by_user: dict[str, int], enough: Callable[[int], bool]) -> tuple[str, int]:
    """The user whose own records are enough for the finding, and their amount; ("", 0) when none is (the
    records are the client's own, by client credentials, or spread over users)."""
    user, amount = max(by_user.items(), key=lambda item: item[1])
    return (user, amount) if user and enough(amount) else ("", 0)


def _attributed(evidence: dict[str, Any], user: str, amount: int) -> dict[str, Any]:
    return {**evidence, "user": user, "by_user": amount} if user else evidence


def _far_above(amount: int, *, floor: int, past: float) -> bool:
    return amount >= floor and amount > RATE_FACTOR * past


def _rate_findings(start: datetime) -> list[Finding]:
    served = UsageRecord.objects.filter(status__lt=400).order_by()
    spent = Sum("prompt_tokens") + Sum("completion_tokens")
    minutes = BASELINE / WINDOW
    baseline = {
        row["client_id"]: (row["n"] / minutes, (row["t"] or 0) / minutes)
        for row in served.filter(occurred_at__gte=start - BASELINE, occurred_at__lt=start)
        .values("client_id")
        .annotate(n=Count("id"), t=spent)
    }
    by_client: dict[str, tuple[dict[str, int], dict[str, int]]] = defaultdict(lambda: ({}, {}))
    recent = _in_minute(start).filter(status__lt=400).values("client_id", "user")
    for row in recent.annotate(n=Count("id"), t=spent):
        requests, tokens = by_client[row["client_id"]]
        requests[row["user"]], tokens[row["user"]] = row["n"], row["t"] or 0
    findings = []
    for client_id, amounts in by_client.items():
        (requests, tokens), usual = amounts, baseline.get(client_id, (0.0, 0.0))
        for rule, floor, by_user, past in (
            ("request_rate", RATE_FLOOR_REQUESTS, requests, usual[0]),
            ("token_rate", RATE_FLOOR_TOKENS, tokens, usual[1]),
        ):
            total = sum(by_user.values())
            if not _far_above(total, floor=floor, past=past):
                continue
            user, amount = _alone(by_user, partial(_far_above, floor=floor, past=past))
            evidence = _attributed({"per_minute": total, "baseline": round(past, 2)}, user, amount)
            findings.append(Finding(rule, client_id, evidence, start=start, user=user))
    return findings


def _denial_findings(start: datetime) -> list[Finding]:
    denied = _in_minute(start).filter(status__in=(401, 403, 429))
    by_address: dict[tuple[str, str | None], dict[str, int]] = defaultdict(dict)
    for row in denied.values("client_id", "client_ip", "user").annotate(n=Count("id")):
        by_address[(row["client_id"], row["client_ip"])][row["user"]] = row["n"]
    findings = []
    for (client_id, ip), by_user in by_address.items():
        if sum(by_user.values()) < DENIAL_BURST:
            continue
        user, amount = _alone(by_user, lambda n: n >= DENIAL_BURST)
        evidence = _attributed({"denials": sum(by_user.values()), "ip": ip}, user, amount)
        findings.append(Finding("denial_burst", client_id, evidence, subject=str(ip), start=start, user=user))
    return findings


def _token_ip_findings(start: datetime) -> list[Finding]:
    rows = (
        _in_minute(start)
        .exclude(token_id="")
        .values("client_id", "token_id", "user")  # one token, one subject: the user adds no group
        .annotate(ips=Count("client_ip", distinct=True))
        .filter(ips__gte=TOKEN_IPS)
    )
    return [
        Finding(
            "token_many_ips",
            r["client_id"],
            {"token_id": r["token_id"], "addresses": r["ips"]},
            subject=r["token_id"],
            start=start,
            user=r["user"],
        )
        for r in rows
    ]


def _event_findings(new: QuerySet[AuditEvent]) -> list[Finding]:
    """One finding per event. A reuse names the client and the token family, not the user (a handler finds
    the user from the family, which the audit app does not read); a replayed code names its user too."""
    findings = []
    for e in new.filter(kind__in=EVENT_RULES).order_by("seq"):
        evidence = {"event_seq": e.seq, "actor": e.actor}
        if e.data.get("token_family"):
            evidence["token_family"] = e.data["token_family"]
        rule = EVENT_RULES[e.kind]
        user = str(e.data.get("user") or "") if e.kind == "code.replayed" else ""  # the code's user
        findings.append(
            Finding(rule, e.client_id, evidence, subject=str(e.seq), start=_minute(e.occurred_at), user=user)
        )
    return findings


def _login_spread_findings(new: QuerySet[AuditEvent]) -> list[Finding]:
    """Guessing at one account from many addresses: slow enough, or spread enough, that no (account,
    address) pair reaches the lockout's limit. For each minute with new failures, the hour up to its end,
    for the accounts those failures were against; reported once an hour per account, with the counts as
    they stood then. The subject is the user name as typed (the account may not exist)."""
    touched: dict[datetime, set[str]] = defaultdict(set)
    failures = new.filter(kind="login.failed").order_by()
    for at, actor in failures.annotate(m=Trunc("occurred_at", "minute", tzinfo=UTC)).values_list(
        "m", "actor"
    ):
        touched[_minute(at)].add(actor)
    findings = []
    for minute in sorted(touched):
        end = minute + WINDOW
        rows = (
            AuditEvent.objects.filter(
                kind="login.failed",
                actor__in=touched[minute],
                occurred_at__gt=end - LOGIN_SPREAD_WINDOW,
                occurred_at__lt=end,
            )
            .order_by()
            .values("actor")
            .annotate(n=Count("id"), ips=Count("ip", distinct=True))
            .filter(n__gte=LOGIN_SPREAD_FAILURES, ips__gte=LOGIN_SPREAD_ADDRESSES)
        )
        findings += [
            Finding(
                "login_spread",
                "",
                {"account": r["actor"], "failures": r["n"], "addresses": r["ips"]},
                subject=r["actor"],
                window=LOGIN_SPREAD_WINDOW,
                start=end - LOGIN_SPREAD_WINDOW,
                sliding=True,
            )
            for r in rows
        ]
    return findings


def _usage_settled() -> int | None:
    """The highest usage-record id at or below which every row is committed (or gone for good); None when
    in-flight ingest transactions did not end within ``LOCK_TIMEOUT``.

    An id is taken when a row is inserted and seen when its transaction commits, so concurrent ingest runs
    can commit id 7 after id 8 was read: a mark at 8 would skip 7 for ever. SHARE mode waits for every
    transaction that wrote the table to end, and holds new writes only while the maximum is read. (SQLite
    has one writer at a time. Audit events need none of this: the chain numbers them under the head's row
    lock, so their seqs commit in order.)"""
    table = connection.ops.quote_name(UsageRecord._meta.db_table)
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            if connection.vendor == "postgresql":
                cursor.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                cursor.execute(f"LOCK TABLE {table} IN SHARE MODE")
            cursor.execute(f"SELECT MAX(id) FROM {table}")  # noqa: S608 (the model's table, quoted)
            return int(cursor.fetchone()[0] or 0)
    except OperationalError:
        return None


def _recorded_before(finding: Finding, now: datetime) -> bool:
    # A tumbling window is first detected no earlier than it opens (give or take a gateway clock up to a
    # minute ahead of ours), however late its records came; a sliding one once per window of detection.
    start = finding.start
    since = now - finding.window if finding.sliding or start is None else start - WINDOW
    return AuditEvent.objects.filter(
        kind="anomaly.detected", data__key=finding.key, occurred_at__gt=since
    ).exists()


def _record(finding: Finding, now: datetime) -> None:
    start = finding.start or now - finding.window
    data = {
        "rule": finding.rule,
        "evidence": finding.evidence,
        "key": finding.key,
        "window_start": start.isoformat(),
        "window_end": (start + finding.window).isoformat(),
    }
    if finding.user:
        data["user"] = finding.user
    audit_record(
        kind="anomaly.detected",
        outcome="denied",
        actor="system",
        client_id=finding.client_id,
        data=data,
        occurred_at=now,
    )


def _handle_and_record(finding: Finding, now: datetime) -> None:
    """Hand the finding to every handler and record it, in one transaction: a handler that fails rolls its
    finding's record back with its own work, so the next run (which skips what is recorded) tries again.

    The record is chained inside the transaction (``audit.chain.append``: it exists only if the transaction
    commits). It goes last: appending holds the chain head's row lock until the commit, and every audit
    writer waits on it, so not while a handler revokes a client's tokens."""
    with transaction.atomic():
        for handler in list(_handlers):
            handler(finding)
        _record(finding, now)


def anomalies_detect(*, now: datetime | None = None) -> list[Finding]:
    """Examine what was stored since the last run: evaluate every minute it falls in (every hour, for
    sign-ins), hand on and record each new finding, then move the marks past what was read. When a handler
    fails, the other findings go on, the marks stay, and the first error is raised."""
    now = now or timezone.now()
    scan = AnomalyScan.objects.filter(pk=1).first()  # the one row
    settled = _usage_settled()  # read before the rows: a row committed after it is read again next run
    event_seq = AuditEvent.objects.aggregate(m=Max("seq"))["m"] or 0
    if scan is None:
        usage = UsageRecord.objects.filter(occurred_at__gt=now - FIRST_LOOKBACK)
        events = AuditEvent.objects.filter(occurred_at__gt=now - FIRST_LOOKBACK)
    else:
        usage = UsageRecord.objects.filter(id__gt=scan.usage_id)
        events = AuditEvent.objects.filter(seq__gt=scan.event_seq)
    findings = [
        f
        for start in _minutes(usage)
        for f in _rate_findings(start) + _denial_findings(start) + _token_ip_findings(start)
    ]
    findings += _event_findings(events) + _login_spread_findings(events)
    fresh: list[Finding] = []
    failed: list[Exception] = []
    for finding in findings:
        if _recorded_before(finding, now):
            continue  # already recorded (and handled) for this window
        try:
            _handle_and_record(finding, now)
        except Exception as exc:  # one finding's failure must not hold back the others' quarantines
            logger.exception("anomaly %s: a handler failed; the next run tries again", finding.key)
            failed.append(exc)
            continue
        fresh.append(finding)
    if failed:  # the marks stay, so the next run reads the same records and finds what failed again
        raise failed[0]
    # Without a settled id the usage mark stays, and what was read is read again (the dedupe holds); with
    # no mark yet either, the next run is a first run again.
    usage_id = settled if settled is not None else scan.usage_id if scan is not None else None
    if usage_id is not None:
        AnomalyScan.objects.update_or_create(
            pk=1, defaults={"usage_id": usage_id, "event_seq": event_seq, "scanned_at": now}
        )
    return fresh
