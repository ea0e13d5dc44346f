"""Each anomaly rule fires on its pattern, and not on normal traffic."""

from __future__ import annotations

from datetime import datetime, timedelta
from itertools import count
from typing import Any

import pytest
from django.utils import timezone

from audit.anomaly import anomalies_detect
from audit.models import AuditEvent, UsageRecord
from audit.services import audit_record

pytestmark = pytest.mark.django_db
NOW = timezone.now().replace(microsecond=0)
_ids = count()


def usage(
    client: str,
    *,
    ago_s: float,
    status: int = 200,
    ip: str = "198.51.100.1",
    tokens: int = 10,
    token_id: str = "jti-1",
) -> None:
    UsageRecord.objects.create(
        request_id=f"r{next(_ids)}",
        occurred_at=NOW - timedelta(seconds=ago_s),
        client_id=client,
        endpoint="chat",
        model="m1",
        status=status,
        prompt_tokens=tokens,
        completion_tokens=tokens,
        client_ip=ip,
        token_id=token_id,
    )


def steady(client: str, per_minute: int) -> None:
    """An hour of ordinary traffic before the last minute."""
    for minute in range(1, 61):
        for i in range(per_minute):
            usage(client, ago_s=60 * minute + 30 + i * 0.1)


def rules() -> list[str]:
    return sorted(f.rule for f in anomalies_detect(now=NOW))


def test_normal_traffic_raises_nothing():
    steady("calm", 20)
    for i in range(25):
        usage("calm", ago_s=i)
    usage("calm", ago_s=5, status=401)
    assert rules() == []
    assert not AuditEvent.objects.filter(kind="anomaly.detected").exists()


def test_a_request_rate_far_above_the_baseline_is_flagged_once():
    steady("spiky", 2)
    for i in range(120):
        usage("spiky", ago_s=i * 0.4)
    assert rules() == ["request_rate"]
    event = AuditEvent.objects.get(kind="anomaly.detected")
    assert event.client_id == "spiky"
    assert event.data["evidence"]["per_minute"] == 120
    assert rules() == []  # not recorded twice for the same window


def test_a_token_rate_far_above_the_baseline_is_flagged():
    steady("hungry", 1)
    for i in range(10):
        usage("hungry", ago_s=i, tokens=2_000)
    assert rules() == ["token_rate"]


def test_a_burst_of_denials_is_flagged():
    for i in range(25):
        usage("", ago_s=i, status=401, ip="203.0.113.9", token_id="")
    assert rules() == ["denial_burst"]
    assert AuditEvent.objects.get(kind="anomaly.detected").data["evidence"]["ip"] == "203.0.113.9"


def test_one_token_from_several_addresses_is_flagged():
    for i, ip in enumerate(["198.51.100.1", "198.51.100.2", "203.0.113.3"]):
        usage("shared", ago_s=i, ip=ip, token_id="jti-stolen")
    assert rules() == ["token_many_ips"]


@pytest.mark.parametrize(
    ("kind", "rule"), [("token.refresh_reuse", "refresh_reuse"), ("login.locked_out", "account_locked")]
)
def test_refresh_reuse_and_lockouts_are_flagged(kind: str, rule: str):
    audit_record(kind=kind, outcome="denied", client_id="c9", occurred_at=NOW - timedelta(seconds=10))
    assert rules() == [rule]


def test_a_finding_quarantines_a_client_whose_policy_says_so(django_capture_on_commit_callbacks: Any):
    from authserver.models import Client
    from authserver.services import client_register
    from gateway.services import policy_set

    guarded = client_register(name="guarded", grant_types=["client-credentials"]).client
    relaxed = client_register(name="relaxed", grant_types=["client-credentials"]).client
    policy_set(client=guarded, actor="test", quarantine_on_anomaly=True)
    policy_set(client=relaxed, actor="test", quarantine_on_anomaly=False)
    for client in (guarded, relaxed):
        for i, ip in enumerate(["198.51.100.1", "198.51.100.2", "203.0.113.3"]):
            usage(client.client_id, ago_s=i, ip=ip, token_id=f"jti-{client.pk}")
    with django_capture_on_commit_callbacks(execute=True):
        anomalies_detect(now=NOW)
    assert Client.objects.get(pk=guarded.pk).disabled
    assert not Client.objects.get(pk=relaxed.pk).disabled
    assert (
        AuditEvent.objects.filter(kind="client.disabled", actor="system:anomaly:token_many_ips").count() == 1
    )


def failed_sign_ins(account: str, addresses: list[str], per_address: int, *, before: datetime) -> None:
    for ip in addresses:
        for i in range(per_address):
            audit_record(
                kind="login.failed",
                outcome="failure",
                actor=f"user:{account}",
                ip=ip,
                occurred_at=before - timedelta(minutes=1 + i),
            )


def test_sign_ins_guessed_from_many_addresses_are_flagged_once_an_hour():
    addresses = [f"203.0.113.{n}" for n in range(1, 6)]
    failed_sign_ins("admin", addresses, 4, before=NOW)  # 20 failures, 5 addresses, none locked out
    assert rules() == ["login_spread"]
    event = AuditEvent.objects.get(kind="anomaly.detected")
    assert event.client_id == ""
    assert event.data["evidence"] == {"account": "user:admin", "failures": 20, "addresses": 5}

    later = NOW + timedelta(minutes=5)
    failed_sign_ins("admin", addresses, 1, before=later)
    assert anomalies_detect(now=later) == []  # the same account, within the hour: not again
    much_later = NOW + timedelta(minutes=70)
    failed_sign_ins("admin", addresses, 4, before=much_later)
    assert [f.rule for f in anomalies_detect(now=much_later)] == ["login_spread"]
    assert AuditEvent.objects.filter(kind="anomaly.detected").count() == 2


@pytest.mark.parametrize(
    ("addresses", "per_address", "hours_ago"),
    [
        (2, 15, 0),  # many failures from few addresses: the lockout's business
        (10, 1, 0),  # many addresses, too few failures
        (5, 4, 1),  # enough of both, but before the hour
    ],
)
def test_failed_sign_ins_short_of_a_spread_attack_are_not_flagged(
    addresses: int, per_address: int, hours_ago: int
):
    failed_sign_ins(
        "alice",
        [f"198.51.100.{n}" for n in range(1, addresses + 1)],
        per_address,
        before=NOW - timedelta(hours=hours_ago),
    )
    failed_sign_ins("bob", ["198.51.100.1", "198.51.100.2", "198.51.100.3"], 5, before=NOW)
    assert rules() == []
