"""The admin REST API: admin-scoped access tokens or a staff session with CSRF, the same services as the
console, audited with the caller as actor, and every doubtful token refused."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from django.test import Client as HttpClient
from django.urls import reverse
from jwcrypto import jwk, jwt

from audit.models import AuditEvent
from authserver.models import AccessToken, Client, SigningKey
from authserver.selectors import signing_key_active
from authserver.services import RegisteredClient, client_create
from console.api.urls import router
from gateway.models import ClientPolicy
from tests.conftest import OAuthDriver
from tests.console.test_access import api_patterns

pytestmark = pytest.mark.django_db

ADMIN_SCOPES = {"admin.read": "Read the admin API", "admin.write": "Change things through the admin API"}


@pytest.fixture
def admin_scopes_enabled(settings: Any) -> None:
    """The authorization server issues admin scopes (the SCOPES lines this issue asks config to add)."""
    scopes = {**settings.SCOPES, **ADMIN_SCOPES}
    settings.SCOPES = scopes
    settings.OAUTH2_PROVIDER = {**settings.OAUTH2_PROVIDER, "SCOPES": scopes}


@pytest.fixture
def admin_app(admin_scopes_enabled: None) -> RegisteredClient:
    return client_create(
        name="Terraform",
        grant_types=["client-credentials"],
        scopes=["admin.read", "admin.write"],
        is_admin_client=True,
        actor="user:root",
    )


@pytest.fixture
def bearer(admin_app: RegisteredClient) -> Callable[[str], HttpClient]:
    """Return an API client holding a fresh admin token with these scopes."""

    def make(scope: str = "admin.read admin.write") -> HttpClient:
        response = OAuthDriver(http=HttpClient()).client_credentials(admin_app, scope)
        assert response.status_code == 200, response.content
        return HttpClient(HTTP_AUTHORIZATION=f"Bearer {response.json()['access_token']}")

    return make


def test_a_read_token_lists_clients_but_cannot_change_anything(bearer, world):
    api = bearer("admin.read")
    response = api.get("/api/admin/clients/")
    assert response.status_code == 200
    names = {c["name"] for c in response.json()["results"]}
    assert {"Acme reports", "Terraform"} <= names
    assert all("client_secret" not in c for c in response.json()["results"])
    denied = api.post(f"/api/admin/clients/{world.app.client.client_id}/disable/")
    assert denied.status_code == 403
    world.app.client.refresh_from_db()
    assert not world.app.client.disabled


def test_a_write_token_creates_a_client_and_gets_its_secret_once_audited_as_the_client(bearer, admin_app):
    api = bearer()
    response = api.post(
        "/api/admin/clients/",
        {
            "name": "CI runner",
            "grant_types": ["client-credentials"],
            "scopes": ["models.read", "completions"],
        },
        content_type="application/json",
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert len(body["client_secret"]) == 128
    assert body["grant_types"] == ["client-credentials"]
    event = AuditEvent.objects.filter(kind="client.created", client_id=body["client_id"]).get()
    assert event.actor == f"client:{admin_app.client.client_id}"
    shown = api.get(f"/api/admin/clients/{body['client_id']}/").json()
    assert "client_secret" not in shown


def test_the_api_refuses_invalid_client_data_with_the_service_messages(bearer):
    response = bearer().post(
        "/api/admin/clients/",
        {"name": "Sneaky", "grant_types": ["client-credentials"], "scopes": ["admin.write"]},
        content_type="application/json",
    )
    assert response.status_code == 400
    assert "admin scopes are only for clients marked administrative" in json.dumps(response.json())
    assert not Client.objects.filter(name="Sneaky").exists()


def test_a_text_longer_than_the_schema_allows_is_refused_though_it_trims_to_fit(bearer):
    # schemathesis found it: DRF checked max_length after trimming whitespace, the schema's maxLength
    # reads the text as sent
    body = {"name": "Padded", "grant_types": ["client-credentials"], "scopes": ["models.read"]}
    response = bearer().post(
        "/api/admin/clients/", {**body, "description": "x" + "\t" * 2000}, content_type="application/json"
    )
    assert response.status_code == 400
    assert "description" in response.json()
    assert not Client.objects.filter(name="Padded").exists()
    fits = bearer().post(
        "/api/admin/clients/", {**body, "description": "x" + " " * 1999}, content_type="application/json"
    )
    assert fits.status_code == 201
    assert Client.objects.get(name="Padded").description == "x"  # trimmed, as before


@pytest.mark.parametrize("uri", ["http://[::1:8080/cb", "https://app.example.com:99999/cb"])
def test_a_redirect_uri_that_cannot_be_parsed_is_a_400_not_a_500(bearer, world, uri):
    api = bearer()
    fields = {"grant_types": ["authorization-code"], "scopes": ["models.read"], "redirect_uris": [uri]}
    created = api.post("/api/admin/clients/", {"name": "Broken", **fields}, content_type="application/json")
    assert created.status_code == 400
    assert "redirect_uris" in created.json()
    assert not Client.objects.filter(name="Broken").exists()
    changed = api.patch(
        f"/api/admin/clients/{world.app.client.client_id}/",
        {"redirect_uris": [uri]},
        content_type="application/json",
    )
    assert changed.status_code == 400
    world.app.client.refresh_from_db()
    assert world.app.client.redirect_uris == "https://acme.example.com/cb"


def test_patch_disable_enable_rotate_and_revoke_through_the_api(bearer, world, admin_app):
    api = bearer()
    cid = world.app.client.client_id
    actor = f"client:{admin_app.client.client_id}"
    patched = api.patch(f"/api/admin/clients/{cid}/", {"name": "Renamed"}, content_type="application/json")
    assert patched.json()["name"] == "Renamed"
    assert AuditEvent.objects.filter(kind="client.changed", client_id=cid).get().actor == actor
    assert (
        api.patch(f"/api/admin/clients/{cid}/", {"public": True}, content_type="application/json").status_code
        == 400
    )
    rotated = api.post(f"/api/admin/clients/{cid}/rotate-secret/")
    assert rotated["Cache-Control"] == "no-store"
    assert len(rotated.json()["client_secret"]) == 128
    revoked = api.post(f"/api/admin/clients/{cid}/revoke-tokens/")
    assert revoked.json() == {"tokens_revoked": 1}
    assert api.post(f"/api/admin/clients/{cid}/disable/").json()["disabled"] is True
    assert api.post(f"/api/admin/clients/{cid}/enable/").json()["disabled"] is False
    kinds = set(AuditEvent.objects.filter(client_id=cid, actor=actor).values_list("kind", flat=True))
    assert {
        "client.changed",
        "client.secret_rotated",
        "token.revoked",
        "client.disabled",
        "client.enabled",
    } <= kinds


def test_policies_are_read_and_set_through_the_api_with_validation(bearer, world):
    api = bearer()
    url = f"/api/admin/clients/{world.app.client.client_id}/policy/"
    assert api.get(url).status_code == 404
    bad = api.put(url, {"allowed_models": ["m1"], "allow_ips": ["nope"]}, content_type="application/json")
    assert bad.status_code == 400
    assert "is not an IP network" in json.dumps(bad.json())
    negative = api.put(url, {"rpm": -5}, content_type="application/json")
    assert negative.status_code == 400
    good = api.put(url, {"allowed_models": ["m1"], "rpm": 30}, content_type="application/json")
    assert good.status_code == 200, good.content
    assert good.json()["rpm"] == 30
    assert ClientPolicy.objects.get(client=world.app.client).allowed_models == ["m1"]
    default = api.put(
        "/api/admin/policies/default/", {"allowed_models": ["m2"]}, content_type="application/json"
    )
    assert default.json()["client_id"] is None
    listed = api.get("/api/admin/policies/").json()["results"]
    assert {p["client_id"] for p in listed} == {None, world.app.client.client_id}


# Every resource the router publishes (clients, policies, tokens, users, audit-events, reports, keys).
LIST_URLS = [f"/api/admin/{prefix}/" for prefix, viewset, _ in router.registry if hasattr(viewset, "list")]


@pytest.mark.parametrize("name", ["limit", "offset"])
@pytest.mark.parametrize("url", LIST_URLS)
def test_a_page_number_too_long_to_be_one_is_a_400_on_every_list_not_a_500(as_admin, url, name):
    before = AuditEvent.objects.count()
    for digits in (13, 5000):  # int() raised a ValueError past 4,300 digits: a 500
        response = as_admin.get(url, {name: "1" * digits})
        assert response.status_code == 400, (digits, response.content[:200])
        assert response.json() == {name: [f"must be a whole number, at least {1 if name == 'limit' else 0}"]}
    assert as_admin.get(url, {name: "1" * 12}).status_code == 200
    assert AuditEvent.objects.count() == before  # a bad page number is the caller's typo, not an event


def test_tokens_are_listed_filtered_and_revoked_one_at_a_time(bearer, world):
    api = bearer()
    listed = api.get(f"/api/admin/tokens/?client_id={world.app.client.client_id}").json()["results"]
    assert [t["jti"] for t in listed] == [str(world.token.jti)]
    assert api.get("/api/admin/tokens/?client_id=unknown").json()["results"] == []
    assert api.delete(f"/api/admin/tokens/{world.token.pk}/").status_code == 204
    assert not AccessToken.objects.filter(pk=world.token.pk).exists()
    assert api.delete(f"/api/admin/tokens/{world.token.pk}/").status_code == 404


def test_users_are_locked_and_unlocked_through_the_api(bearer, world):
    api = bearer()
    assert [u["username"] for u in api.get("/api/admin/users/?q=mall").json()["results"]] == ["mallory"]
    locked = api.post(f"/api/admin/users/{world.user.pk}/lock/")
    assert locked.json()["is_active"] is False
    unlocked = api.post(f"/api/admin/users/{world.user.pk}/unlock/")
    assert unlocked.json()["is_active"] is True
    assert AuditEvent.objects.filter(kind__in=["user.locked", "user.unlocked"]).count() == 2


def test_audit_events_are_filtered_and_bad_filters_are_a_400(bearer, world):
    api = bearer("admin.read")
    events = api.get("/api/admin/audit-events/?kind=consent.").json()["results"]
    assert [e["kind"] for e in events] == ["consent.granted"]
    assert api.get("/api/admin/audit-events/?outcome=maybe").status_code == 400
    assert api.get("/api/admin/audit-events/?since=yesterday").status_code == 400
    paged = api.get("/api/admin/audit-events/?limit=1").json()
    assert len(paged["results"]) == 1
    assert paged["count"] >= 3


def test_reports_are_listed_and_downloaded(bearer, world):
    api = bearer("admin.read")
    listed = api.get("/api/admin/reports/").json()["results"]
    assert listed[0]["filename"] == world.report.filename()
    response = api.get(f"/api/admin/reports/{world.report.pk}/download/")
    assert response.status_code == 200
    assert response["Content-Type"] == "text/csv"
    assert response.content == world.report.content.encode()


def test_keys_are_listed_without_private_parts_and_rotated(bearer, world):
    api = bearer()
    keys = api.get("/api/admin/keys/").json()["results"]
    assert keys[0]["state"] == "active"
    assert "private_key_encrypted" not in keys[0]
    result = api.post(
        "/api/admin/keys/rotate/", {"activate_now": True}, content_type="application/json"
    ).json()
    assert result["activated"] == result["created"]
    activated = SigningKey.objects.filter(kid__in=result["activated"])
    assert {(key.algorithm, key.state) for key in activated} == {("ES256", "active"), ("RS256", "active")}
    assert result["removed"] == result["retired"] == []
    leaked = SigningKey.objects.get(state="active", algorithm="ES256").kid
    revoked = api.post(f"/api/admin/keys/{leaked}/revoke/")
    assert revoked["Cache-Control"] == "no-store"
    assert revoked.json()["removed"] == [leaked]
    assert SigningKey.objects.get(kid=leaked).state == "removed"
    assert api.post(f"/api/admin/keys/{leaked}/revoke/").status_code == 400  # no longer published


def test_every_admin_api_answer_is_no_store_a_new_clients_secret_first(bearer):
    api = bearer()
    created = api.post(
        "/api/admin/clients/",
        {"name": "Batch", "grant_types": ["client-credentials"], "scopes": ["models.read"]},
        content_type="application/json",
    )
    assert created.status_code == 201, created.content
    assert "client_secret" in created.json()
    assert created["Cache-Control"] == "no-store"
    for path in ("/api/admin/clients/", "/api/admin/audit-events/", "/api/admin/nothing-here/"):
        assert api.get(path)["Cache-Control"] == "no-store", path


def test_a_token_of_a_client_that_is_not_administrative_is_refused(admin_scopes_enabled, world):
    token = OAuthDriver(http=HttpClient()).client_credentials(world.app, "models.read").json()["access_token"]
    response = HttpClient(HTTP_AUTHORIZATION=f"Bearer {token}").get("/api/admin/clients/")
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_a_revoked_admin_token_is_refused_at_once(bearer):
    api = bearer()
    assert api.get("/api/admin/keys/").status_code == 200
    AccessToken.objects.all().delete()
    assert api.get("/api/admin/keys/").status_code == 401


def test_a_disabled_admin_client_loses_the_api(bearer, admin_app):
    api = bearer()
    Client.objects.filter(pk=admin_app.client.pk).update(disabled=True)
    assert api.get("/api/admin/keys/").status_code == 401


def test_a_user_delegated_admin_token_needs_the_users_own_console_rights(
    bearer, admin_app, member, admin_user
):
    api = bearer()
    AccessToken.objects.filter(application=admin_app.client).update(user=member)
    assert api.get("/api/admin/keys/").status_code == 403
    AccessToken.objects.filter(application=admin_app.client).update(user=admin_user)
    assert api.get("/api/admin/keys/").status_code == 200


def _forge(header: dict[str, Any], claims: dict[str, Any], key: jwk.JWK | None) -> str:
    if key is None:  # alg none: an unsigned token
        encode = lambda part: base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()  # noqa: E731
        return f"{encode(header)}.{encode(claims)}."
    token = jwt.JWT(header=header, claims=claims)
    token.make_signed_token(key)
    return str(token.serialize())


@pytest.mark.parametrize(
    "defect",
    [
        "alg_none",
        "hs256_with_public_key",
        "wrong_typ",
        "wrong_audience",
        "wrong_issuer",
        "expired",
        "jku",
        "unknown_jti",
        "alg_not_the_keys",
    ],
)
def test_forged_or_doubtful_tokens_are_refused(bearer, admin_app, settings, defect):
    bearer()  # a real token exists, so only the defect decides
    row = AccessToken.objects.get(application=admin_app.client)
    key = signing_key_active("ES256")
    now = int(time.time())
    header = {"alg": "ES256", "typ": "at+jwt", "kid": key.kid}
    claims = {
        "iss": settings.PORTCULLIS_ISSUER,
        "aud": settings.PORTCULLIS_AUDIENCE,
        "sub": admin_app.client.client_id,
        "client_id": admin_app.client.client_id,
        "scope": "admin.read admin.write",
        "jti": str(row.jti),
        "iat": now,
        "exp": now + 300,
    }
    signer: jwk.JWK | None = key.private_jwk()
    if defect == "alg_none":
        header["alg"], signer = "none", None
    elif defect == "hs256_with_public_key":
        header["alg"] = "HS256"
        signer = jwk.JWK(kty="oct", k=base64.urlsafe_b64encode(json.dumps(key.public_jwk).encode()).decode())
    elif defect == "wrong_typ":
        header["typ"] = "JWT"
    elif defect == "wrong_audience":
        claims["aud"] = "https://elsewhere.example/v1"
    elif defect == "wrong_issuer":
        claims["iss"] = "https://elsewhere.example"
    elif defect == "expired":
        claims["iat"], claims["exp"] = now - 600, now - 300
    elif defect == "jku":
        header["jku"] = "https://evil.example/jwks.json"
    elif defect == "unknown_jti":
        claims["jti"] = str(uuid.uuid4())
    elif defect == "alg_not_the_keys":  # an RS256 signature by a published key, naming the ES256 key
        header["alg"], signer = "RS256", signing_key_active("RS256").private_jwk()
    forged = _forge(header, claims, signer)
    response = HttpClient(HTTP_AUTHORIZATION=f"Bearer {forged}").get("/api/admin/clients/")
    assert response.status_code == 401, defect
    if defect == "alg_not_the_keys":  # refused for that reason, before any key is built
        assert response.json()["detail"] == "invalid_token: the algorithm is not the key's"
    honest = _forge(
        {"alg": "ES256", "typ": "at+jwt", "kid": key.kid}, {**claims, "jti": str(row.jti)}, key.private_jwk()
    )
    if defect not in ("wrong_audience", "wrong_issuer", "expired"):
        assert HttpClient(HTTP_AUTHORIZATION=f"Bearer {honest}").get("/api/admin/clients/").status_code == 200


def test_a_staff_session_reads_the_api_and_needs_csrf_and_superuser_to_change(world, staff_user, admin_user):
    reader = HttpClient(enforce_csrf_checks=True)
    reader.force_login(staff_user)
    assert reader.get("/api/admin/clients/").status_code == 200
    assert reader.post("/api/admin/keys/rotate/", {}, content_type="application/json").status_code == 403
    admin = HttpClient(enforce_csrf_checks=True)
    admin.force_login(admin_user)
    no_csrf = admin.post("/api/admin/keys/rotate/", {}, content_type="application/json")
    assert no_csrf.status_code == 403
    assert "CSRF" in no_csrf.json()["detail"]
    admin.get("/console/keys/rotate/")  # any page with a form sets the CSRF cookie
    csrf = admin.cookies["csrftoken"].value
    ok = admin.post("/api/admin/keys/rotate/", {}, content_type="application/json", HTTP_X_CSRFTOKEN=csrf)
    assert ok.status_code == 200
    assert AuditEvent.objects.filter(kind="key.created").latest("id").actor == "user:root"


def test_the_openapi_schema_is_published_for_admins(as_admin):
    response = as_admin.get("/api/admin/schema/")
    assert response.status_code == 200
    schema = response.json()
    assert schema["openapi"].startswith("3.")
    paths = set(schema["paths"])
    assert {
        "/api/admin/clients/",
        "/api/admin/clients/{client_id}/rotate-secret/",
        "/api/admin/keys/rotate/",
    } <= paths
    assert HttpClient().get("/api/admin/schema/").status_code == 401


@pytest.mark.parametrize(
    ("accept", "media_type"),
    [
        ("application/json", "application/json"),
        ("application/yaml", "application/yaml"),
        ("application/vnd.oai.openapi+json", "application/vnd.oai.openapi+json"),
        ("*/*", "application/vnd.oai.openapi+json"),
    ],
)
def test_the_schema_is_served_in_the_format_an_accept_header_names(as_admin, accept, media_type):
    response = as_admin.get("/api/admin/schema/", HTTP_ACCEPT=accept)
    assert response.status_code == 200  # application/json was a 406: only ?format=json worked
    assert response["Content-Type"].split(";")[0] == media_type
    assert b"/api/admin/clients/" in response.content


def test_the_api_root_links_to_the_schema_and_every_resource(as_admin, world):
    response = as_admin.get("/api/admin/")
    assert response.status_code == 200  # was the catch-all 404
    assert response["Cache-Control"] == "no-store"
    links = response.json()
    assert links["schema"] == "http://testserver/api/admin/schema/"
    assert links["clients"] == "http://testserver/api/admin/clients/"
    assert set(links) == {
        "schema",
        "clients",
        "policies",
        "tokens",
        "users",
        "audit-events",
        "reports",
        "keys",
    }
    for link in links.values():
        assert as_admin.get(link).status_code == 200, link
    assert (
        "/api/admin/" not in as_admin.get("/api/admin/schema/").json()["paths"]
    )  # an index, not an operation
    assert HttpClient().get("/api/admin/").status_code == 401  # for the API's callers only, as the schema


def events_after(last: int) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(id__gt=last).order_by("id"))


def last_event_id() -> int:
    return AuditEvent.objects.order_by("-id").values_list("id", flat=True).first() or 0


def test_a_refused_api_request_is_audited_with_who_what_and_why(bearer, world, admin_app):
    api = bearer("admin.read")
    last = last_event_id()
    assert api.post(f"/api/admin/clients/{world.app.client.client_id}/disable/").status_code == 403
    [event] = events_after(last)
    assert (event.kind, event.outcome) == ("admin_api.denied", "denied")
    assert (event.actor, event.client_id) == (
        f"client:{admin_app.client.client_id}",
        admin_app.client.client_id,
    )
    assert event.data["endpoint"] == "console:api-client-disable"
    assert event.data["method"] == "POST"
    assert event.request_id


@pytest.mark.parametrize(
    ("url", "endpoint"),
    [("/api/admin/users/", "console:api-user-list"), ("/api/admin/schema/", "console:api-schema")],
)
def test_a_refused_token_is_audited_without_the_token(world, url, endpoint):
    forged = "eyJhbGciOiJFUzI1NiIsInR5cCI6ImF0K2p3dCJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    last = last_event_id()
    assert HttpClient(HTTP_AUTHORIZATION=f"Bearer {forged}").get(url).status_code == 401
    [event] = events_after(last)
    assert (event.kind, event.actor) == ("admin_api.denied", "anonymous")
    assert event.data["reason"].startswith("invalid_token")
    assert event.data["endpoint"] == endpoint
    assert forged not in str(event.data)
    assert "c2lnbmF0dXJl" not in str(event.data)


def test_a_failed_csrf_check_on_the_api_is_audited_with_the_sessions_user(world, admin_user):
    admin = HttpClient(enforce_csrf_checks=True)
    admin.force_login(admin_user)
    last = last_event_id()
    assert admin.post("/api/admin/keys/rotate/", {}, content_type="application/json").status_code == 403
    [event] = events_after(last)
    assert (event.kind, event.actor) == ("admin_api.denied", "user:root")
    assert "CSRF" in event.data["reason"]


def test_a_request_without_credentials_is_answered_401_and_not_audited(world):
    last = last_event_id()
    assert HttpClient().get("/api/admin/clients/").status_code == 401
    assert events_after(last) == []


@pytest.mark.parametrize("body", ["a=1", "csrfmiddlewaretoken=forged"])
def test_a_cross_site_form_post_to_the_api_fails_its_csrf_check_audited_not_a_415(world, admin_user, body):
    # Django's check read a form's token from DRF's request.POST, which parses JSON only: a 415 came first
    admin = HttpClient(enforce_csrf_checks=True)
    admin.force_login(admin_user)
    admin.get("/console/keys/rotate/")  # the session holds a CSRF cookie, as a browser would
    last = last_event_id()
    path = f"/api/admin/clients/{world.app.client.client_id}/disable/"
    response = admin.post(path, body, content_type="application/x-www-form-urlencoded")
    assert response.status_code == 403
    assert "CSRF" in response.json()["detail"]
    [event] = events_after(last)
    assert (event.kind, event.actor) == ("admin_api.denied", "user:root")
    assert not Client.objects.get(pk=world.app.client.pk).disabled


def test_a_read_only_staff_form_post_is_refused_for_its_rights_and_audited(world, staff_user):
    viewer = HttpClient(enforce_csrf_checks=True)
    viewer.force_login(staff_user)
    viewer.get("/console/")
    csrf = viewer.cookies["csrftoken"].value
    last = last_event_id()
    path = f"/api/admin/clients/{world.app.client.client_id}/disable/"
    response = viewer.post(
        path, "a=1", content_type="application/x-www-form-urlencoded", HTTP_X_CSRFTOKEN=csrf
    )
    assert response.status_code == 403
    [event] = events_after(last)
    assert (event.kind, event.actor) == ("admin_api.denied", "user:viewer")


@pytest.mark.parametrize(
    "body",
    [
        {"name": "x", "grant_types": ["\ud800"], "scopes": ["models.read"]},  # a lone surrogate in a choice
        {"name": "x", "grant_types": ["client-credentials"], "scopes": ["\udfff"]},
    ],
)
def test_a_lone_surrogate_in_a_choice_is_a_400_not_a_500(bearer, body):
    api = bearer()
    api.raise_request_exception = False
    response = api.post("/api/admin/clients/", json.dumps(body), content_type="application/json")
    assert response.status_code == 400, response.content
    assert "not valid Unicode" in response.content.decode()


def test_json_nested_past_the_recursion_limit_is_a_400_not_a_500(bearer):
    api = bearer()
    api.raise_request_exception = False
    response = api.post("/api/admin/clients/", "[" * 100_000 + "]" * 100_000, content_type="application/json")
    assert response.status_code == 400
    assert "nested too deeply" in response.json()["detail"]


def test_a_key_id_holding_a_nul_is_a_404_in_the_api_and_the_console(bearer, admin_user):
    api = bearer()
    api.raise_request_exception = False
    assert api.post("/api/admin/keys/%00/revoke/").status_code == 404
    console = HttpClient(raise_request_exception=False)
    console.force_login(admin_user)
    assert console.post("/console/keys/%00/revoke/").status_code == 404


def test_a_report_download_error_is_labelled_json_whatever_the_client_accepts(bearer):
    api = bearer()
    response = api.get("/api/admin/reports/999/download/", HTTP_ACCEPT="text/html")
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert response.json()["detail"]


def test_a_policy_put_with_misspelled_fields_is_a_400_naming_them_and_the_policy_stays(bearer, world):
    # the fields were dropped, and PUT reads a field left out as empty: no limit, any address
    api = bearer()
    url = f"/api/admin/clients/{world.app.client.client_id}/policy/"
    stored = {"allowed_models": ["m1"], "rpm": 10, "tpm": 1000, "allow_ips": ["10.0.0.0/8"]}
    assert api.put(url, stored, content_type="application/json").status_code == 200
    last = last_event_id()
    body = {"allowed_models": ["m1"], "RPM": 10, "tokens_per_minute": 1000, "allowed_ips": ["10.0.0.0/8"]}
    response = api.put(url, body, content_type="application/json")
    assert response.status_code == 400
    errors = response.json()
    assert set(errors) == {"RPM", "tokens_per_minute", "allowed_ips"}
    assert all(isinstance(messages, list) and messages for messages in errors.values())
    assert "unknown field" in errors["RPM"][0]
    assert "rpm" in errors["RPM"][0]  # it lists the fields this takes
    policy = ClientPolicy.objects.get(client=world.app.client)
    assert (policy.rpm, policy.tpm, policy.allow_ips) == (10, 1000, ["10.0.0.0/8"])
    assert not events_after(last)  # neither a policy.changed record nor a push


def test_a_policy_read_with_get_may_be_put_back_as_it_is_its_read_only_fields_ignored(bearer, world):
    api = bearer()
    url = "/api/admin/policies/default/"
    first = {"allowed_models": ["m0"], "rpm": 5}
    assert api.put(url, first, content_type="application/json").status_code == 200
    body = {**api.get(url).json(), "allowed_models": ["m1"], "client_id": "someone-else"}
    body["updated_at"] = "2020-01-01T00:00:00Z"
    response = api.put(url, body, content_type="application/json")
    assert response.status_code == 200, response.content
    assert response.json()["client_id"] is None
    assert response.json()["updated_at"] != "2020-01-01T00:00:00Z"
    assert ClientPolicy.objects.get(client=None).allowed_models == ["m1"]
    assert ClientPolicy.objects.get(client=None).rpm == 5
    misspelled = api.put(url, {**body, "RPM": 10}, content_type="application/json")
    assert misspelled.status_code == 400
    assert set(misspelled.json()) == {"RPM"}


@pytest.mark.parametrize(
    ("field", "value", "hint"),
    [
        ("disabled", True, "/disable/"),
        ("client_secret", "s3cret", "/rotate-secret/"),
        ("client_id", "other-id", "never changes"),
    ],
)
def test_a_client_patch_of_a_field_it_cannot_write_is_a_400_saying_where_to_do_it(
    bearer, world, field, value, hint
):
    # it answered 200 and changed nothing: a script believed it had disabled a compromised client
    api = bearer()
    cid = world.app.client.client_id
    last = last_event_id()
    response = api.patch(f"/api/admin/clients/{cid}/", {field: value}, content_type="application/json")
    assert response.status_code == 400
    assert list(response.json()) == [field]
    assert hint in response.json()[field][0]
    client = Client.objects.get(pk=world.app.client.pk)
    assert (client.client_id, client.disabled) == (cid, False)
    assert client.client_secret == world.app.client.client_secret
    assert not events_after(last)


def test_creating_a_client_or_rotating_keys_with_an_unknown_field_is_a_400_that_does_nothing(bearer):
    api = bearer()
    body = {"name": "Typo", "grant_types": ["client-credentials"], "scopes": ["models.read"], "scope": "x"}
    created = api.post("/api/admin/clients/", body, content_type="application/json")
    assert created.status_code == 400
    assert set(created.json()) == {"scope"}
    assert not Client.objects.filter(name="Typo").exists()
    both = api.post("/api/admin/clients/", {"scope": "x"}, content_type="application/json")
    assert {"name", "grant_types", "scopes", "scope"} <= set(both.json())  # every error at once
    keys = SigningKey.objects.count()
    rotated = api.post("/api/admin/keys/rotate/", {"activate": True}, content_type="application/json")
    assert rotated.status_code == 400
    assert set(rotated.json()) == {"activate"}
    assert SigningKey.objects.count() == keys


def test_an_unknown_field_that_is_not_valid_unicode_is_named_without_a_500(bearer):
    api = bearer()
    api.raise_request_exception = False
    body = json.dumps({"activate_now": False, "\ud800" + "x" * 500: 1})
    response = api.post("/api/admin/keys/rotate/", body, content_type="application/json")
    assert response.status_code == 400, response.content
    [name] = response.json()
    assert name.startswith("\\ud800x")  # named, escaped
    assert len(name) <= 110  # and cut short


def test_the_schema_says_request_bodies_take_no_other_fields(as_admin):
    components = as_admin.get("/api/admin/schema/").json()["components"]["schemas"]
    requests = {name for name in components if name.endswith("Request")}
    assert requests == {
        "ClientWriteRequest",
        "PatchedClientWriteRequest",
        "PolicyRequest",
        "KeyRotateRequest",
    }
    for name in requests:
        assert components[name]["additionalProperties"] is False, name
    assert "additionalProperties" not in components["Policy"]  # answers may grow fields


def _api_urls(world: Any) -> list[str]:
    """Every admin API URL, with the world's objects for its arguments."""
    samples = {"client_id": world.app.client.client_id, "pk": str(world.token.pk), "kid": "k1"}
    urls = []
    for _route, pattern in api_patterns():
        kwargs = {name: samples[name] for name in pattern.pattern.regex.groupindex}
        urls.append(reverse(f"console:{pattern.name}", kwargs=kwargs))
    return urls


def test_options_on_every_api_url_answers_with_allow_and_never_a_500(bearer, world, as_admin):
    # DRF's metadata called get_object() for a PUT on policies/default/ (a list route): a 500 for writers
    for who, http in {"superuser session": as_admin, "admin.write token": bearer()}.items():
        http.raise_request_exception = False
        for url in _api_urls(world):
            response = http.options(url)
            assert response.status_code < 500, (who, url, response.status_code)
            assert response.status_code == 200, (who, url, response.status_code)
            assert "OPTIONS" in response["Allow"], (who, url)
    default = as_admin.options("/api/admin/policies/default/")
    assert {"GET", "PUT"} <= {method.strip() for method in default["Allow"].split(",")}
    assert default.content == b""  # the schema describes the fields


@pytest.mark.parametrize(
    "model", ["a\nb", "tab\there", "bell\u0007", "rtl\u202emodel", "c1\u009bx", "bom\ufeff"]
)
def test_a_model_id_with_a_control_or_format_character_is_a_400(bearer, world, model):
    # the console form split "a\nb" into two ids, and the gateway refuses such a model: it never matched
    api = bearer()
    url = f"/api/admin/clients/{world.app.client.client_id}/policy/"
    response = api.put(url, {"allowed_models": ["m1", model]}, content_type="application/json")
    assert response.status_code == 400
    [message] = response.json()["allowed_models"]
    assert repr(model) in message
    assert not ClientPolicy.objects.exists()
    fine = api.put(url, {"allowed_models": ["m1", "My Model, v2"]}, content_type="application/json")
    assert fine.status_code == 200


@pytest.mark.parametrize(
    "item",
    [
        "https://a.example/cb https://evil.example/cb",
        "https://a.example/cb\thttps://evil.example/cb",
        "https://a.example/cb\u00a0https://evil.example/cb",
        "https://a.example/cb\u2028https://evil.example/cb",
        "https://a.example/cb\n",
    ],
)
def test_a_redirect_uri_holding_whitespace_is_a_400_naming_it(bearer, world, item):
    # the service joins the list with spaces and the model splits on whitespace: one item became two URIs
    api = bearer()
    cid = world.app.client.client_id
    response = api.patch(
        f"/api/admin/clients/{cid}/", {"redirect_uris": [item]}, content_type="application/json"
    )
    assert response.status_code == 400
    [message] = response.json()["redirect_uris"]
    assert repr(item) in message
    world.app.client.refresh_from_db()
    assert world.app.client.redirect_uris == "https://acme.example.com/cb"
    fields = {"name": "Split", "grant_types": ["authorization-code"], "scopes": ["models.read"]}
    created = api.post(
        "/api/admin/clients/", {**fields, "redirect_uris": [item]}, content_type="application/json"
    )
    assert created.status_code == 400
    assert not Client.objects.filter(name="Split").exists()


def test_a_redirect_uri_listed_twice_is_a_400(bearer, world):
    api = bearer()
    uri = "https://acme.example.com/cb"
    response = api.patch(
        f"/api/admin/clients/{world.app.client.client_id}/",
        {"redirect_uris": [uri, "https://acme.example.com/other", uri]},
        content_type="application/json",
    )
    assert response.status_code == 400
    assert response.json()["redirect_uris"] == [f"{uri}: listed twice"]
    world.app.client.refresh_from_db()
    assert world.app.client.redirect_uris == uri


def test_a_clients_allowed_origins_are_set_shown_and_audited(bearer, world):
    api = bearer()
    cid = world.app.client.client_id
    origins = ["https://app.example", "https://[::1]:8443", "http://127.0.0.1:5173", "http://[::1]"]
    response = api.patch(
        f"/api/admin/clients/{cid}/", {"allowed_origins": origins}, content_type="application/json"
    )
    assert response.status_code == 200
    assert response.json()["allowed_origins"] == origins
    world.app.client.refresh_from_db()
    assert world.app.client.allowed_origins == " ".join(origins)
    changed = AuditEvent.objects.filter(kind="client.changed", client_id=cid).latest("id")
    assert changed.data["changed"] == ["allowed_origins"]
    fields = {"name": "Spa", "grant_types": ["authorization-code"], "scopes": ["models.read"], "public": True}
    created = api.post(
        "/api/admin/clients/",
        {**fields, "redirect_uris": ["https://spa.example/cb"], "allowed_origins": ["https://spa.example"]},
        content_type="application/json",
    )
    assert created.status_code == 201
    assert created.json()["allowed_origins"] == ["https://spa.example"]
    assert Client.objects.get(name="Spa").allowed_origins == "https://spa.example"


@pytest.mark.parametrize(
    ("origin", "says"),
    [
        ("https://App.example", "write it as a browser sends it: https://app.example"),
        ("https://app.example/", "write it as a browser sends it: https://app.example"),
        ("https://app.example:443", "write it as a browser sends it: https://app.example"),
        ("http://app.example", "an origin must be https (http only for a loopback IP"),
        ("http://localhost:5173", "an origin must be https (http only for a loopback IP"),
        ("http://10.0.0.1", "an origin must be https (http only for a loopback IP"),
        ("http://127.0.0.1:80", "write it as a browser sends it: http://127.0.0.1"),
        ("http://[0::1]:3000", "write it as a browser sends it: http://[::1]:3000"),
        ("https://app.example/spa", "not a web origin"),
        ("https://*.example", "not a web origin"),
        ("null", "not a web origin"),
        ("https://user@app.example", "not a web origin"),
        ("https://b\u00fccher.example", "not a web origin"),
        ("https://app.example https://evil.example", "holds no whitespace"),
        ("https://[0::1]", "write it as a browser sends it: https://[::1]"),
        ("https://127.1", "write it as a browser sends it: https://127.0.0.1"),
        ("https://0x7f.0.0.1:8443", "write it as a browser sends it: https://127.0.0.1:8443"),
        ("https://ex%61mple.com", "not a web origin"),
        ("https://a\x01b.example", "not a web origin"),
        ("https://1.2.3.4.5", "not a web origin"),
    ],
)
def test_an_origin_a_browser_would_never_send_is_a_400_naming_it(bearer, world, origin, says):
    api = bearer()
    cid = world.app.client.client_id
    response = api.patch(
        f"/api/admin/clients/{cid}/", {"allowed_origins": [origin]}, content_type="application/json"
    )
    assert response.status_code == 400
    [message] = response.json()["allowed_origins"]
    assert says in message
    world.app.client.refresh_from_db()
    assert world.app.client.allowed_origins == ""
    twice = api.patch(
        f"/api/admin/clients/{cid}/",
        {"allowed_origins": ["https://a.example", "https://a.example"]},
        content_type="application/json",
    )
    assert twice.json()["allowed_origins"] == ["https://a.example: listed twice"]
    beside = api.patch(  # a loopback origin beside a bad one: the bad one is named, and it alone
        f"/api/admin/clients/{cid}/",
        {"allowed_origins": ["http://127.0.0.1:5173", "ftp://x.example"]},
        content_type="application/json",
    )
    assert beside.json()["allowed_origins"] == [
        "ftp://x.example: not a web origin; write https://host or https://host:port"
    ]


def test_a_change_made_with_a_users_token_names_the_app_that_held_it(bearer, admin_app, admin_user, world):
    api = bearer()
    cid = world.app.client.client_id
    own = api.patch(f"/api/admin/clients/{cid}/", {"name": "By the app"}, content_type="application/json")
    assert own.status_code == 200
    by_app = AuditEvent.objects.filter(kind="client.changed", client_id=cid).latest("id")
    assert by_app.actor == f"client:{admin_app.client.client_id}"
    assert "via_client" not in by_app.data  # the app acted for itself: it is the actor
    AccessToken.objects.filter(application=admin_app.client).update(user=admin_user)
    delegated = api.patch(
        f"/api/admin/clients/{cid}/", {"name": "By a user"}, content_type="application/json"
    )
    assert delegated.status_code == 200
    revoked = api.post(f"/api/admin/clients/{cid}/disable/")
    assert revoked.status_code == 200
    for kind in ("client.changed", "client.disabled"):
        event = AuditEvent.objects.filter(kind=kind, client_id=cid).latest("id")
        assert event.actor == f"user:{admin_user.get_username()}", kind
        assert event.data["via_client"] == admin_app.client.client_id, kind
    session = HttpClient()
    session.force_login(admin_user)
    by_session = session.patch(
        f"/api/admin/clients/{cid}/", {"name": "By a session"}, content_type="application/json"
    )
    assert by_session.status_code == 200
    assert (
        "via_client" not in AuditEvent.objects.filter(kind="client.changed", client_id=cid).latest("id").data
    )


def test_post_logout_redirect_uris_are_set_shown_and_held_to_the_redirect_uri_rules(bearer, world):
    api = bearer()
    cid = world.app.client.client_id
    url = f"/api/admin/clients/{cid}/"
    uris = ["https://acme.example.com/bye", "http://127.0.0.1/bye"]
    response = api.patch(url, {"post_logout_redirect_uris": uris}, content_type="application/json")
    assert response.status_code == 200
    assert response.json()["post_logout_redirect_uris"] == uris
    world.app.client.refresh_from_db()
    assert world.app.client.post_logout_redirect_uri_allowed("https://acme.example.com/bye")
    for refused in (["http://acme.example.com/bye"], ["https://a.example/x https://evil.example/"]):
        answer = api.patch(url, {"post_logout_redirect_uris": refused}, content_type="application/json")
        assert answer.status_code == 400, refused
        assert "post_logout_redirect_uris" in answer.json()
    world.app.client.refresh_from_db()
    assert world.app.client.post_logout_redirect_uris == " ".join(uris)
