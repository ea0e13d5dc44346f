"""End to end over HTTP against uvicorn: authorization code + PKCE through the real login and consent
forms with authlib, refresh, introspection and revocation; client credentials; the device flow."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
import requests
from authlib.common.security import generate_token
from authlib.integrations.requests_client import OAuth2Session
from django.contrib.auth import get_user_model

from audit.models import AuditEvent
from authserver.services import client_register

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

REDIRECT = "https://app.example.com/callback"


class FormParser(HTMLParser):
    """Collect the inputs of the first form on a page."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "input" and a.get("name") and a.get("type") in {"hidden", None, "text"}:
            self.fields[a["name"] or ""] = a.get("value") or ""


def form_fields(html: str) -> dict[str, str]:
    parser = FormParser()
    parser.feed(html)
    return parser.fields


def sign_in_and_allow(browser: requests.Session, authorize_url: str, base: str) -> str:
    """Follow an authorization URL through the login and consent forms; return the redirect."""
    page = browser.get(authorize_url)
    assert "/accounts/login/" in page.url
    fields = form_fields(page.text)
    fields.update({"username": "erin", "password": "a long and good password"})
    consent = browser.post(f"{base}/accounts/login/", data=fields, headers={"Referer": page.url})
    assert "Allow" in consent.text
    assert "E2E app" in consent.text
    allow = form_fields(consent.text)
    allow["allow"] = "Allow"
    answer = browser.post(consent.url, data=allow, headers={"Referer": consent.url}, allow_redirects=False)
    assert answer.status_code == 302
    return str(answer.headers["Location"])


def test_authorization_code_pkce_refresh_introspect_revoke(server):
    get_user_model().objects.create_user("erin", "erin@example.com", "a long and good password")
    app = client_register(
        name="E2E app",
        grant_types=["authorization-code"],
        redirect_uris=[REDIRECT],
        scopes=["models.read", "completions", "offline_access", "openid"],
    )
    introspector = client_register(name="Gateway", grant_types=["client-credentials"], can_introspect=True)
    meta = requests.get(f"{server.base}/.well-known/oauth-authorization-server", timeout=5).json()

    oauth = OAuth2Session(
        app.client.client_id,
        app.client_secret,
        scope="models.read completions offline_access",
        redirect_uri=REDIRECT,
        code_challenge_method="S256",
    )
    verifier = generate_token(64)
    url, _state = oauth.create_authorization_url(meta["authorization_endpoint"], code_verifier=verifier)
    location = sign_in_and_allow(requests.Session(), url, server.base)
    assert f"iss={requests.utils.quote(server.base, safe='')}" in location
    token = oauth.fetch_token(meta["token_endpoint"], authorization_response=location, code_verifier=verifier)
    assert token["token_type"].lower() == "bearer"
    assert token["refresh_token"]

    refreshed = oauth.refresh_token(meta["token_endpoint"], refresh_token=token["refresh_token"])
    assert refreshed["refresh_token"] != token["refresh_token"]

    auth = (introspector.client.client_id, str(introspector.client_secret))
    info = requests.post(
        meta["introspection_endpoint"], data={"token": refreshed["access_token"]}, auth=auth, timeout=5
    ).json()
    assert info["active"] is True
    assert info["client_id"] == app.client.client_id
    assert info["username"] == "erin"

    revoked = oauth.revoke_token(
        meta["revocation_endpoint"], token=refreshed["refresh_token"], token_type_hint="refresh_token"
    )
    assert revoked.status_code == 200
    info = requests.post(
        meta["introspection_endpoint"], data={"token": refreshed["access_token"]}, auth=auth, timeout=5
    ).json()
    assert info == {"active": False}
    kinds = set(AuditEvent.objects.values_list("kind", flat=True))
    assert {"login.succeeded", "consent.granted", "token.issued", "token.refreshed", "token.revoked"} <= kinds


def test_client_credentials_with_authlib(server):
    svc = client_register(name="Service", grant_types=["client-credentials"])
    session = OAuth2Session(svc.client.client_id, svc.client_secret, scope="models.read completions")
    token = session.fetch_token(f"{server.base}/oauth/token/", grant_type="client_credentials")
    assert token["scope"] == "models.read completions"
    assert token["expires_in"] == 300
    assert "refresh_token" not in token


def test_device_flow_over_http(server):
    get_user_model().objects.create_user("erin", "erin@example.com", "a long and good password")
    device = client_register(name="E2E device", grant_types=["device-code"], public=True)
    started = requests.post(
        f"{server.base}/oauth/device-authorization/",
        data={"client_id": device.client.client_id, "scope": "models.read"},
        timeout=5,
    ).json()
    poll = {
        "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
        "device_code": started["device_code"],
        "client_id": device.client.client_id,
    }
    assert (
        requests.post(f"{server.base}/oauth/token/", data=poll, timeout=5).json()["error"]
        == "authorization_pending"
    )

    browser = requests.Session()
    page = browser.get(started["verification_uri_complete"])
    fields = form_fields(page.text)
    fields.update({"username": "erin", "password": "a long and good password"})
    entry = browser.post(f"{server.base}/accounts/login/", data=fields, headers={"Referer": page.url})
    code_form = form_fields(entry.text)
    code_form["user_code"] = started["user_code"]
    confirm = browser.post(entry.url, data=code_form, headers={"Referer": entry.url})
    assert re.search(r"Allow .*E2E device", confirm.text, re.S)
    answer = form_fields(confirm.text)
    answer["action"] = "accept"
    done = browser.post(confirm.url, data=answer, headers={"Referer": confirm.url})
    assert done.status_code == 200

    token = requests.post(f"{server.base}/oauth/token/", data=poll, timeout=5)
    assert token.status_code == 200, token.text
    assert token.json()["scope"] == "models.read"
