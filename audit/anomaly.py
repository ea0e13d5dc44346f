"""Anomaly detection over the last minute, and the last hour for sign-ins (a beat job runs it every minute).

Rules, per client: a request or token rate far above the client's own recent baseline; a burst of
401/403/429 answers; one access token used from several IP addresses; refresh-token reuse; a locked-out
account. Per account, over the last hour: failed sign-ins from many addresses, which the lockout (kept per
account and address) does not stop. Each finding is one ``anomaly.detected`` audit event with its evidence,
recorded once per rule, subject and window (once an hour per account for the last rule). Handlers registered
by other apps act on findings (the gateway quarantines a client whose policy says so), since the audit app
imports no other app.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db.models import Count, Q, Sum
from django.utils import timezone

from audit.models import AuditEvent, UsageRecord
from audit.services import audit_record

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

Handler = Callable[["Finding"], None]
_handlers: list[Handler] = []


@dataclass(frozen=True)
class Finding:
    rule: str
    client_id: str
    evidence: dict[str, Any]
    subject: str = ""  # what it is recorded once per window for; by default the client and the evidence
    window: timedelta = WINDOW


def anomaly_handler_register(handler: Handler) -> None:
    """Call ``handler`` with every new finding (the gateway registers its quarantine here)."""
    if handler not in _handlers:
        _handlers.append(handler)


def _rate_findings(now: datetime) -> list[Finding]:
    recent = UsageRecord.objects.filter(occurred_at__gt=now - WINDOW, occurred_at__lte=now, status__lt=400)
    base = UsageRecord.objects.filter(
        occurred_at__gt=now - WINDOW - BASELINE, occurred_at__lte=now - WINDOW, status__lt=400
    )
    minutes = BASELINE / WINDOW
    baseline = {
        row["client_id"]: row
        for row in base.values("client_id").annotate(
            n=Count("id"), t=Sum("prompt_tokens") + Sum("completion_tokens")
        )
    }
    findings = []
    for row in recent.values("client_id").annotate(
        n=Count("id"), t=Sum("prompt_tokens") + Sum("completion_tokens")
    ):
        past = baseline.get(row["client_id"], {"n": 0, "t": 0})
        usual_n, usual_t = past["n"] / minutes, (past["t"] or 0) / minutes
        tokens = row["t"] or 0
        if row["n"] >= RATE_FLOOR_REQUESTS and row["n"] > RATE_FACTOR * usual_n:
            findings.append(
                Finding(
                    "request_rate", row["client_id"], {"per_minute": row["n"], "baseline": round(usual_n, 2)}
                )
            )
        if tokens >= RATE_FLOOR_TOKENS and tokens > RATE_FACTOR * usual_t:
            findings.append(
                Finding("token_rate", row["client_id"], {"per_minute": tokens, "baseline": round(usual_t, 2)})
            )
    return findings


def _denial_findings(now: datetime) -> list[Finding]:
    denied = UsageRecord.objects.filter(
        occurred_at__gt=now - WINDOW, occurred_at__lte=now, status__in=(401, 403, 429)
    )
    findings = []
    for row in denied.values("client_id", "client_ip").annotate(n=Count("id")).filter(n__gte=DENIAL_BURST):
        findings.append(
            Finding("denial_burst", row["client_id"], {"denials": row["n"], "ip": row["client_ip"]})
        )
    return findings


def _token_ip_findings(now: datetime) -> list[Finding]:
    used = UsageRecord.objects.filter(occurred_at__gt=now - WINDOW, occurred_at__lte=now).exclude(token_id="")
    rows = (
        used.values("client_id", "token_id")
        .annotate(ips=Count("client_ip", distinct=True))
        .filter(ips__gte=TOKEN_IPS)
    )
    return [
        Finding("token_many_ips", r["client_id"], {"token_id": r["token_id"], "addresses": r["ips"]})
        for r in rows
    ]


def _event_findings(now: datetime) -> list[Finding]:
    events = AuditEvent.objects.filter(occurred_at__gt=now - WINDOW, occurred_at__lte=now).filter(
        Q(kind="token.refresh_reuse") | Q(kind="login.locked_out") | Q(kind="code.replayed")
    )
    rules = {
        "token.refresh_reuse": "refresh_reuse",
        "login.locked_out": "account_locked",
        "code.replayed": "code_replay",
    }
    return [Finding(rules[e.kind], e.client_id, {"event_seq": e.seq, "actor": e.actor}) for e in events]


def _login_spread_findings(now: datetime) -> list[Finding]:
    """Guessing at one account from many addresses: slow enough, or spread enough, that no (account,
    address) pair reaches the lockout's limit. Reported once an hour per account, with the counts as
    they stood then; the subject is the user name as typed (the account may not exist)."""
    failed = AuditEvent.objects.filter(
        kind="login.failed", occurred_at__gt=now - LOGIN_SPREAD_WINDOW, occurred_at__lte=now
    )
    rows = (
        failed.values("actor")
        .annotate(n=Count("id"), ips=Count("ip", distinct=True))
        .filter(n__gte=LOGIN_SPREAD_FAILURES, ips__gte=LOGIN_SPREAD_ADDRESSES)
    )
    return [
        Finding(
            "login_spread",
            "",
            {"account": r["actor"], "failures": r["n"], "addresses": r["ips"]},
            subject=r["actor"],
            window=LOGIN_SPREAD_WINDOW,
        )
        for r in rows
    ]


def anomalies_detect(*, now: datetime | None = None) -> list[Finding]:
    """Run every rule over its window before ``now`` (the last minute; the last hour for sign-ins); record
    and hand on each new finding."""
    now = now or timezone.now()
    fresh = []
    for finding in (
        _rate_findings(now)
        + _denial_findings(now)
        + _token_ip_findings(now)
        + _event_findings(now)
        + _login_spread_findings(now)
    ):
        key = f"{finding.rule}:{finding.client_id}:{finding.subject or sorted(finding.evidence.items())}"
        if AuditEvent.objects.filter(
            kind="anomaly.detected", data__key=key, occurred_at__gt=now - finding.window
        ).exists():
            continue  # already recorded in this window
        audit_record(
            kind="anomaly.detected",
            outcome="denied",
            actor="system",
            client_id=finding.client_id,
            data={
                "rule": finding.rule,
                "evidence": finding.evidence,
                "key": key,
                "window_start": (now - finding.window).isoformat(),
            },
            occurred_at=now,
        )
        fresh.append(finding)
        for handler in list(_handlers):
            handler(finding)
    return fresh
