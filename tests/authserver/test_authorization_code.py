"""Authorization code + PKCE, consent, code replay, refresh rotation and reuse, revocation, introspection."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from datetime import timedelta
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from django.conf import settings
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from audit.models import AuditEvent
from authserver.models import AccessToken, Client, Consent, Grant, RefreshToken, RevokedAccessToken
from authserver.revocation import local_revocations
from tests.conftest import REDIRECT_URI, pkce_pair

pytestmark = pytest.mark.django_db

SCOPES = "models.read completions offline_access"


def _claims(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


@pytest.fixture
def web_app(make_client):
    return make_client(
        grants=("authorization-code",), scopes="models.read completions offline_access openid profile"
    )


@pytest.fixture
def signed_in(client, alice):
    client.force_login(alice)
    return alice


def _tokens(oauth, reg, scope=SCOPES):
    verifier, challenge = pkce_pair()
    code = oauth.code_from(oauth.authorize(reg.client, challenge=challenge, scope=scope))
    response = oauth.code_exchange(reg, code, verifier)
    assert response.status_code == 200, response.content
    return code, verifier, response.json()


def test_code_flow_issues_tokens_with_iss_in_the_redirect_and_records_consent(oauth, web_app, signed_in):
    verifier, challenge = pkce_pair()
    redirect = oauth.authorize(web_app.client, challenge=challenge, scope=SCOPES)
    assert redirect.status_code == 302
    location = redirect["Location"]
    assert location.startswith(REDIRECT_URI + "?")
    assert "iss=http" in location  # RFC 9207
    assert "state=xyz" in location
    tokens = oauth.code_exchange(web_app, oauth.code_from(redirect), verifier).json()
    assert set(tokens) >= {"access_token", "refresh_token", "expires_in", "scope"}
    claims = _claims(tokens["access_token"])
    assert claims["sub"] == str(signed_in.pk)
    assert Consent.objects.get(user=signed_in, client=web_app.client).covers(SCOPES.split())
    assert AuditEvent.objects.filter(kind="consent.granted", actor="user:alice").exists()


def _remembered(oauth, web_app, **changes: str) -> dict[str, str]:
    """Authorization parameters for a client the user already consented to, with some changed."""
    _tokens(oauth, web_app, scope="models.read")
    _v, challenge = pkce_pair()
    params = {
        "response_type": "code",
        "client_id": web_app.client.client_id,
        "redirect_uri": REDIRECT_URI,
        "scope": "models.read",
        "state": "s",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    return {**params, **changes}


def test_remembered_consent_skips_the_screen_but_new_scopes_ask_again(oauth, web_app, signed_in):
    params = _remembered(oauth, web_app)
    assert oauth.http.get("/oauth/authorize/", params).status_code == 302
    params["scope"] = "models.read completions"
    page = oauth.http.get("/oauth/authorize/", params)
    assert page.status_code == 200
    assert b"Generate text and chat completions" in page.content


@pytest.mark.parametrize("why", ["prompt=consent", "consent withdrawn"])
def test_approval_prompt_auto_from_the_client_does_not_skip_the_consent_page(oauth, web_app, signed_in, why):
    from authserver.services import consent_withdraw

    params = _remembered(oauth, web_app, approval_prompt="auto")  # the user holds a live token meanwhile
    if why == "prompt=consent":
        params["prompt"] = "consent"
    else:
        consent_withdraw(user=signed_in, client=web_app.client)  # which revokes its tokens...
        AccessToken.objects.create(  # ...but one live token for the pair is all DOT's skip looked for
            user=signed_in,
            application=web_app.client,
            token_checksum="0" * 64,
            expires=timezone.now() + timedelta(minutes=5),
            scope="models.read",
        )
    page = oauth.http.get("/oauth/authorize/", params)
    assert page.status_code == 200  # the consent page, not a code
    assert b'name="csrfmiddlewaretoken"' in page.content


def test_consent_page_shows_client_name_owner_and_plain_scopes_with_security_headers(
    oauth, web_app, signed_in
):
    _v, challenge = pkce_pair()
    params = {
        "response_type": "code",
        "client_id": web_app.client.client_id,
        "redirect_uri": REDIRECT_URI,
        "scope": SCOPES,
        "state": "s",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    page = oauth.http.get("/oauth/authorize/", params)
    html = page.content.decode()
    assert "Test app" in html
    assert "Stay connected when you are away" in html
    assert 'name="csrfmiddlewaretoken"' in html
    assert page["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in page["Content-Security-Policy"]
    assert page["Referrer-Policy"] == "same-origin"  # see config/settings.py for why not no-referrer
    assert page["X-Content-Type-Options"] == "nosniff"


def test_denied_consent_redirects_with_access_denied_and_is_audited(oauth, web_app, signed_in):
    _v, challenge = pkce_pair()
    response = oauth.authorize(web_app.client, challenge=challenge, allow=False)
    assert response.status_code == 302
    assert "error=access_denied" in response["Location"]
    assert AuditEvent.objects.filter(kind="consent.denied", client_id=web_app.client.client_id).exists()


def test_redirect_uri_mismatch_is_refused_without_redirecting(oauth, web_app, signed_in):
    _v, challenge = pkce_pair()
    response = oauth.authorize(
        web_app.client, challenge=challenge, redirect_uri="https://evil.example.com/cb"
    )
    assert response.status_code == 400
    assert "evil.example.com" not in response.get("Location", "")
    assert AuditEvent.objects.get(kind="authorize.denied").data["error_code"] == "invalid_request"


def test_plain_pkce_with_remembered_consent_is_an_error_redirect_not_a_500(oauth, web_app, signed_in):
    params = _remembered(oauth, web_app, code_challenge="a" * 43, code_challenge_method="plain")
    response = oauth.http.get("/oauth/authorize/", params)
    assert response.status_code == 302
    assert "error=invalid_request" in response["Location"]
    assert "state=s" in response["Location"]
    assert AuditEvent.objects.filter(kind="authorize.denied").exists()


def test_a_resource_with_remembered_consent_is_kept_on_the_code_not_a_500(oauth, web_app, signed_in):
    params = _remembered(oauth, web_app, resource=settings.PORTCULLIS_AUDIENCE)
    response = oauth.http.get("/oauth/authorize/", params)
    assert response.status_code == 302, response.content[:300]
    code = oauth.code_from(response)
    assert Grant.objects.get(code=code).resource == [settings.PORTCULLIS_AUDIENCE]  # as the consent screen


@pytest.mark.parametrize(
    "resource",
    [
        "https://evil.example",
        "https://evil.example/v1",
        "{audience}/",
        ["{audience}", "https://evil.example"],  # RFC 8707 §2: each repeated one is checked
        "",
    ],
)
@pytest.mark.parametrize("consent", ["remembered", "asked"])
def test_a_resource_other_than_the_gateway_is_redirected_invalid_target(
    oauth, web_app, signed_in, resource, consent
):
    # RFC 8707 §2: every access token's aud names the gateway, whatever resource was asked for
    audience = settings.PORTCULLIS_AUDIENCE
    asked = [r.format(audience=audience) for r in resource] if isinstance(resource, list) else None
    asked = asked or resource.format(audience=audience)
    plain = _remembered(oauth, web_app) if consent == "remembered" else _authorize_params(web_app.client)
    params = {**plain, "resource": asked}  # a list: the parameter repeated
    query = _query(oauth.http.get("/oauth/authorize/", params))
    assert query["error"] == "invalid_target"
    assert query["state"] == plain["state"]
    if consent == "asked" and asked:  # the consent form's hidden resource field is the user's to change
        valid = _authorize_params(web_app.client, resource=audience)
        assert oauth.http.get("/oauth/authorize/", valid).status_code == 200
        hidden = " ".join(asked) if isinstance(asked, list) else asked
        answer = oauth.http.post(
            f"/oauth/authorize/?{urlencode(valid)}", {**valid, "resource": hidden, "allow": "1"}
        )
        assert _query(answer)["error"] == "invalid_target"
        broken = oauth.http.post(  # one that does not parse: DOT's own check raised (a 500)
            f"/oauth/authorize/?{urlencode(valid)}", {**valid, "resource": "https://[zz]/", "allow": "1"}
        )
        assert broken.status_code == 400
        assert b"resource field holds no URI" in broken.content
        assert AuditEvent.objects.filter(kind="authorize.denied", data__error_code="invalid_request").exists()
    assert not Grant.objects.exists()
    assert AuditEvent.objects.filter(kind="authorize.denied", data__error_code="invalid_target").exists()


def test_a_native_apps_loopback_redirect_gets_its_errors_redirected(oauth, make_client, signed_in):
    loopback = "http://127.0.0.1:8765/callback"
    native = make_client(grants=("authorization-code",), public=True, redirect_uris=(loopback,))
    _v, challenge = pkce_pair()
    response = oauth.authorize(native.client, challenge=challenge, scope="admin.write", redirect_uri=loopback)
    assert response.status_code == 302, response.content[:200]
    assert response["Location"].startswith(loopback + "?error=invalid_scope")
    assert "state=xyz" in response["Location"]


def test_missing_pkce_is_refused(oauth, web_app, signed_in):
    params = {
        "response_type": "code",
        "client_id": web_app.client.client_id,
        "redirect_uri": REDIRECT_URI,
        "scope": "models.read",
        "state": "s",
    }
    response = oauth.http.get("/oauth/authorize/", params)
    assert response.status_code == 302
    assert "error=invalid_request" in response["Location"]
    assert AuditEvent.objects.get(kind="authorize.denied").data["error_code"] == "invalid_request"


def test_plain_pkce_is_refused(oauth, web_app, signed_in):
    verifier, _c = pkce_pair()
    response = oauth.authorize(web_app.client, challenge=verifier, method="plain")
    assert response.status_code in (302, 400)
    if response.status_code == 302:
        assert "error=" in response["Location"]
    assert Grant.objects.count() == 0
    assert AuditEvent.objects.filter(kind="authorize.denied").exists()


def test_wrong_code_verifier_is_invalid_grant(oauth, web_app, signed_in):
    _v, challenge = pkce_pair()
    code = oauth.code_from(oauth.authorize(web_app.client, challenge=challenge))
    other_verifier, _ = pkce_pair()
    response = oauth.code_exchange(web_app, code, other_verifier)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"
    assert AuditEvent.objects.get(kind="token.denied").data["error_code"] == "invalid_grant"


def test_code_redeemed_by_another_client_is_refused(oauth, web_app, make_client, signed_in):
    other = make_client(grants=("authorization-code",))
    verifier, challenge = pkce_pair()
    code = oauth.code_from(oauth.authorize(web_app.client, challenge=challenge))
    response = oauth.code_exchange(other, code, verifier)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"
    assert oauth.code_exchange(web_app, code, verifier).status_code == 200


def test_expired_code_is_invalid_grant(oauth, web_app, signed_in):
    verifier, challenge = pkce_pair()
    code = oauth.code_from(oauth.authorize(web_app.client, challenge=challenge))
    Grant.objects.update(expires=timezone.now() - timedelta(seconds=1))
    response = oauth.code_exchange(web_app, code, verifier)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"


def test_replayed_code_revokes_every_token_issued_from_it(
    oauth, web_app, signed_in, django_capture_on_commit_callbacks
):
    code, verifier, tokens = _tokens(oauth, web_app)
    refreshed = oauth.token(
        {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
        (web_app.client.client_id, web_app.client_secret),
    ).json()
    assert AccessToken.objects.count() == 1
    with django_capture_on_commit_callbacks(execute=True):
        replay = oauth.code_exchange(web_app, code, verifier)
    assert replay.status_code == 400
    assert replay.json()["error"] == "invalid_grant"
    assert AccessToken.objects.count() == 0
    assert not RefreshToken.objects.filter(revoked__isnull=True).exists()
    jti = _claims(refreshed["access_token"])["jti"]
    assert local_revocations.is_revoked(jti, "-")
    event = AuditEvent.objects.get(kind="code.replayed")
    assert event.outcome == "denied"
    assert event.data["tokens_revoked"] == 1
    assert event.data["user"] == str(signed_in.pk)  # whose access an anomaly quarantine would act on
    again = oauth.token(
        {"grant_type": "refresh_token", "refresh_token": refreshed["refresh_token"]},
        (web_app.client.client_id, web_app.client_secret),
    )
    assert again.status_code == 400


def test_a_replayed_codes_tokens_are_recorded_in_one_insert_and_pushed_once(
    oauth, web_app, signed_in, django_capture_on_commit_callbacks
):
    code, verifier, _tokens_issued = _tokens(oauth, web_app)
    family = RefreshToken.objects.get().token_family
    extra = AccessToken.objects.create(  # a second live token of the family (another device's refresh)
        user=signed_in,
        application=web_app.client,
        token="x" * 40,
        jti=uuid.uuid4(),
        expires=timezone.now() + timedelta(minutes=5),
        scope="openid",
    )
    RefreshToken.objects.create(
        user=signed_in, application=web_app.client, token="r" * 40, access_token=extra, token_family=family
    )
    pushes: list[dict[str, object]] = []
    local_revocations.listeners.append(pushes.append)
    try:
        with CaptureQueriesContext(connection) as queries, django_capture_on_commit_callbacks(execute=True):
            assert oauth.code_exchange(web_app, code, verifier).status_code == 400
    finally:
        local_revocations.listeners.remove(pushes.append)
    assert AccessToken.objects.count() == 0
    table = RevokedAccessToken._meta.db_table
    assert len([q for q in queries if q["sql"].startswith("INSERT") and table in q["sql"]]) == 1
    assert RevokedAccessToken.objects.count() == 2
    assert [len(p["jtis"]) for p in pushes if p["jtis"]] == [2]  # type: ignore[arg-type]


def test_refresh_rotates_and_reuse_revokes_the_family(
    oauth, web_app, signed_in, django_capture_on_commit_callbacks
):
    _c, _v, tokens = _tokens(oauth, web_app)
    auth = (web_app.client.client_id, web_app.client_secret)
    first = oauth.token({"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}, auth)
    assert first.status_code == 200
    rotated = first.json()
    assert rotated["refresh_token"] != tokens["refresh_token"]
    assert AuditEvent.objects.filter(kind="token.refreshed").count() == 1
    with django_capture_on_commit_callbacks(execute=True):
        reuse = oauth.token({"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}, auth)
    assert reuse.status_code == 400
    assert reuse.json()["error"] == "invalid_grant"
    assert AuditEvent.objects.filter(kind="token.refresh_reuse", outcome="denied").count() == 1
    assert local_revocations.is_revoked(_claims(rotated["access_token"])["jti"], "-")
    after = oauth.token({"grant_type": "refresh_token", "refresh_token": rotated["refresh_token"]}, auth)
    assert after.status_code == 400
    assert AccessToken.objects.count() == 0


def _refreshed(oauth, reg, refresh_token: str, **extra: str):
    data = {"grant_type": "refresh_token", "refresh_token": refresh_token, **extra}
    return oauth.token(data, (reg.client.client_id, reg.client_secret))


@pytest.mark.parametrize("revocation", ["rfc7009", "consent withdrawn", "admin"])
def test_a_revoked_refresh_token_that_was_never_rotated_is_invalid_grant_not_a_reuse(
    oauth, web_app, signed_in, revocation
):
    from authserver.services import access_token_revoke, consent_withdraw

    _c, _v, tokens = _tokens(oauth, web_app)
    if revocation == "rfc7009":
        revoke = {"token": tokens["refresh_token"], "token_type_hint": "refresh_token"}
        assert (
            oauth.http.post("/oauth/revoke/", revoke, HTTP_AUTHORIZATION=_basic(web_app)).status_code == 200
        )
    elif revocation == "consent withdrawn":
        consent_withdraw(user=signed_in, client=web_app.client)
    else:
        access = AccessToken.objects.get(jti=_claims(tokens["access_token"])["jti"])
        access_token_revoke(token=access, actor="user:admin")
    response = _refreshed(oauth, web_app, tokens["refresh_token"])
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"
    # RFC 7009 §2.1: a revoked token is merely dead; only a rotated one presented again leaked (RFC 9700
    # §4.14.2), and a reuse event is an anomaly that can quarantine the user's access to the client
    assert not AuditEvent.objects.filter(kind="token.refresh_reuse").exists()
    assert AuditEvent.objects.get(kind="token.denied").data["error_code"] == "invalid_grant"


def test_a_refresh_token_rotated_generations_ago_is_still_a_reuse_that_revokes_the_family(
    oauth, web_app, signed_in, django_capture_on_commit_callbacks
):
    _c, _v, tokens = _tokens(oauth, web_app)
    latest = tokens
    for _generation in range(2):  # each rotation deletes the access token minted from the one before
        latest = _refreshed(oauth, web_app, latest["refresh_token"]).json()
    with django_capture_on_commit_callbacks(execute=True):
        reuse = _refreshed(oauth, web_app, tokens["refresh_token"])
    assert reuse.status_code == 400
    assert reuse.json()["error"] == "invalid_grant"
    assert AuditEvent.objects.filter(kind="token.refresh_reuse", outcome="denied").count() == 1
    assert local_revocations.is_revoked(_claims(latest["access_token"])["jti"], "-")
    assert not AccessToken.objects.exists()
    assert not RefreshToken.objects.filter(revoked__isnull=True).exists()


def test_a_refresh_that_narrows_the_scope_rotates_and_the_new_refresh_token_keeps_the_original_scope(
    oauth, web_app, signed_in, django_capture_on_commit_callbacks
):
    # RFC 6749 §6: "the refresh token scope MUST be identical to that of the refresh token included by the
    # client in the request", and an omitted scope "is treated as equal to the scope originally granted".
    # DOT reads a refresh token's scope from the family's latest access token: the family kept the narrower.
    _c, _v, tokens = _tokens(oauth, web_app)
    narrowed = _refreshed(oauth, web_app, tokens["refresh_token"], scope="models.read")
    assert narrowed.status_code == 200, narrowed.content
    body = narrowed.json()
    assert body["scope"] == "models.read"  # the access token has what was asked for
    assert body["refresh_token"] != tokens["refresh_token"]  # rotated, though offline_access was left out
    minted = AccessToken.objects.get(jti=_claims(body["access_token"])["jti"])
    assert minted.source_refresh_token is not None  # linked to what it came from: family revocation finds it
    again = _refreshed(oauth, web_app, body["refresh_token"])  # no scope: the one originally granted
    assert again.status_code == 200, again.content
    assert again.json()["scope"] == SCOPES
    assert "refresh_token" in again.json()
    narrowed_twice = _refreshed(oauth, web_app, again.json()["refresh_token"], scope="models.read")
    widened_back = _refreshed(
        oauth, web_app, narrowed_twice.json()["refresh_token"], scope="models.read completions"
    )
    assert widened_back.status_code == 200, widened_back.content  # within what was originally granted
    assert widened_back.json()["scope"] == "models.read completions"
    assert set(RefreshToken.objects.values_list("scope", flat=True)) == {SCOPES}
    with django_capture_on_commit_callbacks(execute=True):
        reuse = _refreshed(oauth, web_app, tokens["refresh_token"])
    assert reuse.status_code == 400
    assert reuse.json()["error"] == "invalid_grant"
    assert AuditEvent.objects.filter(kind="token.refresh_reuse", outcome="denied").count() == 1
    assert local_revocations.is_revoked(_claims(widened_back.json()["access_token"])["jti"], "-")
    assert not AccessToken.objects.exists()
    assert not RefreshToken.objects.filter(revoked__isnull=True).exists()


def test_a_refresh_token_issued_before_it_recorded_its_scope_still_refreshes_with_its_access_tokens_scope(
    oauth, web_app, signed_in
):
    _c, _v, tokens = _tokens(oauth, web_app, scope="models.read offline_access")
    RefreshToken.objects.update(scope="")  # as the migration leaves the rows it found
    refreshed = _refreshed(oauth, web_app, tokens["refresh_token"])
    assert refreshed.status_code == 200, refreshed.content
    assert refreshed.json()["scope"] == "models.read offline_access"
    rotated = RefreshToken.objects.get(revoked__isnull=True)
    assert rotated.scope == "models.read offline_access"  # recorded from then on
    widened = _refreshed(oauth, web_app, refreshed.json()["refresh_token"], scope="models.read completions")
    assert widened.json()["error"] == "invalid_scope"


@pytest.mark.parametrize("grant", ["authorization_code", "refresh_token"])
def test_a_code_or_refresh_for_a_resource_other_than_the_gateway_is_invalid_target(
    oauth, web_app, signed_in, grant
):
    verifier, challenge = pkce_pair()
    code = oauth.code_from(oauth.authorize(web_app.client, challenge=challenge, scope=SCOPES))
    auth = (web_app.client.client_id, web_app.client_secret)
    exchange = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI}
    exchange["code_verifier"] = verifier
    if grant == "refresh_token":
        refresh_token = oauth.token(exchange, auth).json()["refresh_token"]
        asked = {"grant_type": "refresh_token", "refresh_token": refresh_token}
    else:
        asked = exchange
    refused = oauth.token({**asked, "resource": "https://evil.example"}, auth)
    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_target"
    assert AuditEvent.objects.get(kind="token.denied").data["error_code"] == "invalid_target"
    # refused before the code or the refresh token was used: it still works, for the gateway
    granted = oauth.token({**asked, "resource": settings.PORTCULLIS_AUDIENCE}, auth)
    assert granted.status_code == 200, granted.content
    assert _claims(granted.json()["access_token"])["aud"] == settings.PORTCULLIS_AUDIENCE
    assert not AuditEvent.objects.filter(kind__in=["token.refresh_reuse", "code.replayed"]).exists()


def test_refresh_cannot_widen_scope(oauth, web_app, signed_in):
    _c, _v, tokens = _tokens(oauth, web_app, scope="models.read offline_access")
    response = oauth.token(
        {
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
            "scope": "models.read completions",
        },
        (web_app.client.client_id, web_app.client_secret),
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_scope"


def test_refresh_token_expires(oauth, web_app, signed_in, settings):
    _c, _v, tokens = _tokens(oauth, web_app)
    AccessToken.objects.update(expires=timezone.now() - timedelta(days=31))
    response = oauth.token(
        {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
        (web_app.client.client_id, web_app.client_secret),
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"


def test_no_refresh_token_without_offline_access(oauth, web_app, signed_in):
    _c, _v, tokens = _tokens(oauth, web_app, scope="models.read")
    assert "refresh_token" not in tokens
    assert RefreshToken.objects.count() == 0


@pytest.mark.parametrize(
    ("registered", "asked", "allowed"),
    [
        ("https://app.example.com/callback", "https://APP.example.com/callback", False),
        ("https://app.example.com/callback", "HTTPS://app.example.com/callback", False),
        ("https://app.example.com/callback", "https://app.example.com:443/callback", False),
        ("https://app.example.com/callback", "https://app.example.com/callback", True),
        ("http://127.0.0.1/cb", "http://127.0.0.1:51234/cb", True),
        ("http://127.0.0.1:8765/cb", "http://127.0.0.1:9/cb", True),
        ("http://[::1]/cb", "http://[::1]:51234/cb", True),
        ("http://127.0.0.1/cb", "http://127.0.0.1:51234/CB", False),
    ],
)
def test_a_redirect_uri_must_be_the_registered_string_but_for_a_loopback_port(
    oauth, make_client, signed_in, registered, asked, allowed
):
    app = make_client(grants=("authorization-code",), public=True, redirect_uris=(registered,))
    _verifier, challenge = pkce_pair()
    response = oauth.authorize(app.client, challenge=challenge, redirect_uri=asked)
    if allowed:
        assert response.status_code == 302
        assert response["Location"].startswith(asked + "?code=")
    else:
        assert response.status_code == 400  # an unregistered redirect URI is never redirected to
        assert "Location" not in response


@pytest.mark.parametrize("stored", ["https://a.example:99999/cb", "http://[::1:80/cb"])
def test_a_redirect_uri_that_does_not_parse_is_refused_and_one_stored_before_never_gives_a_500(
    oauth, make_client, signed_in, stored
):
    from django.core.exceptions import ValidationError

    app = make_client(grants=("authorization-code",), public=True, redirect_uris=("https://a.example/cb",))
    app.client.redirect_uris = stored
    with pytest.raises(ValidationError, match="not a valid URL"):
        app.client.full_clean()
    Client.objects.filter(pk=app.client.pk).update(redirect_uris=f"{stored} https://a.example/cb")
    app.client.refresh_from_db()
    _verifier, challenge = pkce_pair()
    for asked in (stored, "https://a.example/other"):
        response = oauth.authorize(app.client, challenge=challenge, redirect_uri=asked)
        assert response.status_code == 400
    response = oauth.authorize(app.client, challenge=challenge, redirect_uri="https://a.example/cb")
    assert response.status_code == 302


def test_public_client_needs_no_secret_but_pkce(oauth, make_client, signed_in):
    native = make_client(
        grants=("authorization-code",), public=True, redirect_uris=("http://127.0.0.1:8765/cb",)
    )
    verifier, challenge = pkce_pair()
    redirect = oauth.authorize(native.client, challenge=challenge, redirect_uri="http://127.0.0.1:8765/cb")
    response = oauth.code_exchange(
        native, oauth.code_from(redirect), verifier, redirect_uri="http://127.0.0.1:8765/cb"
    )
    assert response.status_code == 200, response.content


def test_revoking_a_refresh_token_revokes_its_access_token_and_pushes_it(
    oauth, web_app, signed_in, django_capture_on_commit_callbacks
):
    _c, _v, tokens = _tokens(oauth, web_app)
    with django_capture_on_commit_callbacks(execute=True):
        response = oauth.http.post(
            "/oauth/revoke/",
            {"token": tokens["refresh_token"], "token_type_hint": "refresh_token"},
            HTTP_AUTHORIZATION=_basic(web_app),
        )
    assert response.status_code == 200
    assert AccessToken.objects.count() == 0
    assert local_revocations.is_revoked(_claims(tokens["access_token"])["jti"], "-")
    event = AuditEvent.objects.get(kind="token.revoked")
    assert event.client_id == "" or event.client_id == web_app.client.client_id


@pytest.mark.parametrize("whose", ["unknown", "another client's", "already revoked"])
def test_a_revocation_that_revokes_nothing_answers_200_but_is_not_audited_as_revoked(
    oauth, web_app, make_client, signed_in, whose
):
    _c, _v, tokens = _tokens(oauth, web_app)
    caller = make_client(name="Other app")
    token = "not-a-token" if whose == "unknown" else tokens["refresh_token"]
    revoked_before = 0
    if whose == "already revoked":
        caller = web_app
        oauth.http.post("/oauth/revoke/", {"token": token}, HTTP_AUTHORIZATION=_basic(web_app))
        revoked_before = 1  # the audit log is append-only: count, do not clear
    response = oauth.http.post("/oauth/revoke/", {"token": token}, HTTP_AUTHORIZATION=_basic(caller))
    assert response.status_code == 200  # RFC 7009 §2.2
    assert AuditEvent.objects.filter(kind="token.revoked").count() == revoked_before
    assert AuditEvent.objects.get(kind="token.revoke_unknown").outcome == "denied"


def test_revoking_an_access_token_pushes_its_jti(oauth, make_client, django_capture_on_commit_callbacks):
    reg = make_client()
    token = oauth.client_credentials(reg).json()["access_token"]
    with django_capture_on_commit_callbacks(execute=True):
        response = oauth.http.post("/oauth/revoke/", {"token": token}, HTTP_AUTHORIZATION=_basic(reg))
    assert response.status_code == 200
    assert local_revocations.is_revoked(_claims(token)["jti"], "-")


def _basic(reg):
    return "Basic " + base64.b64encode(f"{reg.client.client_id}:{reg.client_secret}".encode()).decode()


def test_introspection_is_post_only_and_only_for_allowed_clients(oauth, make_client):
    reg = make_client()
    introspector = make_client(can_introspect=True)
    token = oauth.client_credentials(reg).json()["access_token"]
    denied = oauth.http.post("/oauth/introspect/", {"token": token}, HTTP_AUTHORIZATION=_basic(reg))
    assert denied.status_code == 403
    assert denied.json()["error"] == "unauthorized_client"
    assert AuditEvent.objects.filter(kind="introspect.denied").exists()
    get = oauth.http.get("/oauth/introspect/", {"token": token}, HTTP_AUTHORIZATION=_basic(introspector))
    assert get.status_code == 405
    ok = oauth.http.post("/oauth/introspect/", {"token": token}, HTTP_AUTHORIZATION=_basic(introspector))
    assert ok.status_code == 200
    body = ok.json()
    assert body["active"] is True
    assert body["client_id"] == reg.client.client_id
    assert body["scope"] == "models.read completions"
    anonymous = oauth.http.post("/oauth/introspect/", {"token": token})
    assert anonymous.status_code == 401


def test_introspection_without_a_token_is_an_audited_invalid_request(oauth, make_client):
    introspector = make_client(can_introspect=True)
    response = oauth.http.post("/oauth/introspect/", {}, HTTP_AUTHORIZATION=_basic(introspector))
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    event = AuditEvent.objects.get(kind="introspect.denied")
    assert (event.client_id, event.data["error_code"]) == (introspector.client.client_id, "invalid_request")


def test_introspection_of_a_revoked_token_is_inactive(oauth, make_client):
    reg = make_client()
    introspector = make_client(can_introspect=True)
    token = oauth.client_credentials(reg).json()["access_token"]
    oauth.http.post("/oauth/revoke/", {"token": token}, HTTP_AUTHORIZATION=_basic(reg))
    body = oauth.http.post(
        "/oauth/introspect/", {"token": token}, HTTP_AUTHORIZATION=_basic(introspector)
    ).json()
    assert body == {"active": False}


def test_userinfo_answers_an_openid_token_with_the_users_claims_and_no_caching(oauth, web_app, signed_in):
    _code, _verifier, tokens = _tokens(oauth, web_app, scope="openid profile models.read")
    response = oauth.http.get("/oauth/userinfo/", HTTP_AUTHORIZATION="Bearer " + tokens["access_token"])
    assert response.status_code == 200, response.content
    assert response.json()["sub"] == str(signed_in.pk)
    assert response["Cache-Control"] == "no-store"


@pytest.mark.parametrize("authorization", ["Bearer bogus", "", "Basic eDp5"])
def test_userinfo_refuses_without_a_valid_token_and_the_refusal_is_audited(oauth, authorization):
    headers = {"HTTP_AUTHORIZATION": authorization} if authorization else {}
    response = oauth.http.get("/oauth/userinfo/", **headers)
    assert response.status_code == 401
    assert response["Cache-Control"] == "no-store"
    if authorization:
        assert response["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    else:  # RFC 6750 §3.1: no credentials, no error code
        assert response["WWW-Authenticate"] == 'Bearer realm="userinfo"'
    event = AuditEvent.objects.get(kind="userinfo.denied")
    assert event.data["status"] == 401


def _at_once(count: int, request) -> list:
    """Send ``count`` requests from as many threads, released together; return their answers."""
    import threading

    from django.db import connection
    from django.test import Client as HttpClient

    from tests.conftest import OAuthDriver

    barrier, answers = threading.Barrier(count), []

    def send() -> None:
        try:
            barrier.wait()
            answers.append(request(OAuthDriver(http=HttpClient(raise_request_exception=False))))
        finally:
            connection.close()

    threads = [threading.Thread(target=send) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(answers) == count, "a request hung"
    return answers


@pytest.mark.django_db(transaction=True)
def test_a_code_redeemed_twice_at_once_gives_one_answer_and_then_revokes_it(oauth, web_app, signed_in):
    for _round in range(3):
        verifier, challenge = pkce_pair()
        code = oauth.code_from(oauth.authorize(web_app.client, challenge=challenge, scope=SCOPES))
        answers = _at_once(3, lambda driver, c=code, v=verifier: driver.code_exchange(web_app, c, v))
        assert sorted(a.status_code for a in answers) == [200, 400, 400]
        assert {a.json()["error"] for a in answers if a.status_code == 400} == {"invalid_grant"}
        # RFC 6749 §4.1.2: the losers are replays, so what the winner got is revoked, and nothing the
        # losers' requests wrote before they were refused is left behind
        assert not AccessToken.objects.exists()
        assert not RefreshToken.objects.filter(revoked__isnull=True).exists()
    assert AuditEvent.objects.filter(kind="code.replayed", outcome="denied").count() == 6
    assert AuditEvent.objects.filter(kind="token.issued").count() == 3  # one per code, as given out


@pytest.mark.django_db(transaction=True)
def test_a_refresh_token_used_twice_at_once_is_a_reuse_that_revokes_the_family(oauth, web_app, signed_in):
    auth = (web_app.client.client_id, web_app.client_secret)
    for _round in range(3):
        _c, _v, tokens = _tokens(oauth, web_app)
        refresh = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}
        answers = _at_once(3, lambda driver, r=refresh: driver.token(r, auth))
        assert sorted(a.status_code for a in answers) == [200, 400, 400]  # DOT's grace path: 200, 200, 200
        assert {a.json()["error"] for a in answers if a.status_code == 400} == {"invalid_grant"}
        assert all(a.json()["access_token"] for a in answers if a.status_code == 200)
        assert not AccessToken.objects.exists()  # RFC 9700 §4.14.2: the whole family, the winner's too
        assert not RefreshToken.objects.filter(revoked__isnull=True).exists()
    assert AuditEvent.objects.filter(kind="token.refresh_reuse", outcome="denied").count() == 6
    assert AuditEvent.objects.filter(kind="token.refreshed").count() == 3


def test_a_deactivated_user_gets_no_token_from_a_refresh_token_or_a_code(oauth, web_app, signed_in):
    _c, _v, tokens = _tokens(oauth, web_app)
    verifier, challenge = pkce_pair()
    code = oauth.code_from(oauth.authorize(web_app.client, challenge=challenge, scope=SCOPES))
    type(signed_in).objects.filter(pk=signed_in.pk).update(is_active=False)  # as the Django admin does
    auth = (web_app.client.client_id, web_app.client_secret)
    refresh = oauth.token({"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}, auth)
    assert refresh.status_code == 400
    assert refresh.json()["error"] == "invalid_grant"
    exchange = oauth.code_exchange(web_app, code, verifier)
    assert exchange.status_code == 400
    assert exchange.json()["error"] == "invalid_grant"
    denied = AuditEvent.objects.filter(kind="token.denied").values_list("data__grant_type", flat=True)
    assert sorted(denied) == ["authorization_code", "refresh_token"]
    assert AuditEvent.objects.filter(kind__in=["token.issued", "token.refreshed"]).count() == 1  # the first


def _authorize_params(client, **changes: str) -> dict[str, str]:
    _v, challenge = pkce_pair()
    params = {
        "response_type": "code",
        "client_id": client.client_id,
        "redirect_uri": REDIRECT_URI,
        "scope": "models.read openid",
        "state": "s",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    return {**params, **changes}


def _query(response) -> dict[str, str]:
    assert response.status_code == 302, response.content[:300]
    assert response["Location"].startswith(REDIRECT_URI + "?")
    return {k: v[0] for k, v in parse_qs(urlsplit(response["Location"]).query).items()}


def test_prompt_none_of_a_signed_out_user_is_login_required_not_a_500(oauth, web_app):
    query = _query(oauth.http.get("/oauth/authorize/", _authorize_params(web_app.client, prompt="none")))
    assert query["error"] == "login_required"
    assert query["state"] == "s"


@pytest.mark.parametrize("scope", ["models.read openid", "models.read"])
def test_prompt_none_without_consent_is_consent_required_not_the_consent_page(
    oauth, web_app, signed_in, scope
):
    params = _authorize_params(web_app.client, prompt="none", scope=scope)
    query = _query(oauth.http.get("/oauth/authorize/", params))
    assert query["error"] == "consent_required"
    assert (query["state"], query["iss"]) == ("s", settings.PORTCULLIS_ISSUER)
    assert not Grant.objects.exists()
    assert AuditEvent.objects.get(kind="authorize.denied").data["error_code"] == "consent_required"


def test_prompt_none_with_remembered_consent_gives_a_code_without_a_page(oauth, web_app, signed_in):
    _tokens(oauth, web_app, scope="models.read openid")
    query = _query(oauth.http.get("/oauth/authorize/", _authorize_params(web_app.client, prompt="none")))
    assert "code" in query
    assert Grant.objects.count() == 1


def test_an_error_redirected_to_the_client_carries_iss(oauth, web_app, signed_in):
    params = _authorize_params(web_app.client)
    del params["code_challenge"]
    query = _query(oauth.http.get("/oauth/authorize/", params))
    assert query["error"] == "invalid_request"
    assert query["iss"] == settings.PORTCULLIS_ISSUER  # RFC 9207 §2: error responses too


@pytest.mark.parametrize("scope", ["admin.write", "models.read no.such.scope"])
def test_a_consent_answer_oauthlib_refuses_is_audited_and_not_remembered(oauth, web_app, signed_in, scope):
    params = _authorize_params(web_app.client)
    assert oauth.http.get("/oauth/authorize/", params).status_code == 200
    answer = oauth.http.post("/oauth/authorize/", {**params, "scope": scope, "allow": "Allow"})
    assert _query(answer)["error"] == "invalid_scope"
    assert not Consent.objects.exists()
    assert not AuditEvent.objects.filter(kind="consent.granted").exists()
    assert AuditEvent.objects.get(kind="authorize.denied").data["error_code"] == "invalid_scope"


def test_a_consent_answer_naming_an_unknown_client_is_refused_not_a_500(oauth, web_app, signed_in):
    params = _authorize_params(web_app.client, client_id="no-such-client")
    for answer in ("allow", "deny"):
        response = oauth.http.post("/oauth/authorize/", {**params, answer: answer})
        assert response.status_code == 400
        assert "Location" not in response
    assert AuditEvent.objects.filter(kind="authorize.denied", data__error_code="invalid_request").count() == 2


@pytest.mark.parametrize(
    "changes",
    [
        {"code_challenge": "A" * 42},
        {"code_challenge": "A" * 44},
        {"code_challenge": "A" * 129},  # longer than the grant's column: a 500 on PostgreSQL
        {"code_challenge": "A" * 42 + "="},
        {"code_challenge": "A" * 42 + "+"},
        {"code_challenge_method": "plain"},
        {"code_challenge_method": "S512"},
        {"nonce": "n" * 256},  # longer than the grant's column: a 500 on PostgreSQL
    ],
)
def test_a_malformed_pkce_challenge_or_nonce_is_redirected_invalid_request(
    oauth, web_app, signed_in, changes
):
    params = _authorize_params(web_app.client, **changes)
    query = _query(oauth.http.get("/oauth/authorize/", params))
    assert query["error"] == "invalid_request"
    assert query["state"] == "s"
    # the consent form's hidden fields are the user's to change: its answer is checked the same way
    answer = oauth.http.post("/oauth/authorize/", {**params, "allow": "Allow"})
    assert _query(answer)["error"] == "invalid_request"
    assert not Grant.objects.exists()
    assert AuditEvent.objects.filter(kind="authorize.denied").count() == 2
    assert not AuditEvent.objects.filter(kind="consent.granted").exists()


@pytest.mark.parametrize(
    "name", ["nonce", "resource", "state", "prompt", "max_age", "login_hint", "acr_values", "x_extension"]
)
@pytest.mark.parametrize("consent", ["remembered", "asked"])
def test_a_nul_byte_in_any_authorization_parameter_is_redirected_invalid_request_not_a_500(
    oauth, web_app, signed_in, name, consent
):
    # PostgreSQL text and jsonb cannot hold a NUL: a nonce or a resource stored on the grant was a 500
    value = settings.PORTCULLIS_AUDIENCE + "\x00" if name == "resource" else "a\x00b"
    if consent == "remembered":
        params = _remembered(oauth, web_app, **{name: value})
    else:
        params = _authorize_params(web_app.client, **{name: value})
    query = _query(oauth.http.get("/oauth/authorize/", params))
    assert query["error"] == "invalid_request"
    assert query["state"] == params["state"]
    assert "code" not in query
    if consent == "asked":  # the consent form posted anyway (to the request's URL, as the page does)
        answer = oauth.http.post(f"/oauth/authorize/?{urlencode(params)}", {**params, "allow": "Allow"})
        assert answer.status_code < 500
        assert "code=" not in answer.get("Location", "")
    assert not Grant.objects.exists()
    assert AuditEvent.objects.filter(kind="authorize.denied", data__error_code="invalid_request").exists()


@pytest.mark.parametrize(
    "verifier",
    ["a", "a" * 42, "a" * 129, "a" * 42 + " ", "a" * 42 + "+", "a" * 42 + "\u00e4", "a" * 42 + "/"],
)
def test_a_code_verifier_outside_rfc7636_is_invalid_grant_even_when_it_hashes_right(
    oauth, web_app, signed_in, verifier
):
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    code = oauth.code_from(oauth.authorize(web_app.client, challenge=challenge))
    response = oauth.code_exchange(web_app, code, verifier)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"
    assert AuditEvent.objects.get(kind="token.denied").data["error_code"] == "invalid_grant"
    assert not AccessToken.objects.exists()


@pytest.mark.parametrize("verifier", ["a" * 43, "a" * 128, "aZ09-._~" * 6])
def test_a_code_verifier_of_43_to_128_unreserved_characters_redeems_its_code(
    oauth, web_app, signed_in, verifier
):
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    code = oauth.code_from(oauth.authorize(web_app.client, challenge=challenge))
    assert oauth.code_exchange(web_app, code, verifier).status_code == 200


def _signed_in_ago(client, seconds: int) -> None:
    from authserver.models import AUTH_TIME_SESSION_KEY

    session = client.session
    session[AUTH_TIME_SESSION_KEY] -= seconds
    session.save()


def _login_next(response) -> dict[str, list[str]]:
    assert response.status_code == 302, response.content
    location = urlsplit(response["Location"])
    assert location.path == settings.LOGIN_URL
    return parse_qs(urlsplit(parse_qs(location.query)["next"][0]).query)


def _next_url(response) -> str:
    assert response.status_code == 302, response.content
    return parse_qs(urlsplit(response["Location"]).query)["next"][0]


@pytest.mark.parametrize("extra", [{"prompt": "login"}, {"max_age": "60"}, {"max_age": "0"}])
def test_prompt_login_and_an_exceeded_max_age_make_a_signed_in_user_sign_in_again(
    client, web_app, signed_in, extra
):
    _signed_in_ago(client, 120)
    response = client.get("/oauth/authorize/", _authorize_params(web_app.client, **extra))
    following = _login_next(response)
    assert "prompt" not in following  # satisfied by the sign-in it leads to: kept, it would loop
    assert "max_age" not in following
    assert following["client_id"] == [web_app.client.client_id]
    assert "sign_in_after" in following
    # Not signed out: a GET from any page must not end the session (logout CSRF); the sign-in page asks
    assert client.session["_auth_user_id"] == str(signed_in.pk)
    page = client.get(response["Location"])
    assert page.status_code == 200
    assert "Sign in again" in page.content.decode()
    # Coming back without signing in (the next URL typed in) is sent to sign in again
    assert urlsplit(client.get(_next_url(response))["Location"]).path == settings.LOGIN_URL
    # Signing in on that page satisfies it: the consent page
    signed = client.post(
        settings.LOGIN_URL,
        {"username": "alice", "password": "correct horse battery", "next": _next_url(response)},
    )
    assert signed.status_code == 302
    assert signed["Location"] == _next_url(response)
    assert client.get(signed["Location"]).status_code == 200


def test_a_sign_in_after_marker_this_server_did_not_sign_asks_for_a_sign_in(client, web_app, signed_in):
    assert client.get("/oauth/authorize/", _authorize_params(web_app.client)).status_code == 200
    forged = _authorize_params(web_app.client, sign_in_after="1:forged")
    response = client.get("/oauth/authorize/", forged)
    assert _login_next(response)["sign_in_after"] != ["1:forged"]
    assert client.session["_auth_user_id"] == str(signed_in.pk)


def test_a_consent_posted_before_the_new_sign_in_issues_no_code(client, web_app, signed_in):
    _signed_in_ago(client, 120)
    following = _next_url(client.get("/oauth/authorize/", _authorize_params(web_app.client, prompt="login")))
    form = {**{k: v[0] for k, v in parse_qs(urlsplit(following).query).items()}, "allow": "Allow"}
    answer = client.post(following, form)
    assert urlsplit(answer["Location"]).path == settings.LOGIN_URL
    assert not Grant.objects.exists()


def test_prompt_login_with_consent_still_shows_the_consent_page_after_the_sign_in(oauth, web_app, signed_in):
    _tokens(oauth, web_app, scope="models.read")  # consent remembered: without prompt=consent, no page
    params = _authorize_params(web_app.client, scope="models.read", prompt="login consent")
    following = _login_next(oauth.http.get("/oauth/authorize/", params))
    assert following["prompt"] == ["consent"]


def test_the_sign_in_page_still_sends_a_signed_in_user_on_to_other_pages(client, signed_in):
    response = client.get(settings.LOGIN_URL, {"next": "/oauth/authorize/?client_id=x"})
    assert response.status_code == 302
    assert response["Location"] == "/oauth/authorize/?client_id=x"


@pytest.mark.parametrize("target", ["/accounts/login/", "/accounts/login/?x=1"])
def test_a_next_url_naming_the_sign_in_page_itself_sends_a_signed_in_user_home(client, signed_in, target):
    response = client.get(settings.LOGIN_URL, {"next": target})
    assert response.status_code == 302  # was a 500 (Django's loop check), or a redirect to itself
    assert urlsplit(response["Location"]).path != settings.LOGIN_URL


# long ones within the query's cap (QUERY_MAX): past it, as past int()'s 4,300 digits, the request is refused
@pytest.mark.parametrize("max_age", ["3600", "9" * 3600, "0" * 3600 + "3600"])
def test_a_sign_in_within_max_age_is_enough(client, web_app, signed_in, max_age):
    _signed_in_ago(client, 120)
    response = client.get("/oauth/authorize/", _authorize_params(web_app.client, max_age=max_age))
    assert response.status_code == 200  # the consent page, no new sign-in
    assert "_auth_user_id" in client.session


def test_prompt_none_with_an_exceeded_max_age_is_login_required(client, web_app, signed_in):
    _signed_in_ago(client, 120)
    query = _query(
        client.get("/oauth/authorize/", _authorize_params(web_app.client, prompt="none", max_age="60"))
    )
    assert query["error"] == "login_required"
    assert query["state"] == "s"
    assert "_auth_user_id" in client.session  # prompt=none never signs anyone out


def test_a_signed_out_user_with_max_age_signs_in_once(client, web_app):
    following = _login_next(client.get("/oauth/authorize/", _authorize_params(web_app.client, max_age="0")))
    assert "max_age" not in following


def test_the_id_token_says_when_this_session_signed_in_and_a_refresh_keeps_it(oauth, web_app, signed_in):
    from authserver.models import AUTH_TIME_SESSION_KEY

    _signed_in_ago(oauth.http, 3600)
    session_sign_in = oauth.http.session[AUTH_TIME_SESSION_KEY]
    signed_in.last_login = timezone.now()  # a later sign-in on another device: DOT's auth_time
    signed_in.save(update_fields=["last_login"])
    _c, _v, tokens = _tokens(oauth, web_app, scope="openid models.read offline_access")
    assert _claims(tokens["id_token"])["auth_time"] == session_sign_in  # OIDC Core §2
    auth = (web_app.client.client_id, web_app.client_secret)
    refresh_token = tokens["refresh_token"]
    for _ in range(2):  # OIDC Core §12.2: the original sign-in, through every rotation
        forged = {"grant_type": "refresh_token", "refresh_token": refresh_token, "auth_time": "1"}
        refreshed = oauth.token(forged, auth).json()  # a client's own auth_time parameter changes nothing
        assert _claims(refreshed["id_token"])["auth_time"] == session_sign_in
        refresh_token = refreshed["refresh_token"]


def _code_without_redirect_uri_exchanged(oauth, web_app, params: dict[str, str], verifier: str, remembered):
    if remembered:  # the remembered-consent path answers the GET itself
        answer = oauth.http.get("/oauth/authorize/", params)
    else:  # the consent form's own fields, posted back to the page's URL, query included, as a browser does
        page = oauth.http.get("/oauth/authorize/", params)
        assert page.status_code == 200
        form = dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)"', page.content.decode()))
        assert form["redirect_uri"] == REDIRECT_URI  # filled in, named by the request or not
        answer = oauth.http.post(f"/oauth/authorize/?{urlencode(params)}", {**form, "allow": "Allow"})
    data = {"grant_type": "authorization_code", "code": oauth.code_from(answer), "code_verifier": verifier}
    return oauth.token(data, (web_app.client.client_id, web_app.client_secret))


@pytest.mark.parametrize("remembered", [False, True])
def test_a_token_request_names_the_redirect_uri_if_the_authorization_request_did(
    oauth, web_app, signed_in, remembered
):
    if remembered:
        _tokens(oauth, web_app, scope="models.read")
    verifier, challenge = pkce_pair()
    params = _authorize_params(web_app.client, code_challenge=challenge, scope="models.read")
    if not remembered:
        params["prompt"] = "consent"  # the page again for the second code
    refused = _code_without_redirect_uri_exchanged(oauth, web_app, params, verifier, remembered)
    assert refused.status_code == 400  # RFC 6749 §4.1.3
    assert refused.json()["error"] == "invalid_request"
    assert AuditEvent.objects.filter(kind="token.denied").exists()
    verifier, params["code_challenge"] = pkce_pair()
    if remembered:
        named = oauth.code_from(oauth.http.get("/oauth/authorize/", params))
    else:
        named = oauth.code_from(
            oauth.http.post(f"/oauth/authorize/?{urlencode(params)}", {**params, "allow": "Allow"})
        )
    assert oauth.code_exchange(web_app, named, verifier).status_code == 200  # named at both ends
    del params["redirect_uri"]  # not named at either end: the client's only URI, as before
    verifier, params["code_challenge"] = pkce_pair()
    accepted = _code_without_redirect_uri_exchanged(oauth, web_app, params, verifier, remembered)
    assert accepted.status_code == 200, accepted.content


def _code_request(reg, *, scope: str = "models.read", **extra: str) -> dict[str, str]:
    """An authorization request's parameters, valid but for what ``extra`` adds."""
    _v, challenge = pkce_pair()
    return {
        "response_type": "code",
        "client_id": reg.client.client_id,
        "redirect_uri": REDIRECT_URI,
        "scope": scope,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        **extra,
    }


@pytest.mark.parametrize("extra", ["x=%zz", "state=%zz", "x=["])
@pytest.mark.parametrize("who", ["signed in", "anonymous"])
def test_an_authorization_request_oauthlib_cannot_read_is_a_400_page_audited_not_a_500(
    client, web_app, alice, extra, who
):
    from django.test import Client as DjangoClient

    http = DjangoClient(raise_request_exception=False)
    if who == "signed in":
        http.force_login(alice)
    response = http.get(f"/oauth/authorize/?{urlencode(_code_request(web_app))}&{extra}")
    assert response.status_code == 400
    assert response["Content-Type"].startswith("text/html")
    assert b"The query string is not x-www-form-urlencoded" in response.content
    assert "Location" not in response
    assert AuditEvent.objects.get(kind="authorize.denied").data["error_code"] == "invalid_request"


@pytest.mark.parametrize("who", ["signed in", "anonymous"])
def test_prompt_create_is_an_audited_400_page_not_a_bare_json_body(client, web_app, alice, who):
    if who == "signed in":
        client.force_login(alice)
    response = client.get("/oauth/authorize/", _code_request(web_app, scope="openid", prompt="create"))
    assert response.status_code == 400
    assert response["Content-Type"].startswith("text/html")
    assert b"prompt=create is not supported" in response.content
    assert AuditEvent.objects.get(kind="authorize.denied").data["error_code"] == "invalid_request"


def test_userinfo_with_a_query_string_oauthlib_cannot_read_is_an_rfc_6750_invalid_request(
    oauth, web_app, signed_in
):
    from django.test import Client as DjangoClient

    _code, _verifier, tokens = _tokens(oauth, web_app, "openid models.read")
    http = DjangoClient(raise_request_exception=False)
    response = http.get("/oauth/userinfo/?x=%zz", HTTP_AUTHORIZATION="Bearer " + tokens["access_token"])
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert response["WWW-Authenticate"].startswith('Bearer error="invalid_request"')
    assert AuditEvent.objects.get(kind="userinfo.denied").data["error_code"] == "invalid_request"


def test_an_authorization_request_longer_than_any_sign_in_redirect_takes_is_an_audited_400_page(
    client, web_app, caplog
):
    # signed out, it went to the sign-in page with itself as ``next``, which Django refused past 16,384
    # characters: a bare 400 page, unaudited, and an error logged for each such link
    response = client.get("/oauth/authorize/", _authorize_params(web_app.client, nonce="n" * 5000))
    assert response.status_code == 400
    assert b"The query string is longer than 4096 characters" in response.content
    assert AuditEvent.objects.get(kind="authorize.denied").data["error_code"] == "invalid_request"
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


@pytest.mark.parametrize("claims", ["nope", "[1]", '"userinfo"', "{"])
def test_a_claims_parameter_that_is_no_json_object_is_redirected_invalid_request(
    client, web_app, signed_in, claims
):
    # oauthlib's own refusal named no request: DOT redirected to a bare "?error=", which Django refused (a
    # 400 page and an error logged), and the client never heard
    query = _query(client.get("/oauth/authorize/", _authorize_params(web_app.client, claims=claims)))
    assert query["error"] == "invalid_request"
    assert query["state"] == "s"
    assert "claims" in query["error_description"]
    assert AuditEvent.objects.get(kind="authorize.denied").data["error_code"] == "invalid_request"
    empty = client.get("/oauth/authorize/", _authorize_params(web_app.client, claims=""))
    assert empty.status_code == 200  # none asked for: the consent page, as oauthlib passes it over


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data", b"x"),  # no boundary
        ("application/x-www-form-urlencoded", "&".join(f"f{i}=1" for i in range(5000)).encode()),  # too many
    ],
)
def test_a_userinfo_post_whose_body_cannot_be_read_is_an_audited_invalid_request(
    oauth, web_app, signed_in, content_type, body
):
    from django.test import Client as DjangoClient

    _code, _verifier, tokens = _tokens(oauth, web_app, "openid models.read")
    http = DjangoClient(raise_request_exception=False)
    response = http.post(
        "/oauth/userinfo/",
        body,
        content_type=content_type,
        HTTP_AUTHORIZATION="Bearer " + tokens["access_token"],
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert AuditEvent.objects.get(kind="userinfo.denied").data["error_code"] == "invalid_request"


def _refresh(oauth, reg, refresh_token, **extra):
    body = {"grant_type": "refresh_token", "refresh_token": refresh_token, **extra}
    return oauth.token(body, (reg.client.client_id, reg.client_secret))


def test_a_scope_taken_from_the_client_revokes_the_tokens_carrying_it_and_is_not_renewed_by_a_refresh(
    oauth, web_app, signed_in
):
    # oauthlib's refresh grant never asks validate_scopes: a removed scope lived on in every refreshed token
    from authserver.services import client_update

    _c, _v, live = _tokens(oauth, web_app)  # models.read completions offline_access
    _c, _v, lapsed = _tokens(oauth, web_app)
    _c, _v, narrow = _tokens(oauth, web_app, scope="models.read offline_access")
    AccessToken.objects.filter(jti=jwt_jti(lapsed["access_token"])).update(expires=timezone.now())
    client_update(
        client=web_app.client, actor="user:root", allowed_scopes="models.read offline_access openid"
    )
    carrying = jwt_jti(live["access_token"])
    assert not AccessToken.objects.filter(jti=carrying).exists()  # revoked at once, and recorded
    assert RevokedAccessToken.objects.filter(jti=carrying).exists()
    assert AccessToken.objects.filter(jti=jwt_jti(narrow["access_token"])).exists()  # it had no completions
    event = AuditEvent.objects.filter(kind="token.revoked").latest("seq")
    assert event.data["scopes"] == ["completions", "profile"]
    assert (event.data["tokens_revoked"], event.data["refreshes_revoked"]) == (1, 0)
    # DOT refuses a refresh token whose access token was deleted: that grant is over, its user asks again
    assert _refresh(oauth, web_app, live["refresh_token"]).json()["error"] == "invalid_grant"

    refreshed = _refresh(oauth, web_app, lapsed["refresh_token"])  # its access token had expired
    assert refreshed.status_code == 200, refreshed.content
    assert _claims(refreshed.json()["access_token"])["scope"].split() == ["models.read", "offline_access"]
    asked = _refresh(oauth, web_app, refreshed.json()["refresh_token"], scope="models.read completions")
    assert asked.status_code == 400
    assert asked.json()["error"] == "invalid_scope"


def test_offline_access_taken_from_the_client_ends_its_refresh_tokens_even_past_the_services(
    oauth, web_app, signed_in
):
    from authserver.services import client_update

    _c, _v, first = _tokens(oauth, web_app)
    _c, _v, second = _tokens(oauth, web_app)
    client_update(client=web_app.client, actor="user:root", allowed_scopes="models.read completions")
    assert not RefreshToken.objects.filter(application=web_app.client, revoked__isnull=True).exists()
    assert _refresh(oauth, web_app, first["refresh_token"]).json()["error"] == "invalid_grant"

    Client.objects.filter(pk=web_app.client.pk).update(allowed_scopes=SCOPES)  # given back: a new grant
    _c, _v, third = _tokens(oauth, web_app)
    Client.objects.filter(pk=web_app.client.pk).update(allowed_scopes="models.read")  # as /admin/ saves
    response = _refresh(oauth, web_app, third["refresh_token"])
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"
    assert second["refresh_token"] != third["refresh_token"]


def jwt_jti(token: str) -> str:
    return _claims(token)["jti"]


# ---------------------------------------------------------------- authorization requests (RFC 6749, OIDC)


def _refused_everywhere(oauth, web_app, consent: str, **changes) -> dict[str, str]:
    """Send an authorization request with ``changes`` (remembered consent: it would give a code at once;
    asked: the page, then the consent form posted anyway); check it is redirected as an error in the query,
    with ``iss``, and issues no code; return the redirect's query."""
    if consent == "remembered":
        params = _remembered(oauth, web_app, **changes)
    else:
        params = _authorize_params(web_app.client, **changes)
    redirect = oauth.http.get("/oauth/authorize/", params)
    assert "#" not in redirect["Location"]
    query = _query(redirect)
    assert query["state"] == params["state"]
    assert query["iss"] == settings.PORTCULLIS_ISSUER  # RFC 9207, whole
    assert "code" not in query
    if consent == "asked":
        answer = oauth.http.post(
            f"/oauth/authorize/?{urlencode(params, doseq=True)}", {**params, "allow": "Allow"}
        )
        assert "#" not in answer["Location"]
        assert _query(answer)["error"] == query["error"]
    assert not Grant.objects.exists()
    return query


@pytest.mark.parametrize("mode", ["fragment", "form_post", "nonsense"])
@pytest.mark.parametrize("consent", ["remembered", "asked"])
def test_a_response_mode_other_than_query_is_redirected_invalid_request_in_the_query(
    oauth, web_app, signed_in, mode, consent
):
    # The metadata says response_modes_supported ["query"]; oauthlib honoured fragment, and the RFC 9207
    # iss was then appended after the fragment: "http://...?iss=http://...", which a client MUST reject
    query = _refused_everywhere(oauth, web_app, consent, response_mode=mode)
    assert query["error"] == "invalid_request"
    assert "response_mode" in query["error_description"]
    denied = AuditEvent.objects.filter(kind="authorize.denied").values_list("data__error_code", flat=True)
    assert set(denied) == {"invalid_request"}


def test_response_mode_query_is_served(oauth, web_app, signed_in):
    params = _remembered(oauth, web_app, response_mode="query")
    assert "code" in _query(oauth.http.get("/oauth/authorize/", params))


@pytest.mark.parametrize(
    ("name", "error"),
    [("request", "request_not_supported"), ("request_uri", "request_uri_not_supported")],
)
@pytest.mark.parametrize("consent", ["remembered", "asked"])
def test_a_request_object_is_refused_as_not_supported_not_ignored(
    oauth, web_app, signed_in, name, error, consent
):
    # OIDC Core §6.1, §6.2: an OP that does not support the parameter MUST say so; the code was issued
    # for the unsigned parameters beside it
    value = "https://rp.example/request.jwt" if name == "request_uri" else "eyJhbGciOiJub25lIn0.e30."
    query = _refused_everywhere(oauth, web_app, consent, **{name: value})
    assert query["error"] == error
    assert AuditEvent.objects.filter(kind="authorize.denied", data__error_code=error).exists()


def test_openid_discovery_says_request_objects_are_not_supported_and_lists_prompt_consent(client):
    oidc = client.get("/.well-known/openid-configuration").json()
    assert oidc["request_parameter_supported"] is False  # absent, OIDC Discovery §3 reads it as true
    assert oidc["request_uri_parameter_supported"] is False
    assert {"none", "login", "consent"} <= set(oidc["prompt_values_supported"])
    assert "create" not in oidc["prompt_values_supported"]  # refused (prompt=create)


@pytest.mark.parametrize("name", ["code_challenge", "nonce", "prompt", "max_age", "response_mode", "x_ext"])
@pytest.mark.parametrize("consent", ["remembered", "asked"])
def test_a_repeated_authorization_parameter_is_redirected_invalid_request(
    oauth, web_app, signed_in, name, consent
):
    # RFC 6749 §3.1: parameters "MUST NOT be included more than once"; oauthlib checked five of them, and
    # a code was issued for whichever of two challenges or nonces it read
    _v, other = pkce_pair()
    values = {"code_challenge": [other, other], "max_age": ["600", "600"], "response_mode": ["query"] * 2}
    query = _refused_everywhere(oauth, web_app, consent, **{name: values.get(name, ["a", "b"])})
    assert query["error"] == "invalid_request"
    assert name in query["error_description"]
    assert AuditEvent.objects.filter(kind="authorize.denied", data__error_code="invalid_request").exists()


def test_a_repeated_resource_is_still_taken(oauth, web_app, signed_in):
    # RFC 8707 §2: resource may appear more than once, one per resource
    gateway = settings.PORTCULLIS_AUDIENCE
    params = {**_remembered(oauth, web_app), "resource": [gateway, gateway]}
    assert "code" in _query(oauth.http.get("/oauth/authorize/", params))


def test_a_redirect_uri_other_than_the_authorization_requests_is_invalid_grant(oauth, web_app, signed_in):
    # RFC 6749 §5.2: invalid_grant is a grant that "does not match the redirection URI used in the
    # authorization request" (oauthlib: invalid_request)
    verifier, challenge = pkce_pair()
    code = oauth.code_from(oauth.authorize(web_app.client, challenge=challenge))
    refused = oauth.code_exchange(web_app, code, verifier, redirect_uri=REDIRECT_URI + "x")
    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_grant"
    assert AuditEvent.objects.get(kind="token.denied").data["error_code"] == "invalid_grant"
    assert oauth.code_exchange(web_app, code, verifier).status_code == 200  # refused before it was used
