"""The token and revocation endpoints let a page of an origin its client lists read every answer (CORS): the
first tokens, a refresh's, a revocation's, and the errors that tell it to sign in again."""

from __future__ import annotations

import pytest

from tests.conftest import basic_auth

pytestmark = pytest.mark.django_db

APP = "https://app.example.com"


@pytest.fixture
def spa(make_client):
    scopes = "models.read offline_access"
    return make_client(grants=("authorization-code",), public=True, scopes=scopes, allowed_origins=[APP])


def first_tokens(oauth, reg, alice, origin: str | None):
    oauth.http.force_login(alice)
    headers = {"HTTP_ORIGIN": origin} if origin else {}
    return oauth.code_tokens(reg, "models.read offline_access", **headers)  # a public client: its client_id


def test_a_page_of_a_listed_origin_reads_the_exchange_the_refresh_the_errors_and_the_revocation(
    oauth, spa, alice
):
    exchanged = first_tokens(oauth, spa, alice, APP)
    assert exchanged.status_code == 200
    assert exchanged["Access-Control-Allow-Origin"] == APP
    assert "Origin" in exchanged["Vary"]
    refresh = exchanged.json()["refresh_token"]
    form = {"grant_type": "refresh_token", "refresh_token": refresh, "client_id": spa.client.client_id}
    refreshed = oauth.http.post("/oauth/token/", form, HTTP_ORIGIN=APP)
    assert refreshed.status_code == 200
    assert refreshed["Access-Control-Allow-Origin"] == APP  # oauthlib gives a refresh none
    reused = oauth.http.post("/oauth/token/", form, HTTP_ORIGIN=APP)
    assert reused.status_code == 400
    assert reused.json()["error"] == "invalid_grant"
    assert reused["Access-Control-Allow-Origin"] == APP  # the page may read that it must sign in again
    revoked = oauth.http.post(
        "/oauth/revoke/",
        {"token": refreshed.json()["refresh_token"], "client_id": spa.client.client_id},
        HTTP_ORIGIN=APP,
    )
    assert revoked.status_code == 200
    assert revoked["Access-Control-Allow-Origin"] == APP


@pytest.mark.parametrize("origin", ["https://evil.example", APP + "/", "https://APP.example.com", "null"])
def test_a_page_of_an_origin_the_client_does_not_list_reads_nothing(oauth, spa, alice, origin):
    exchanged = first_tokens(oauth, spa, alice, origin)
    assert exchanged.status_code == 200  # not refused: the page cannot read it (DOT's own check took "/")
    assert not exchanged.has_header("Access-Control-Allow-Origin")
    assert "Origin" in exchanged["Vary"]
    refused = oauth.http.post(
        "/oauth/token/",
        {"grant_type": "refresh_token", "refresh_token": "nope", "client_id": spa.client.client_id},
        HTTP_ORIGIN=origin,
    )
    assert refused.status_code == 400
    assert not refused.has_header("Access-Control-Allow-Origin")


def test_the_client_named_by_basic_credentials_is_the_one_whose_origins_count(oauth, make_client):
    listed = make_client(allowed_origins=[APP])
    unlisted = make_client()
    for reg, allowed in ((listed, True), (unlisted, False)):
        answer = oauth.http.post(
            "/oauth/token/",
            {"grant_type": "client_credentials", "scope": "models.read"},
            HTTP_AUTHORIZATION=basic_auth(reg.client.client_id, reg.client_secret),
            HTTP_ORIGIN=APP,
        )
        assert answer.status_code == 200
        assert answer.has_header("Access-Control-Allow-Origin") is allowed
    wrong_secret = oauth.http.post(
        "/oauth/token/",
        {"grant_type": "client_credentials"},
        HTTP_AUTHORIZATION=basic_auth(listed.client.client_id, "wrong"),
        HTTP_ORIGIN=APP,
    )
    assert wrong_secret.status_code == 401
    assert wrong_secret["Access-Control-Allow-Origin"] == APP  # what it was answered, and no more


def test_a_request_without_an_origin_gets_no_cors_headers(oauth, spa, alice):
    exchanged = first_tokens(oauth, spa, alice, None)
    assert exchanged.status_code == 200
    assert not exchanged.has_header("Access-Control-Allow-Origin")
    assert "Origin" not in exchanged.get("Vary", "")


def test_a_client_id_holding_nul_from_a_page_is_refused_as_before_not_a_500(oauth):
    # the CORS lookup comes after the endpoint answered: PostgreSQL cannot take a NUL in a text parameter
    body = oauth.http.post(
        "/oauth/token/", {"grant_type": "client_credentials", "client_id": "a\x00b"}, HTTP_ORIGIN=APP
    )
    assert body.status_code == 400
    assert not body.has_header("Access-Control-Allow-Origin")
    for path in ("/oauth/token/", "/oauth/revoke/"):
        basic = oauth.http.post(
            path,
            {"grant_type": "client_credentials", "token": "t"},
            HTTP_AUTHORIZATION=basic_auth("a\x00", "x"),
            HTTP_ORIGIN=APP,
        )
        assert basic.status_code == 401, (path, basic.content)
        assert not basic.has_header("Access-Control-Allow-Origin")


@pytest.mark.parametrize("dev", ["http://127.0.0.1:5173", "http://[::1]:3000"])
def test_a_development_page_on_a_loopback_ip_reads_its_tokens_over_http(oauth, make_client, alice, dev):
    # An SPA's development server: http, as its loopback redirect URIs may be (RFC 8252); oauthlib would
    # give CORS to https pages alone
    scopes = "models.read offline_access"
    spa = make_client(grants=("authorization-code",), public=True, scopes=scopes, allowed_origins=[dev])
    exchanged = first_tokens(oauth, spa, alice, dev)
    assert exchanged.status_code == 200
    assert exchanged["Access-Control-Allow-Origin"] == dev
    other_port = first_tokens(oauth, spa, alice, dev.rsplit(":", 1)[0] + ":8080")
    assert not other_port.has_header("Access-Control-Allow-Origin")  # an origin is its port too


def test_a_clients_own_check_names_a_bad_origin_alone_beside_a_loopback_one(make_client):
    from django.core.exceptions import ValidationError

    client = make_client(grants=("authorization-code",), public=True, scopes="models.read").client
    client.allowed_origins = "http://127.0.0.1:5173 ftp://x.example"  # as the Django admin would save it
    with pytest.raises(ValidationError) as refused:
        client.full_clean(exclude=["client_secret"])
    # DOT's own check (https alone) would name the loopback origin too
    assert refused.value.message_dict["allowed_origins"] == [
        "ftp://x.example: not a web origin; write https://host or https://host:port"
    ]
