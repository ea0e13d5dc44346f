"""Each anomaly rule fires on its pattern, and not on normal traffic; records stored late are examined;
a finding about one user of a shared client quarantines that user there, not the client."""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timedelta
from itertools import count
from types import SimpleNamespace
from typing import Any

import pytest
from django.db import connection, transaction
from django.utils import timezone

from audit import anomaly
from audit.anomaly import anomalies_detect
from audit.models import AuditEvent, UsageRecord
from audit.services import audit_record

pytestmark = pytest.mark.django_db
# The last second of a minute: the rules count whole minutes of occurred_at, and a test's "last minute"
# (up to 59 s ago) is this one.
NOW = timezone.now().replace(second=0, microsecond=0) - timedelta(seconds=1)
_ids = count()


def usage(
    client: str,
    *,
    ago_s: float,
    status: int = 200,
    ip: str = "198.51.100.1",
    tokens: int = 10,
    token_id: str = "jti-1",
    user: str = "",
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
        user=user,
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


def test_a_finding_about_a_clients_own_token_quarantines_the_client_whose_policy_says_so(
    django_capture_on_commit_callbacks: Any,
):
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


@pytest.fixture
def shared(django_user_model: Any) -> Any:
    """A public device-flow client with quarantine on, used by alice and bob; alice also uses another."""
    from authserver.models import AccessToken, RefreshToken
    from authserver.services import client_register
    from gateway.services import policy_set

    def issue(user: Any, client: Any) -> Any:
        access = AccessToken.objects.create(
            user=user,
            application=client,
            token_checksum=uuid.uuid4().hex * 2,
            jti=uuid.uuid4(),
            expires=timezone.now() + timedelta(minutes=5),
            scope="completions",
        )
        RefreshToken.objects.create(
            user=user,
            application=client,
            token=uuid.uuid4().hex,
            access_token=access,
            token_family=uuid.uuid4(),
        )
        return access

    client = client_register(name="cli", grant_types=["device-code"], public=True).client
    other = client_register(name="other", grant_types=["device-code"], public=True).client
    for each in (client, other):
        policy_set(client=each, actor="test", quarantine_on_anomaly=True)
    alice = django_user_model.objects.create_user("alice")
    bob = django_user_model.objects.create_user("bob")
    return SimpleNamespace(
        client=client,
        alice=alice,
        bob=bob,
        alices=issue(alice, client),
        bobs=issue(bob, client),
        alices_elsewhere=issue(alice, other),
    )


def alice_goes_wrong(rule: str, world: Any) -> None:
    """What one user of a public client can do alone to raise each finding about the client."""
    cid, jti, user = world.client.client_id, str(world.alices.jti), str(world.alice.pk)
    family = str(world.alices.refresh_token.token_family)
    for i in range(5):  # bob goes about his business meanwhile
        usage(cid, ago_s=i, token_id=str(world.bobs.jti), user=str(world.bob.pk))
    if rule == "token_many_ips":  # her own token from three addresses
        for i, ip in enumerate(["198.51.100.1", "198.51.100.2", "203.0.113.3"]):
            usage(cid, ago_s=i, ip=ip, token_id=jti, user=user)
    elif rule in ("denial_burst", "request_rate"):  # twenty of her own 429s; sixty quick requests
        status, times = (429, 20) if rule == "denial_burst" else (200, 60)
        for i in range(times):
            usage(cid, ago_s=i * 0.5, status=status, token_id=jti, user=user)
    else:  # replaying her own rotated refresh token; someone replaying her used code
        kind = "token.refresh_reuse" if rule == "refresh_reuse" else "code.replayed"
        audit_record(
            kind=kind,
            outcome="denied",
            actor=f"client:{cid}",
            client_id=cid,
            data={"token_family": family},
            occurred_at=NOW - timedelta(seconds=10),
        )


@pytest.mark.parametrize(
    "rule", ["token_many_ips", "denial_burst", "request_rate", "refresh_reuse", "code_replay"]
)
def test_a_finding_about_one_user_of_a_shared_client_quarantines_only_that_user_there(
    rule: str, shared: Any, django_capture_on_commit_callbacks: Any
):
    from authserver.models import AccessToken, Client, RefreshToken
    from authserver.revocation import local_revocations

    alice_goes_wrong(rule, shared)
    with django_capture_on_commit_callbacks(execute=True):
        assert [f.rule for f in anomalies_detect(now=NOW)] == [rule]
    assert not Client.objects.get(pk=shared.client.pk).disabled  # bob and everyone else carry on
    assert not AuditEvent.objects.filter(kind="client.disabled").exists()
    assert set(AccessToken.objects.values_list("pk", flat=True)) == {
        shared.bobs.pk,
        shared.alices_elsewhere.pk,
    }
    assert list(RefreshToken.objects.filter(revoked__isnull=False).values_list("user", "application")) == [
        (shared.alice.pk, shared.client.pk)
    ]
    assert local_revocations.is_revoked(str(shared.alices.jti), "-")  # pushed to the gateways
    assert not local_revocations.is_revoked(str(shared.bobs.jti), shared.client.client_id)
    revoked = AuditEvent.objects.get(kind="token.revoked")
    assert (revoked.actor, revoked.client_id) == (f"system:anomaly:{rule}", shared.client.client_id)
    assert revoked.data["user"] == "alice"
    assert revoked.data["tokens_revoked"] >= 1
    assert revoked.data["reason"].startswith(f"anomaly quarantine: {rule}:{shared.client.client_id}:")


def test_a_replayed_code_without_a_token_family_quarantines_the_user_it_was_issued_for(
    shared: Any, django_capture_on_commit_callbacks: Any
):
    from authserver.models import AccessToken, Client

    cid = shared.client.client_id
    audit_record(  # as authserver's validator records it: a code issued without offline_access
        kind="code.replayed",
        outcome="denied",
        actor=f"client:{cid}",
        client_id=cid,
        data={"tokens_revoked": 1, "token_family": "", "user": str(shared.alice.pk)},
        occurred_at=NOW - timedelta(seconds=10),
    )
    with django_capture_on_commit_callbacks(execute=True):
        assert [f.user for f in anomalies_detect(now=NOW)] == [str(shared.alice.pk)]
    assert not Client.objects.get(pk=shared.client.pk).disabled
    assert set(AccessToken.objects.values_list("pk", flat=True)) == {
        shared.bobs.pk,
        shared.alices_elsewhere.pk,
    }


@pytest.mark.parametrize("case", ["code replay naming no token family", "denials spread over two users"])
def test_a_finding_no_one_user_accounts_for_disables_the_client(
    case: str, shared: Any, django_capture_on_commit_callbacks: Any
):
    from authserver.models import AccessToken, Client

    cid = shared.client.client_id
    if case.startswith("code"):  # a code issued without offline_access: no family names its user
        audit_record(
            kind="code.replayed",
            outcome="denied",
            actor=f"client:{cid}",
            client_id=cid,
            data={"token_family": ""},
            occurred_at=NOW - timedelta(seconds=10),
        )
    else:
        for i in range(20):
            user = shared.alice if i % 2 else shared.bob
            usage(cid, ago_s=i, status=403, ip="203.0.113.7", user=str(user.pk))
    with django_capture_on_commit_callbacks(execute=True):
        anomalies_detect(now=NOW)
    assert Client.objects.get(pk=shared.client.pk).disabled
    assert list(AccessToken.objects.all()) == [shared.alices_elsewhere]
    assert AuditEvent.objects.filter(kind="client.disabled", client_id=cid).count() == 1


def test_a_record_stored_after_its_minute_was_examined_is_examined():
    for i, ip in enumerate(["198.51.100.1", "198.51.100.2"]):
        usage("late", ago_s=20 + i, ip=ip, token_id="jti-late")
    assert rules() == []  # two addresses so far
    usage("late", ago_s=25, ip="203.0.113.3", token_id="jti-late")  # the ingest was behind
    assert [f.rule for f in anomalies_detect(now=NOW + timedelta(minutes=2))] == ["token_many_ips"]
    event = AuditEvent.objects.get(kind="anomaly.detected")
    assert event.data["window_start"] == (NOW - timedelta(seconds=59)).isoformat()
    assert event.data["evidence"] == {"token_id": "jti-late", "addresses": 3}


def test_a_flood_stored_long_after_it_happened_is_flagged_in_its_own_minute():
    assert rules() == []  # a run before the flood reaches the database
    for i in range(25):  # half an hour ago, stored only now: the stream was behind, or PostgreSQL down
        usage("flooder", ago_s=30 * 60 + i, status=429, ip="203.0.113.9", token_id="")
    assert [f.rule for f in anomalies_detect(now=NOW + timedelta(minutes=1))] == ["denial_burst"]
    event = AuditEvent.objects.get(kind="anomaly.detected")
    assert event.data["window_start"] == (NOW - timedelta(minutes=30, seconds=59)).isoformat()
    assert event.data["evidence"] == {"denials": 25, "ip": "203.0.113.9"}


def test_a_minute_examined_again_is_recorded_once():
    calls: list[str] = []
    anomaly.anomaly_handler_register(handler := lambda finding: calls.append(finding.rule))
    try:
        for i in range(20):
            usage("noisy", ago_s=i, status=403, ip="203.0.113.9", token_id="")
        assert rules() == ["denial_burst"]
        for i in range(5):  # more of the same minute, stored late
            usage("noisy", ago_s=30 + i, status=403, ip="203.0.113.9", token_id="")
        assert anomalies_detect(now=NOW + timedelta(minutes=3)) == []
    finally:
        anomaly._handlers.remove(handler)
    assert calls == ["denial_burst"]
    assert AuditEvent.objects.filter(kind="anomaly.detected").count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_usage_record_committed_after_a_later_one_is_not_skipped(monkeypatch: pytest.MonkeyPatch):
    """Two ingest runs at once commit out of id order: the mark must not pass a row still in flight."""
    if connection.vendor != "postgresql":
        pytest.skip("SQLite has one writer at a time")
    monkeypatch.setattr(anomaly, "LOCK_TIMEOUT", "200ms")
    assert rules() == []
    inserted, release = threading.Event(), threading.Event()

    def ingest_in_flight() -> None:
        try:
            with transaction.atomic():
                usage("racy", ago_s=5, ip="203.0.113.3", token_id="jti-racy")  # the lower id, not committed
                inserted.set()
                release.wait(10)
        finally:
            connection.close()

    worker = threading.Thread(target=ingest_in_flight)
    worker.start()
    try:
        assert inserted.wait(10)
        for i, ip in enumerate(["198.51.100.1", "198.51.100.2"]):  # higher ids, committed first
            usage("racy", ago_s=3 + i, ip=ip, token_id="jti-racy")
        assert rules() == []  # two addresses are visible; the third is in flight
    finally:
        release.set()
        worker.join()
    assert [f.rule for f in anomalies_detect(now=NOW + timedelta(minutes=1))] == ["token_many_ips"]


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


def test_failed_sign_ins_stored_hours_late_are_examined_in_their_own_hour():
    failed_sign_ins("bob", ["198.51.100.1"], 1, before=NOW)
    assert rules() == []  # a run before the spool replays
    addresses = [f"203.0.113.{n}" for n in range(1, 6)]
    failed_sign_ins("admin", addresses, 4, before=NOW - timedelta(hours=3))  # PostgreSQL was down
    assert [f.rule for f in anomalies_detect(now=NOW + timedelta(minutes=1))] == ["login_spread"]
    event = AuditEvent.objects.get(kind="anomaly.detected")
    assert event.data["evidence"] == {"account": "user:admin", "failures": 20, "addresses": 5}
