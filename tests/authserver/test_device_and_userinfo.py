"""What a revocation leaves redeemable (codes and device codes), the device pages and polls, userinfo's
refusals, and the id_token_hint."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from django.core.cache import cache
from django.test import Client as HttpClient
from django.utils import timezone
from oauth2_provider.models import get_device_grant_model

from audit.models import AuditEvent
from authserver.models import AccessToken, Consent, Grant
from tests.conftest import REDIRECT_URI, OAuthDriver, RegisteredClient, basic_auth, pkce_pair

pytestmark = pytest.mark.django_db

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
FORM = "application/x-www-form-urlencoded"


@pytest.fixture
def device_app(make_client):
    return make_client(grants=("device-code",), public=True, scopes="models.read completions offline_access")


@pytest.fixture
def web_app(make_client):
    return make_client(grants=("authorization-code",), scopes="models.read offline_access openid profile")


@pytest.fixture
def bob(django_user_model):
    return django_user_model.objects.create_user("bob", "bob@example.com", "another horse battery")


def _device_start(http: HttpClient, reg: RegisteredClient, scope: str = "models.read", **extra: str) -> Any:
    body = {"client_id": reg.client.client_id, "scope": scope, **extra}
    started = http.post("/oauth/device-authorization/", urlencode(body), content_type=FORM)
    assert started.status_code == 200, started.content
    return started.json()


def _device_entered(http: HttpClient, user: Any, user_code: str) -> Any:
    http.force_login(user)
    return http.post("/oauth/device/", {"user_code": user_code})


def _device_approved(http: HttpClient, reg: RegisteredClient, user: Any, scope: str = "models.read") -> str:
    """Start a device flow and have ``user`` approve it; return its device code (not yet redeemed)."""
    started = _device_start(http, reg, scope)
    entered = _device_entered(http, user, started["user_code"])
    assert http.post(entered["Location"], {"action": "accept"}).status_code == 302
    http.logout()
    return str(started["device_code"])


def _poll(http: HttpClient, client_id: str, device_code: str, **extra: Any) -> Any:
    cache.clear()  # the poll pacing: these polls are minutes apart in the flows they stand for
    return http.post(
        "/oauth/token/",
        {"grant_type": DEVICE_GRANT, "device_code": device_code, "client_id": client_id},
        **extra,
    )


def _code(
    oauth: OAuthDriver, reg: RegisteredClient, user: Any, scope: str = "models.read"
) -> tuple[str, str]:
    """An authorization code ``user`` approved for ``reg``, not yet redeemed, and its verifier."""
    oauth.http.force_login(user)
    verifier, challenge = pkce_pair()
    return oauth.code_from(oauth.authorize(reg.client, challenge=challenge, scope=scope)), verifier


# ---------------------------------------------------------------- consent withdrawn, client disabled


def test_withdrawing_consent_voids_the_clients_approved_device_codes_and_unredeemed_codes(
    client, oauth, make_client, device_app, web_app, alice, bob
):
    from authserver.services import consent_withdraw

    device_code = _device_approved(client, device_app, alice)
    bobs_device_code = _device_approved(HttpClient(), device_app, bob)
    code, verifier = _code(oauth, web_app, alice)
    consent_withdraw(user=alice, client=device_app.client)
    consent_withdraw(user=alice, client=web_app.client)
    late = _poll(HttpClient(), device_app.client.client_id, device_code)
    assert (late.status_code, late.json()["error"]) == (400, "invalid_grant")
    exchanged = oauth.code_exchange(web_app, code, verifier)
    assert (exchanged.status_code, exchanged.json()["error"]) == (400, "invalid_grant")
    assert not AccessToken.objects.filter(user=alice).exists()
    assert AuditEvent.objects.filter(kind="consent.withdrawn", client_id=web_app.client.client_id).exists()
    assert AuditEvent.objects.filter(kind="token.denied", data__error_code="invalid_grant").count() == 2
    # bob's approval of the same client is his own
    assert _poll(HttpClient(), device_app.client.client_id, bobs_device_code).status_code == 200


def test_withdrawing_consent_for_one_client_leaves_the_users_codes_for_another(
    oauth, make_client, web_app, alice
):
    from authserver.services import consent_withdraw

    other = make_client(grants=("authorization-code",), scopes="models.read", name="Other app")
    code, verifier = _code(oauth, other, alice)
    _code(oauth, web_app, alice)
    consent_withdraw(user=alice, client=web_app.client)
    assert not Grant.objects.filter(application=web_app.client).exists()
    assert oauth.code_exchange(other, code, verifier).status_code == 200


def test_a_disabled_clients_device_codes_and_codes_stay_void_once_it_is_enabled_again(
    client, oauth, make_client, device_app, web_app, alice
):
    from authserver.services import client_disable, client_enable

    device_code = _device_approved(client, device_app, alice)
    code, verifier = _code(oauth, web_app, alice)
    for reg in (device_app, web_app):
        client_disable(client=reg.client, actor="user:admin")
        reg.client.refresh_from_db()
        client_enable(client=reg.client, actor="user:admin")
    late = _poll(HttpClient(), device_app.client.client_id, device_code)
    assert (late.status_code, late.json()["error"]) == (400, "invalid_grant")
    exchanged = oauth.code_exchange(web_app, code, verifier)
    assert (exchanged.status_code, exchanged.json()["error"]) == (400, "invalid_grant")
    assert not AccessToken.objects.exists()
    assert not AuditEvent.objects.filter(kind="token.issued").exists()


def test_an_unknown_or_disabled_client_is_refused_a_device_code_as_invalid_client(client, device_app):
    from authserver.services import client_disable

    client_disable(client=device_app.client, actor="user:admin")
    for client_id in (device_app.client.client_id, "no-such-client"):
        body = urlencode({"client_id": client_id, "scope": "models.read"})
        refused = client.post("/oauth/device-authorization/", body, content_type=FORM)
        assert (refused.status_code, refused.json()["error"]) == (401, "invalid_client"), refused.content
        assert refused["WWW-Authenticate"].startswith("Basic")
    assert AuditEvent.objects.filter(kind="device.denied", data__error_code="invalid_client").count() == 2


# ---------------------------------------------------------------- device polls: the client first


def test_a_device_poll_by_an_unknown_client_is_invalid_client_and_takes_no_pacing_slot(client, device_app):
    started = _device_start(client, device_app)
    cache.clear()
    stranger = client.post(
        "/oauth/token/",
        {"grant_type": DEVICE_GRANT, "device_code": started["device_code"], "client_id": "no-such-client"},
    )
    assert stranger.status_code == 401
    assert stranger.json()["error"] == "invalid_client"
    assert stranger["WWW-Authenticate"] == 'Basic realm="portcullis"'
    assert stranger["Cache-Control"] == "no-store"
    assert AuditEvent.objects.get(kind="token.denied").data["error_code"] == "invalid_client"
    # the real client's poll, straight after, is its first: not slow_down
    own = client.post(
        "/oauth/token/",
        {
            "grant_type": DEVICE_GRANT,
            "device_code": started["device_code"],
            "client_id": device_app.client.client_id,
        },
    )
    assert own.json()["error"] == "authorization_pending"


def test_a_pending_device_code_polled_by_another_client_is_invalid_grant_and_takes_no_pacing_slot(
    client, make_client, device_app
):
    started = _device_start(client, device_app)
    other = make_client(grants=("device-code",), public=True, name="Other app")
    cache.clear()
    poll = {"grant_type": DEVICE_GRANT, "device_code": started["device_code"]}
    stolen = client.post("/oauth/token/", {**poll, "client_id": other.client.client_id})
    assert (stolen.status_code, stolen.json()["error"]) == (400, "invalid_grant")
    assert AuditEvent.objects.get(kind="token.denied").client_id == other.client.client_id
    own = client.post("/oauth/token/", {**poll, "client_id": device_app.client.client_id})
    assert own.json()["error"] == "authorization_pending"


def test_a_confidential_device_client_polls_only_with_its_secret(client, make_client):
    reg = make_client(grants=("device-code",), scopes="models.read")
    cid = reg.client.client_id
    started = _device_start(client, reg, client_secret=str(reg.client_secret))
    pending = _poll(client, cid, started["device_code"])  # no secret: DOT answered authorization_pending
    assert (pending.status_code, pending.json()["error"]) == (401, "invalid_client")
    wrong = _poll(client, cid, started["device_code"], HTTP_AUTHORIZATION=basic_auth(cid, "wrong"))
    assert (wrong.status_code, wrong["WWW-Authenticate"]) == (401, 'Basic realm="portcullis"')
    right = _poll(client, cid, started["device_code"], HTTP_AUTHORIZATION=basic_auth(cid, reg.client_secret))
    assert right.json()["error"] == "authorization_pending"
    denied = AuditEvent.objects.filter(kind="token.denied").values_list("data__error_code", flat=True)
    assert list(denied) == ["invalid_client", "invalid_client"]


# ---------------------------------------------------------------- the device pages


@pytest.mark.parametrize("how", ["expired", "client disabled"])
def test_the_device_confirm_page_refuses_an_expired_code_or_a_disabled_client_and_records_no_consent(
    client, device_app, alice, how
):
    started = _device_start(client, device_app)
    entered = _device_entered(client, alice, started["user_code"])
    if how == "expired":
        get_device_grant_model().objects.update(expires=timezone.now() - timedelta(seconds=1))
    else:  # disabled by a path that revokes nothing (client_disable deletes the grant: the page is a 404)
        type(device_app.client).objects.filter(pk=device_app.client.pk).update(disabled=True)
    answer = client.post(entered["Location"], {"action": "accept"})
    assert answer.status_code == (410 if how == "expired" else 400)
    assert (b"has expired" if how == "expired" else b"has been disabled") in answer.content
    assert b'value="accept"' not in answer.content  # nothing left to approve
    assert not AuditEvent.objects.filter(kind="consent.granted").exists()
    assert not Consent.objects.exists()
    refused = AuditEvent.objects.get(kind="device.confirm_refused")
    assert (refused.actor, refused.outcome, refused.data) == ("user:alice", "denied", {"reason": how})
    model = get_device_grant_model()
    assert model.objects.get(device_code=started["device_code"]).status != model.AUTHORIZED


@pytest.mark.parametrize("how", ["expired", "client disabled"])
def test_the_device_confirm_page_says_so_before_anything_is_pressed(client, device_app, alice, how):
    # it offered Allow and Deny for an expired code, and refused only once one was pressed
    started = _device_start(client, device_app)
    entered = _device_entered(client, alice, started["user_code"])
    if how == "expired":
        get_device_grant_model().objects.update(expires=timezone.now() - timedelta(seconds=1))
    else:
        type(device_app.client).objects.filter(pk=device_app.client.pk).update(disabled=True)
    shown = client.get(entered["Location"])
    assert shown.status_code == (410 if how == "expired" else 400)
    assert (b"has expired" if how == "expired" else b"has been disabled") in shown.content
    assert b'value="accept"' not in shown.content


def test_a_code_another_user_entered_first_is_a_wrong_code_to_the_second(device_app, alice, bob):
    alices, bobs = HttpClient(), HttpClient()
    started = _device_start(alices, device_app)
    entered = _device_entered(alices, alice, started["user_code"])
    assert entered.status_code == 302
    cache.delete(f"portcullis:device-code-wrong:{bob.pk}")
    taken = _device_entered(bobs, bob, started["user_code"])
    assert taken.status_code == 200  # DOT moved the grant to bob and sent him to approve it
    assert b"Incorrect user code" in taken.content
    wrong = AuditEvent.objects.get(kind="device.code_wrong")
    assert (wrong.actor, wrong.data) == ("user:bob", {"count": 1})  # counted toward bob's pause
    assert get_device_grant_model().objects.get(device_code=started["device_code"]).user == alice
    assert alices.post(entered["Location"], {"action": "accept"}).status_code == 302
    assert AuditEvent.objects.get(kind="consent.granted").actor == "user:alice"


@pytest.mark.parametrize(
    "typed", [str.lower, lambda code: f" {code[:4]}-{code[4:]} ", lambda code: " ".join(code)]
)
def test_a_user_code_typed_in_lower_case_or_grouped_is_the_code(client, device_app, alice, typed):
    started = _device_start(client, device_app)
    code = started["user_code"]
    assert code == code.upper()
    assert code.isalnum()
    entered = _device_entered(client, alice, typed(code))
    assert entered.status_code == 302, entered.content
    assert entered["Location"].endswith(f"/{code}/")
    assert not AuditEvent.objects.filter(kind="device.code_wrong").exists()


# ---------------------------------------------------------------- userinfo


def _userinfo_tokens(oauth: OAuthDriver, reg: RegisteredClient, user: Any) -> dict[str, Any]:
    code, verifier = _code(oauth, reg, user, scope="openid profile models.read")
    response = oauth.code_exchange(reg, code, verifier)
    assert response.status_code == 200, response.content
    tokens: dict[str, Any] = response.json()
    return tokens


def test_userinfo_refuses_a_token_whose_signing_key_was_revoked_as_introspection_does(oauth, web_app, alice):
    from authserver.services import signing_key_revoke

    tokens = _userinfo_tokens(oauth, web_app, alice)
    bearer = {"HTTP_AUTHORIZATION": "Bearer " + tokens["access_token"]}
    assert oauth.http.get("/oauth/userinfo/", **bearer).status_code == 200
    signing_key_revoke(jwt.get_unverified_header(tokens["access_token"])["kid"], actor="user:admin")
    refused = oauth.http.get("/oauth/userinfo/", **bearer)
    assert refused.status_code == 401
    assert refused.json()["error"] == "invalid_token"
    assert refused["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    assert refused["Cache-Control"] == "no-store"
    assert AuditEvent.objects.get(kind="userinfo.denied").data == {
        "error_code": "invalid_token",
        "status": 401,
    }
    assert b"alice" not in refused.content


def test_userinfo_refuses_a_token_in_the_query_string_as_rfc_9700_asks(oauth, web_app, alice):
    tokens = _userinfo_tokens(oauth, web_app, alice)
    refused = oauth.http.get("/oauth/userinfo/", {"access_token": tokens["access_token"]})
    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_request"
    assert refused["WWW-Authenticate"].startswith('Bearer error="invalid_request"')
    assert AuditEvent.objects.get(kind="userinfo.denied").data == {
        "error_code": "invalid_request",
        "status": 400,
    }
    assert b"sub" not in refused.content
    # in the header, the same token is answered
    assert (
        oauth.http.get("/oauth/userinfo/", HTTP_AUTHORIZATION="Bearer " + tokens["access_token"]).status_code
        == 200
    )


@pytest.mark.parametrize("scope", ["openid", "profile", "offline_access"])
def test_a_client_credentials_token_carries_no_end_user_scope(oauth, make_client, scope):
    reg = make_client(scopes="models.read openid profile offline_access")
    refused = oauth.client_credentials(reg, scope=f"models.read {scope}")
    assert (refused.status_code, refused.json()["error"]) == (400, "invalid_scope")
    assert AuditEvent.objects.get(kind="token.denied").data["error_code"] == "invalid_scope"
    assert oauth.client_credentials(reg, scope="models.read").status_code == 200


def test_userinfo_answers_a_client_credentials_token_carrying_openid_with_insufficient_scope_not_a_500(
    oauth, make_client, monkeypatch
):
    from authserver import validators

    reg = make_client(scopes="models.read openid")
    monkeypatch.setattr(validators, "END_USER_SCOPES", frozenset())  # one issued before they were refused
    issued = oauth.client_credentials(reg, scope="openid models.read")
    assert issued.status_code == 200, issued.content
    answer = oauth.http.get("/oauth/userinfo/", HTTP_AUTHORIZATION="Bearer " + issued.json()["access_token"])
    assert answer.status_code == 403
    assert answer.json()["error"] == "insufficient_scope"
    assert answer["WWW-Authenticate"] == 'Bearer error="insufficient_scope"'
    assert AuditEvent.objects.get(kind="userinfo.denied").data == {
        "error_code": "insufficient_scope",
        "status": 403,
    }


# ---------------------------------------------------------------- id_token_hint (OIDC Core §3.1.2.1)


def _authorize(http: HttpClient, reg: RegisteredClient, **extra: str) -> Any:
    _v, challenge = pkce_pair()
    params = {
        "response_type": "code",
        "client_id": reg.client.client_id,
        "redirect_uri": REDIRECT_URI,
        "scope": "openid models.read",
        "state": "s",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        **extra,
    }
    return http.get("/oauth/authorize/", params)


def _query(response: Any) -> dict[str, str]:
    assert response.status_code == 302, response.content
    return {k: v[0] for k, v in parse_qs(urlsplit(response["Location"]).query).items()}


def _id_token(oauth: OAuthDriver, reg: RegisteredClient, user: Any) -> str:
    """An ID token issued to ``user`` through ``reg``, whose consent ``user`` has now given."""
    return str(_userinfo_tokens(oauth, reg, user)["id_token"])


def _signed(claims: dict[str, Any], *, ours: bool = True) -> str:
    """An ID token signed with our ID-token key (``ours``) or with a key of the same kid that is not ours."""
    from authserver.crypto import ID_TOKEN_ALGORITHM
    from authserver.selectors import signing_key_active

    key = signing_key_active(ID_TOKEN_ALGORITHM)
    private = (
        key.private_signing_key() if ours else rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    return jwt.encode(claims, private, algorithm="RS256", headers={"kid": key.kid})


@pytest.mark.parametrize("prompt", ["none", ""])
def test_an_id_token_hint_for_another_user_is_login_required_and_signs_nobody_out(
    oauth, web_app, alice, bob, prompt
):
    hint = _id_token(OAuthDriver(http=HttpClient()), web_app, bob)
    _id_token(oauth, web_app, alice)  # alice's consent is remembered: without the hint, a code at once
    answer = _query(_authorize(oauth.http, web_app, prompt=prompt, id_token_hint=hint))
    assert answer["error"] == "login_required"
    assert "code" not in answer
    assert answer["state"] == "s"
    assert "_auth_user_id" in oauth.http.session  # no logout on a GET any site can send
    assert AuditEvent.objects.get(kind="authorize.denied").data["error_code"] == "login_required"
    assert "code" in _query(_authorize(oauth.http, web_app, prompt=prompt))  # the same request, no hint


def test_an_id_token_hint_for_another_user_is_refused_before_the_consent_page(oauth, web_app, alice, bob):
    hint = _id_token(OAuthDriver(http=HttpClient()), web_app, bob)
    oauth.http.force_login(alice)  # no consent remembered: the consent page would be shown
    answer = _query(_authorize(oauth.http, web_app, id_token_hint=hint))
    assert answer["error"] == "login_required"
    assert not AuditEvent.objects.filter(kind="consent.granted", actor="user:alice").exists()


def test_an_id_token_hint_is_checked_against_its_subject_even_expired(oauth, web_app, alice, bob, settings):
    hint = _id_token(oauth, web_app, alice)
    assert "code" in _query(_authorize(oauth.http, web_app, prompt="none", id_token_hint=hint))
    now = int(time.time())
    claims = {"iss": settings.PORTCULLIS_ISSUER, "sub": str(alice.pk), "aud": web_app.client.client_id}
    expired = _signed({**claims, "iat": now - 7200, "exp": now - 3600})  # OIDC Core §3.1.2.1 allows it
    assert "code" in _query(_authorize(oauth.http, web_app, prompt="none", id_token_hint=expired))
    # the same hint, with bob signed in (and his consent remembered): not the user it names
    bobs = OAuthDriver(http=HttpClient())
    _id_token(bobs, web_app, bob)
    answer = _query(_authorize(bobs.http, web_app, prompt="none", id_token_hint=expired))
    assert answer["error"] == "login_required"


@pytest.mark.parametrize("forged", ["garbage", "foreign key", "other issuer", "access token"])
def test_an_id_token_hint_this_server_did_not_issue_is_invalid_request(
    oauth, web_app, alice, settings, forged
):
    tokens = _userinfo_tokens(oauth, web_app, alice)
    claims = {"iss": settings.PORTCULLIS_ISSUER, "sub": str(alice.pk), "aud": web_app.client.client_id}
    hint = {
        "garbage": "not.a.jwt",
        "foreign key": _signed(claims, ours=False),
        "other issuer": _signed({**claims, "iss": "https://elsewhere.example"}),
        "access token": tokens["access_token"],  # ours, for alice, but not an ID token
    }[forged]
    answer = _query(_authorize(oauth.http, web_app, prompt="none", id_token_hint=hint))
    assert answer["error"] == "invalid_request"
    assert "code" not in answer
    assert AuditEvent.objects.get(kind="authorize.denied").data["error_code"] == "invalid_request"


@pytest.mark.parametrize("prompt", ["none", "", "login"])
def test_a_user_named_in_the_query_is_not_taken_for_the_signed_in_one(oauth, web_app, alice, bob, prompt):
    # oauthlib's request answers any name from the query: ``&user=x`` was read as the user (a 500)
    hint = _id_token(OAuthDriver(http=HttpClient()), web_app, bob)
    _id_token(oauth, web_app, alice)
    extra = {"prompt": prompt, "id_token_hint": hint, "user": str(bob.pk)}
    response = _authorize(oauth.http, web_app, **extra)
    if prompt == "login":  # to the sign-in page first, as any prompt=login
        assert response.status_code == 302
        assert response["Location"].startswith("/accounts/login/")
        return
    assert _query(response)["error"] == "login_required"


@pytest.mark.parametrize("grant", ["authorization_code", "client_credentials"])
def test_userinfo_answers_a_live_token_without_openid_with_insufficient_scope_naming_it(
    oauth, web_app, make_client, alice, grant
):
    # RFC 6750 §3.1: the token is good, its scope is not: 403 insufficient_scope with the scope needed.
    # DOT checked both in one and answered 401 invalid_token, which tells a client to get a new token.
    if grant == "authorization_code":
        code, verifier = _code(oauth, web_app, alice, scope="models.read")
        token = oauth.code_exchange(web_app, code, verifier).json()["access_token"]
    else:
        token = oauth.client_credentials(make_client(scopes="models.read"), scope="models.read").json()[
            "access_token"
        ]
    refused = oauth.http.get("/oauth/userinfo/", HTTP_AUTHORIZATION="Bearer " + token)
    assert refused.status_code == 403
    assert refused.json()["error"] == "insufficient_scope"
    assert refused["WWW-Authenticate"] == 'Bearer error="insufficient_scope", scope="openid"'
    assert refused["Cache-Control"] == "no-store"
    assert AuditEvent.objects.get(kind="userinfo.denied").data == {
        "error_code": "insufficient_scope",
        "status": 403,
    }
    # expired, it is no good at all: invalid_token, as before
    AccessToken.objects.update(expires=timezone.now() - timedelta(seconds=1))
    expired = oauth.http.get("/oauth/userinfo/", HTTP_AUTHORIZATION="Bearer " + token)
    assert expired.status_code == 401
    assert expired["WWW-Authenticate"].startswith('Bearer error="invalid_token"')


def test_userinfo_refuses_a_token_sent_in_the_header_and_the_body_at_once(oauth, web_app, alice):
    # RFC 6750 §3.1 invalid_request: a request that "uses more than one method for including an access
    # token"; oauthlib read the header and never looked at the body
    token = _userinfo_tokens(oauth, web_app, alice)["access_token"]
    header = {"HTTP_AUTHORIZATION": "Bearer " + token}
    refused = oauth.http.post("/oauth/userinfo/", {"access_token": token}, **header)
    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_request"
    assert refused["WWW-Authenticate"].startswith('Bearer error="invalid_request"')
    assert b"sub" not in refused.content
    assert AuditEvent.objects.get(kind="userinfo.denied").data == {
        "error_code": "invalid_request",
        "status": 400,
    }
    assert oauth.http.post("/oauth/userinfo/", **header).status_code == 200  # each method alone is answered
    assert oauth.http.post("/oauth/userinfo/", {"access_token": token}).status_code == 200
