"""The administration services the console and the admin API share (appended to authserver.services) and
the read selectors behind the pages: every write is audited with its actor and holds no secret."""

from __future__ import annotations

from datetime import timedelta

import pytest
from axes.models import AccessAttempt
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from audit.models import AuditEvent, UsageRecord
from audit.selectors import audit_events_filter, security_events_latest, usage_series
from authserver.models import AccessToken, Client, RefreshToken
from authserver.selectors import access_tokens_active, clients_search, connected_apps_for_user
from authserver.services import (
    access_token_revoke,
    client_create,
    client_secret_rotate,
    client_update,
    tokens_revoke_for_user,
    user_lock,
    user_unlock,
)
from gateway.models import ClientPolicy
from gateway.services import policy_set
from tests.console.conftest import issue_token

pytestmark = pytest.mark.django_db

ADMIN = "user:root"


def events(kind: str) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(kind=kind).order_by("id"))


def test_client_create_marks_an_administrative_client_and_audits_it():
    registered = client_create(
        name="Ops",
        grant_types=["client-credentials"],
        scopes=["admin.read"],
        is_admin_client=True,
        actor=ADMIN,
    )
    assert registered.client.is_admin_client
    assert registered.client.scope_list() == ["admin.read"]
    assert [e.actor for e in events("client.created")] == [ADMIN]
    assert events("client.changed")[0].data == {"changed": ["is_admin_client"]}
    assert str(registered.client_secret) not in str([e.data for e in AuditEvent.objects.all()])


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"scopes": ["admin.write"]}, "scopes", "admin scopes are only for clients marked administrative"),
        ({"scopes": ["root.everything"]}, "scopes", "unknown scopes: root.everything"),
        ({"grant_types": []}, "grant_types", "choose at least one grant type"),
    ],
)
def test_client_create_refuses_what_a_client_may_not_be_and_creates_nothing(fields, field, message):
    arguments = {"name": "Bad", "grant_types": ["client-credentials"], "scopes": ["models.read"], **fields}
    with pytest.raises(ValidationError) as caught:
        client_create(actor=ADMIN, **arguments)
    assert message in caught.value.message_dict[field]
    assert not Client.objects.exists()
    assert not AuditEvent.objects.exists()


def test_client_update_changes_only_what_differs_and_validates_like_a_new_client(world):
    client = world.app.client
    client_update(client=client, actor=ADMIN, name="Acme reports", description="Nightly")
    assert events("client.changed")[0].data == {"changed": ["description"]}
    with pytest.raises(ValidationError) as caught:
        client_update(client=client, actor=ADMIN, redirect_uris="http://example.com/cb")
    assert "redirect_uris" in caught.value.message_dict
    with pytest.raises(ValidationError):
        client_update(client=client, actor=ADMIN, client_secret="x")
    client.refresh_from_db()
    assert client.redirect_uris == "https://acme.example.com/cb"
    assert len(events("client.changed")) == 1


def test_an_admin_client_cannot_keep_admin_scopes_once_it_is_no_longer_administrative(world):
    client = world.app.client
    client_update(client=client, actor=ADMIN, is_admin_client=True, allowed_scopes="models.read admin.read")
    with pytest.raises(ValidationError):
        client_update(client=client, actor=ADMIN, is_admin_client=False)
    client.refresh_from_db()
    assert client.is_admin_client


def test_a_public_client_has_no_secret_to_rotate():
    public = client_create(
        name="Native", grant_types=["authorization-code"], public=True, redirect_uris=["http://127.0.0.1/cb"],
        scopes=["models.read"], actor=ADMIN,
    )  # fmt: skip
    with pytest.raises(ValidationError):
        client_secret_rotate(client=public.client, actor=ADMIN)
    assert not events("client.secret_rotated")


def test_revoking_one_token_also_revokes_the_refresh_token_issued_with_it(world, member):
    refresh = RefreshToken.objects.create(
        user=member, application=world.app.client, token="r1", access_token=world.token
    )
    other = issue_token(world.app)
    access_token_revoke(token=world.token, actor=ADMIN)
    refresh.refresh_from_db()
    assert refresh.revoked is not None
    assert list(access_tokens_active(client=world.app.client)) == [other]
    event = events("token.revoked")[-1]
    assert (event.actor, event.client_id, event.data["jti"]) == (
        ADMIN,
        world.app.client.client_id,
        str(world.token.jti),
    )


def test_revoking_a_users_tokens_touches_no_one_else(world, member, staff_user):
    AccessToken.objects.filter(pk=world.token.pk).update(user=member)
    mine = issue_token(world.app)
    AccessToken.objects.filter(pk=mine.pk).update(user=staff_user)
    assert tokens_revoke_for_user(user=member, actor=ADMIN, reason="test") == 1
    assert list(AccessToken.objects.all()) == [mine]


def test_locking_and_unlocking_a_user_is_audited_and_unlocking_clears_failed_sign_ins(member):
    AccessAttempt.objects.create(username="mallory", ip_address="10.0.0.1", failures_since_start=9)
    user_lock(user=member, actor=ADMIN)
    member.refresh_from_db()
    assert not member.is_active
    user_unlock(user=member, actor=ADMIN)
    member.refresh_from_db()
    assert member.is_active
    assert not AccessAttempt.objects.filter(username="mallory").exists()
    assert [
        (e.kind, e.actor) for e in AuditEvent.objects.filter(kind__startswith="user.").order_by("id")
    ] == [
        ("user.created", "system"),  # the fixture's
        ("user.locked", ADMIN),
        ("user.unlocked", ADMIN),
    ]


def test_connected_apps_join_consents_and_live_tokens_and_describe_scopes_in_plain_words(world, member):
    AccessToken.objects.filter(pk=world.token.pk).update(user=member)
    (app,) = connected_apps_for_user(user=member)
    assert app.client == world.app.client
    assert ("models.read", "See which models you can use") in app.scopes
    assert ("completions", "Generate text and chat completions") in app.scopes  # from the token
    assert app.live_tokens == 1
    AccessToken.objects.update(expires=timezone.now() - timedelta(seconds=1))
    assert connected_apps_for_user(user=member)[0].live_tokens == 0


def test_client_search_counts_only_live_tokens(world):
    assert clients_search(query="acme").get().live_tokens == 1
    AccessToken.objects.update(expires=timezone.now() - timedelta(seconds=1))
    assert clients_search(query="ACME").get().live_tokens == 0
    assert not clients_search(query="zzz").exists()


def test_usage_series_fills_empty_periods_and_counts_refusals(world):
    now = timezone.now().replace(second=30, microsecond=0)
    UsageRecord.objects.create(
        request_id="s1", occurred_at=now - timedelta(minutes=2), client_id="c9", endpoint="chat", status=403
    )
    series = usage_series(client_id="c9", since=now - timedelta(minutes=5), until=now, unit="minute")
    assert len(series) == 6
    assert [b.requests for b in series] == [0, 0, 0, 1, 0, 0]
    assert series[3].errors == 1


def test_audit_filters_combine_and_security_events_include_denials_and_anomalies(world):
    from audit.services import audit_record

    audit_record(kind="gateway.denied", outcome="denied", actor="client:x", client_id="x")
    audit_record(kind="anomaly.detected", actor="system")
    kinds = [e.kind for e in security_events_latest(limit=10)]
    assert kinds[:2] == ["anomaly.detected", "gateway.denied"]
    assert "token.issued" not in kinds
    assert [e.kind for e in audit_events_filter(client_id="x", outcome="denied")] == ["gateway.denied"]
    assert not audit_events_filter(since=timezone.now() + timedelta(minutes=1)).exists()


@pytest.mark.parametrize(
    "model", ["a\nb", "bell\u0007", "del\u007f", "c1\u0085", "rtl\u202emodel", "zw\u200b"]
)
def test_policy_set_refuses_a_model_id_with_a_control_or_format_character(world, model):
    with pytest.raises(ValidationError) as caught:
        policy_set(client=world.app.client, actor=ADMIN, allowed_models=["m1", model])
    [message] = caught.value.message_dict["allowed_models"]
    assert repr(model) in message
    assert not ClientPolicy.objects.exists()
    assert not events("policy.changed")


def test_policy_set_takes_any_other_model_id_of_up_to_200_characters(world):
    models = ["My Model, v2", "org/m:q4", "é" * 200, "模型"]
    assert policy_set(client=None, actor=ADMIN, allowed_models=models).allowed_models == models
    with pytest.raises(ValidationError):
        policy_set(client=None, actor=ADMIN, allowed_models=["x" * 201])


def test_setpolicy_fails_with_a_message_for_a_model_id_with_a_control_character(world):
    with pytest.raises(CommandError, match=r"allowed_models: .*'bell\\x07'"):
        call_command("setpolicy", world.app.client.client_id, "--models", "m1,bell\u0007")
    assert not ClientPolicy.objects.exists()


@pytest.mark.parametrize(
    "uri", ["https://a.example/cb https://evil.example/cb", "https://a.example/\u00a0cb"]
)
def test_registering_a_client_refuses_a_redirect_uri_holding_whitespace(uri):
    # client_register joins the list with spaces, and the model splits on whitespace: one became two
    with pytest.raises(ValidationError) as caught:
        client_create(
            name="Split", grant_types=["authorization-code"], redirect_uris=[uri], scopes=["models.read"],
            actor=ADMIN,
        )  # fmt: skip
    assert caught.value.message_dict["redirect_uris"] == [
        f"{uri!r}: a redirect URI holds no whitespace; give each URI as its own item"
    ]
    with pytest.raises(CommandError, match="redirect_uris: .*no whitespace"):
        call_command(
            "createclient", "--name", "Split", "--grant", "authorization-code", "--redirect-uri", uri
        )
    assert not Client.objects.exists()


def test_a_client_cannot_register_the_same_redirect_uri_twice(world):
    uri = "https://acme.example.com/cb"
    with pytest.raises(ValidationError) as caught:
        client_update(client=world.app.client, actor=ADMIN, redirect_uris=f"{uri} {uri}")
    assert caught.value.message_dict["redirect_uris"] == [f"{uri}: listed twice"]
