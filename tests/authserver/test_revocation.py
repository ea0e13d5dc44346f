"""The database's record of revocations: what a gateway process that starts later (or a Redis restarted
empty) learns them from, since the pushes reach only the processes running at the time."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from audit.models import AuditEvent
from authserver.models import AccessToken, RevokedAccessToken
from authserver.revocation import local_revocations
from authserver.selectors import revocations_live
from authserver.services import (
    client_disable,
    client_enable,
    consent_withdraw,
    revoked_access_tokens_prune,
    tokens_revoke_for_user,
    user_lock,
)
from authserver.services import tokens as tokens_service
from authserver.tokens import jwt_unverified_claims
from tests.conftest import basic_auth

pytestmark = pytest.mark.django_db


def test_a_token_revoked_at_the_revocation_endpoint_is_recorded_until_no_gateway_would_take_it(
    oauth, make_client
):
    reg = make_client()
    token = oauth.client_credentials(reg).json()["access_token"]
    claims = jwt_unverified_claims(token)
    auth = basic_auth(reg.client.client_id, reg.client_secret)
    assert oauth.http.post("/oauth/revoke/", {"token": token}, HTTP_AUTHORIZATION=auth).status_code == 200
    assert not AccessToken.objects.exists()  # DOT deletes the row: the record is all that says it
    record = RevokedAccessToken.objects.get()
    assert str(record.jti) == claims["jti"]
    assert abs(record.expires.timestamp() - claims["exp"]) <= 1
    ((jti, exp),) = revocations_live().jtis
    assert (jti, exp) == (claims["jti"], int(record.expires.timestamp()))
    assert revoked_access_tokens_prune(now=record.expires + timedelta(seconds=59)) == 0  # in the leeway
    assert revoked_access_tokens_prune(now=record.expires + timedelta(seconds=61)) == 1
    assert revocations_live().jtis == ()


def test_a_locked_users_tokens_are_recorded_and_an_expired_token_deleted_is_not(make_client, alice):
    reg = make_client()
    live, expired = uuid.uuid4(), uuid.uuid4()
    for jti, expires in ((live, timedelta(minutes=5)), (expired, -timedelta(minutes=5))):
        AccessToken.objects.create(
            user=alice, application=reg.client, token=str(jti), jti=jti, expires=timezone.now() + expires
        )
    user_lock(user=alice, actor="user:root")
    assert list(RevokedAccessToken.objects.values_list("jti", flat=True)) == [live]
    revoked = AuditEvent.objects.get(kind="token.revoked")  # one revocation, said to be the locking admin's
    assert (revoked.actor, revoked.data["reason"]) == ("user:root", "user locked")


def test_a_user_deactivated_past_the_services_has_their_tokens_revoked_too(make_client, alice):
    # the Django admin's checkbox (a full save) revoked nothing: their tokens worked until they expired
    bob = type(alice).objects.create_user("bob", "bob@example.com", "another horse battery")
    reg = make_client()
    for user in (alice, bob):
        AccessToken.objects.create(
            user=user,
            application=reg.client,
            token=uuid.uuid4().hex,
            jti=uuid.uuid4(),
            expires=timezone.now() + timedelta(minutes=5),
        )
    alice.first_name = "Alice"
    alice.save()  # saved while active: nothing revoked
    assert AccessToken.objects.filter(user=alice).exists()
    alice.is_active = False
    alice.save()
    assert not AccessToken.objects.filter(user=alice).exists()
    assert AccessToken.objects.filter(user=bob).exists()
    assert RevokedAccessToken.objects.count() == 1
    revoked = AuditEvent.objects.get(kind="token.revoked")
    assert (revoked.actor, revoked.data["reason"]) == ("system", "user deactivated")
    alice.save()  # saved again while inactive: no second revocation
    assert AuditEvent.objects.filter(kind="token.revoked").count() == 1


def test_the_record_names_the_disabled_clients_until_they_are_enabled_again(make_client):
    reg, other = make_client(), make_client(name="Other")
    client_disable(client=reg.client, actor="user:root")
    assert revocations_live().clients == {reg.client.client_id}
    client_enable(client=reg.client, actor="user:root")
    assert revocations_live().clients == frozenset()
    assert other.client.client_id not in revocations_live().clients


def test_read_from_a_mark_the_record_holds_only_what_was_revoked_since_and_names_the_newest(make_client):
    exp = timezone.now() + timedelta(minutes=5)
    old, new = uuid.uuid4(), uuid.uuid4()
    RevokedAccessToken.objects.create(jti=old, expires=exp)
    RevokedAccessToken.objects.filter(jti=old).update(revoked_at=timezone.now() - timedelta(minutes=5))
    RevokedAccessToken.objects.create(jti=new, expires=exp)
    newest = RevokedAccessToken.objects.get(jti=new).revoked_at
    everything = revocations_live()
    assert {jti for jti, _ in everything.jtis} == {str(old), str(new)}
    assert everything.revoked_through == newest
    since = revocations_live(since=newest - timedelta(minutes=1))
    assert [jti for jti, _ in since.jtis] == [str(new)]
    assert since.revoked_through == newest
    assert revocations_live(since=newest + timedelta(seconds=1)).revoked_through is None


MASS_REVOCATIONS = {
    "client disabled": lambda client, user: client_disable(client=client, actor="user:root"),
    "consent withdrawn": lambda client, user: consent_withdraw(user=user, client=client),
    "user's tokens revoked": lambda client, user: tokens_revoke_for_user(
        user=user, actor="user:root", reason="x"
    ),
}


@pytest.mark.parametrize("revocation", MASS_REVOCATIONS)
def test_a_mass_revocation_records_its_tokens_in_one_insert_and_pushes_them_once(
    make_client, alice, django_capture_on_commit_callbacks, revocation
):
    reg = make_client()
    for _ in range(5):
        jti = uuid.uuid4()
        AccessToken.objects.create(
            user=alice, application=reg.client, token=str(jti), jti=jti, expires=timezone.now() + timedelta(5)
        )
    pushes: list[dict[str, object]] = []
    local_revocations.listeners.append(pushes.append)
    try:
        with CaptureQueriesContext(connection) as queries, django_capture_on_commit_callbacks(execute=True):
            MASS_REVOCATIONS[revocation](reg.client, alice)
    finally:
        local_revocations.listeners.remove(pushes.append)
    table = RevokedAccessToken._meta.db_table
    inserts = [q for q in queries if q["sql"].startswith("INSERT") and table in q["sql"]]
    assert len(inserts) == 1
    assert RevokedAccessToken.objects.count() == 5
    assert [len(p["jtis"]) for p in pushes if p["jtis"]] == [5]  # type: ignore[arg-type]


@pytest.mark.django_db(transaction=True)
def test_a_deletion_rolled_back_inside_a_batch_is_neither_recorded_nor_pushed(make_client, monkeypatch):
    client = make_client().client
    token = AccessToken.objects.create(
        application=client,
        token="t" * 40,
        expires=timezone.now() + timedelta(hours=1),
        scope="s",
        jti=uuid.uuid4(),
    )
    pushed: list[Any] = []
    monkeypatch.setattr(tokens_service, "revocation_publish", lambda **kw: pushed.append(kw))
    with transaction.atomic(), tokens_service.access_token_deletions_batched():
        try:
            with (
                transaction.atomic(),
                tokens_service.access_token_deletions_batched(),
            ):  # a savepoint that fails
                AccessToken.objects.filter(pk=token.pk).delete()
                raise ValueError
        except ValueError:
            pass
    assert AccessToken.objects.filter(pk=token.pk).exists()  # its deletion was rolled back
    assert not RevokedAccessToken.objects.filter(jti=token.jti).exists()
    assert all(str(token.jti) not in str(push) for push in pushed)
    AccessToken.objects.filter(pk=token.pk).delete()  # and the same deletion, kept, is recorded
    assert RevokedAccessToken.objects.filter(jti=token.jti).exists()
