"""RFC 7662 introspection answers, and what discovery says ID tokens and userinfo hold."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone

from audit.models import AuditEvent
from authserver.models import AccessToken, Client
from authserver.tokens import access_token_introspection, jwt_unverified_claims
from tests.conftest import basic_auth, pkce_pair

pytestmark = pytest.mark.django_db

CLAIMS = ("iss", "sub", "aud", "client_id", "scope", "jti", "iat", "exp")


@pytest.fixture
def introspect(oauth, make_client):
    introspector = make_client(can_introspect=True, name="Introspector")
    auth = basic_auth(introspector.client.client_id, introspector.client_secret)

    def answer(token: str, **extra: str) -> dict:
        response = oauth.http.post("/oauth/introspect/", {"token": token, **extra}, HTTP_AUTHORIZATION=auth)
        assert response.status_code == 200, response.content
        assert response["Cache-Control"] == "no-store"
        return dict(response.json())

    return answer


def _user_tokens(oauth, make_client, user, scope: str = "openid models.read offline_access") -> tuple:
    reg = make_client(grants=("authorization-code",), scopes="openid profile models.read offline_access")
    oauth.http.force_login(user)
    response = oauth.code_tokens(reg, scope)
    assert response.status_code == 200, response.content
    return reg, response.json()


def test_a_users_access_token_is_described_as_the_jwt_says_with_its_subject_and_audience(
    oauth, make_client, alice, introspect, settings
):
    reg, tokens = _user_tokens(oauth, make_client, alice)
    claims = jwt_unverified_claims(tokens["access_token"])
    answer = introspect(tokens["access_token"])
    assert answer == {
        "active": True,
        "token_type": "Bearer",
        **{name: claims[name] for name in CLAIMS},
        "username": "alice",
    }
    # the subject every other answer gives for this user: the token's, the ID token's and userinfo's
    assert answer["sub"] == str(alice.pk) == jwt_unverified_claims(tokens["id_token"])["sub"]
    userinfo = oauth.http.get("/oauth/userinfo/", HTTP_AUTHORIZATION="Bearer " + tokens["access_token"])
    assert userinfo.json()["sub"] == answer["sub"]
    assert answer["aud"] == settings.PORTCULLIS_AUDIENCE  # with no resource named in any request
    assert answer["iss"] == settings.PORTCULLIS_ISSUER
    assert answer["client_id"] == reg.client.client_id
    assert answer["exp"] - answer["iat"] == 300


def test_a_clients_own_token_has_the_client_as_its_subject_and_no_user_name(oauth, make_client, introspect):
    reg = make_client()
    token = oauth.client_credentials(reg).json()["access_token"]
    answer = introspect(token)
    assert answer["active"] is True
    assert answer["sub"] == reg.client.client_id == jwt_unverified_claims(token)["sub"]
    assert "username" not in answer
    assert {name: answer[name] for name in CLAIMS} == {
        name: jwt_unverified_claims(token)[name] for name in CLAIMS
    }


@pytest.mark.parametrize("hint", [None, "refresh_token", "access_token"])
def test_a_refresh_token_live_or_revoked_and_an_id_token_are_answered_inactive_and_nothing_more(
    oauth, make_client, alice, introspect, hint
):
    reg, tokens = _user_tokens(oauth, make_client, alice)
    extra = {"token_type_hint": hint} if hint else {}
    assert introspect(tokens["refresh_token"], **extra) == {"active": False}
    assert introspect(tokens["id_token"], **extra) == {"active": False}
    oauth.http.post(
        "/oauth/revoke/",
        {"token": tokens["refresh_token"]},
        HTTP_AUTHORIZATION=basic_auth(reg.client.client_id, reg.client_secret),
    )
    assert introspect(tokens["refresh_token"], **extra) == {"active": False}
    assert introspect(tokens["access_token"], **extra) == {"active": False}  # revoked with it


def test_an_access_token_is_inactive_once_its_row_or_its_own_exp_has_passed(oauth, make_client):
    token = oauth.client_credentials(make_client()).json()["access_token"]
    exp = jwt_unverified_claims(token)["exp"]
    now = timezone.now()
    assert access_token_introspection(token, now=now)["active"] is True
    row = AccessToken.objects.get(jti=jwt_unverified_claims(token)["jti"])
    assert access_token_introspection(token, now=row.expires + timedelta(seconds=1)) == {"active": False}
    # a row that outlives the token (DOT computes its expiry apart from the JWT's): the token's exp rules
    AccessToken.objects.filter(pk=row.pk).update(expires=now + timedelta(hours=1))
    past_exp = datetime.fromtimestamp(exp, tz=UTC) + timedelta(seconds=1)
    assert access_token_introspection(token, now=past_exp) == {"active": False}
    assert access_token_introspection(token, now=past_exp - timedelta(seconds=2))["active"] is True


def test_a_token_of_a_client_disabled_past_the_services_is_inactive(oauth, make_client, introspect):
    reg = make_client()
    token = oauth.client_credentials(reg).json()["access_token"]
    Client.objects.filter(pk=reg.client.pk).update(disabled=True)  # its rows left, as by a shell
    assert introspect(token) == {"active": False}


def test_an_introspection_by_a_client_not_allowed_stays_refused_and_audited(oauth, make_client):
    reg = make_client()
    token = oauth.client_credentials(reg).json()["access_token"]
    auth = basic_auth(reg.client.client_id, reg.client_secret)
    refused = oauth.http.post("/oauth/introspect/", {"token": token}, HTTP_AUTHORIZATION=auth)
    assert refused.status_code == 403
    assert "sub" not in refused.json()
    event = AuditEvent.objects.get(kind="introspect.denied")
    assert (event.client_id, event.data["error_code"]) == (reg.client.client_id, "unauthorized_client")


def test_discovery_lists_exactly_the_claims_id_tokens_and_userinfo_hold(oauth, make_client, alice):
    reg = make_client(grants=("authorization-code",), scopes="openid profile models.read")
    alice.first_name, alice.last_name = "Alice", "Liddell"
    alice.save()
    oauth.http.force_login(alice)
    verifier, challenge = pkce_pair()
    params = {
        "response_type": "code",
        "client_id": reg.client.client_id,
        "redirect_uri": "https://app.example.com/callback",
        "scope": "openid profile models.read",
        "state": "s",
        "nonce": "n-0S6_WzA2Mj",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    assert oauth.http.get("/oauth/authorize/", params).status_code == 200
    code = oauth.code_from(oauth.http.post("/oauth/authorize/", {**params, "allow": "Allow"}))
    tokens = oauth.code_exchange(reg, code, verifier).json()
    userinfo = oauth.http.get("/oauth/userinfo/", HTTP_AUTHORIZATION="Bearer " + tokens["access_token"])
    held = set(jwt_unverified_claims(tokens["id_token"])) | set(userinfo.json())
    listed = json.loads(oauth.http.get("/.well-known/openid-configuration").content)["claims_supported"]
    assert listed == sorted(held)
