"""Errors no view answered are JSON on the OAuth endpoints and the admin API, and Django's pages elsewhere;
the request id in the body matches the one in the header and in the log."""

from __future__ import annotations

import logging

import pytest
from cryptography.fernet import Fernet
from django.test import Client as HttpClient

from authserver.selectors import active_key_cache_clear, private_jwk_for, private_signing_key_for
from tests.console.test_api import admin_app, admin_scopes_enabled, bearer  # noqa: F401 (fixtures)

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize("path", ["/oauth/no-such-endpoint", "/.well-known/no-such-document"])
def test_an_unknown_oauth_path_is_an_rfc_6749_error(client, path):
    response = client.get(path, HTTP_X_REQUEST_ID="req-404-oauth")
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert response["Cache-Control"] == "no-store"
    assert response.json() == {
        "error": "not_found",
        "error_description": "No endpoint answers at this path (request id req-404-oauth)",
    }


def test_an_unknown_api_path_is_the_admin_apis_error_shape(client):
    # under /api/admin/ the API's router answers (401 without a token); beside it, nothing does
    response = client.get("/api/no-such-api/", HTTP_X_REQUEST_ID="req-404-api")
    assert response.status_code == 404
    assert response.json() == {"detail": "Not found.", "request_id": "req-404-api"}


@pytest.mark.parametrize("path", ["/console/no-such-page/", "/oauth/device/confirm/no-such-client/"])
def test_a_persons_page_keeps_djangos_html_404(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


def test_a_disallowed_host_at_the_token_endpoint_is_an_invalid_request(client):
    response = client.post("/oauth/token/", {"grant_type": "client_credentials"}, HTTP_HOST="evil.example")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


def test_a_token_endpoint_that_cannot_sign_answers_a_json_server_error_and_logs_why(
    make_client, oauth, settings, caplog
):
    reg = make_client()
    assert oauth.client_credentials(reg).status_code == 200
    # a real way to a 500: the key-encryption key changed with the previous value not kept
    settings.PORTCULLIS_KEY_ENCRYPTION_KEY = Fernet.generate_key().decode()
    active_key_cache_clear()
    private_jwk_for.cache_clear()
    private_signing_key_for.cache_clear()
    http = HttpClient(raise_request_exception=False, HTTP_X_REQUEST_ID="req-500-token")
    with caplog.at_level(logging.ERROR, logger="django.request"):
        response = http.post(
            "/oauth/token/",
            {
                "grant_type": "client_credentials",
                "client_id": reg.client.client_id,
                "client_secret": reg.client_secret,
            },
        )
    assert response.status_code == 500
    assert response["Cache-Control"] == "no-store"
    assert response["X-Request-ID"] == "req-500-token"
    assert response.json() == {
        "error": "server_error",
        "error_description": "The server met an unexpected condition (request id req-500-token)",
    }
    logged = [record for record in caplog.records if record.name == "django.request"]
    assert logged
    assert "cannot be decrypted" in str(logged[-1].exc_info[1])  # the cause is in the log, not the answer
    assert reg.client_secret not in caplog.text


def test_an_admin_api_failure_answers_json_with_the_request_id(bearer, monkeypatch):  # noqa: F811
    api = bearer()
    api.raise_request_exception = False

    def broken(**filters: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr("console.api.views.audit_events_filter", broken)
    response = api.get("/api/admin/audit-events/", HTTP_X_REQUEST_ID="req-500-api")
    assert response.status_code == 500
    assert response.json() == {"detail": "Server error.", "request_id": "req-500-api"}
    assert response["Cache-Control"] == "no-store"


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("post", "/.well-known/jwks.json", "GET, HEAD"),
        ("post", "/.well-known/oauth-protected-resource", "GET, HEAD"),
        ("post", "/.well-known/openid-configuration", "GET, HEAD, OPTIONS"),
        ("put", "/oauth/userinfo/", "GET, POST, HEAD, OPTIONS"),
    ],
)
def test_a_method_an_oauth_view_does_not_take_is_a_json_405_keeping_allow(client, method, path, allow):
    response = getattr(client, method)(path)
    assert response.status_code == 405
    assert response.json()["error"] == "invalid_request"
    assert response["Cache-Control"] == "no-store"
    assert {m.strip() for m in response["Allow"].split(",")} == {m.strip() for m in allow.split(",")}


@pytest.mark.parametrize("path", ["/.well-known/jwks.json", "/.well-known/oauth-protected-resource"])
def test_the_metadata_documents_answer_head(client, path):
    assert client.head(path).status_code == 200


def test_a_path_like_the_gateways_that_django_gets_is_an_openai_shaped_404(client):
    response = client.get("/V1/models")
    assert response.status_code == 404
    assert response.json() == {
        "error": {
            "message": "No endpoint answers at this path.",
            "type": "not_found_error",  # as the gateway's own 404 (SECURITY.md's error contract)
            "param": None,
            "code": "not_found",
        }
    }
