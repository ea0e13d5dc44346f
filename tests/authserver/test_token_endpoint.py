"""Client credentials, the token endpoint's error contract, and client-secret handling."""

from __future__ import annotations

import hashlib
import json
from urllib.parse import urlencode

import pytest
from django.contrib.auth.hashers import identify_hasher

from audit.models import AuditEvent
from authserver.models import GRANT_DEVICE_CODE, AccessToken, Client
from authserver.services import client_disable
from tests.conftest import basic_auth

pytestmark = pytest.mark.django_db

FORM = "application/x-www-form-urlencoded"


def test_client_credentials_returns_a_jwt_with_no_store_and_no_refresh_token(oauth, make_client):
    reg = make_client()
    response = oauth.client_credentials(reg)
    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 300
    assert body["scope"] == "models.read completions"
    assert "refresh_token" not in body
    assert body["access_token"].count(".") == 2
    event = AuditEvent.objects.get(kind="token.issued")
    assert event.client_id == reg.client.client_id
    assert event.data["grant_type"] == "client_credentials"


def test_tokens_and_secrets_are_stored_hashed(oauth, make_client):
    reg = make_client()
    token = oauth.client_credentials(reg).json()["access_token"]
    row = AccessToken.objects.get()
    assert row.token == ""
    assert row.token_checksum
    assert token not in row.token_checksum
    stored = Client.objects.get(pk=reg.client.pk).client_secret
    assert reg.client_secret not in stored
    assert identify_hasher(stored).algorithm == "portcullis_sha256"


def test_wrong_secret_is_invalid_client_401_and_audited(oauth, make_client):
    reg = make_client()
    response = oauth.token({"grant_type": "client_credentials"}, (reg.client.client_id, "wrong"))
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"
    assert response["Cache-Control"] == "no-store"
    assert response["Pragma"] == "no-cache"
    # RFC 6749 §5.2: the challenge of the scheme the client used (oauthlib's was Bearer)
    assert response["WWW-Authenticate"] == 'Basic realm="portcullis"'
    event = AuditEvent.objects.get(kind="token.denied")
    assert event.data["error_code"] == "invalid_client"
    assert "wrong" not in json.dumps(event.data)


def test_scope_outside_the_clients_allowed_scopes_is_invalid_scope(oauth, make_client):
    reg = make_client(scopes="models.read")
    response = oauth.client_credentials(reg, scope="models.read completions")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_scope"
    assert AuditEvent.objects.get(kind="token.denied").data["error_code"] == "invalid_scope"


def test_unknown_scope_is_invalid_scope(oauth, make_client):
    reg = make_client()
    response = oauth.client_credentials(reg, scope="admin.everything")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_scope"


def test_grant_type_the_client_may_not_use_is_unauthorized_client(oauth, make_client):
    reg = make_client(grants=("authorization-code",))
    response = oauth.client_credentials(reg)
    assert response.status_code == 400
    assert response.json()["error"] == "unauthorized_client"
    assert AuditEvent.objects.get(kind="token.denied").data["error_code"] == "unauthorized_client"


@pytest.mark.parametrize("grant_type", ["password", "implicit", "urn:example:custom"])
def test_password_implicit_and_unknown_grants_are_refused(oauth, make_client, grant_type):
    reg = make_client()
    response = oauth.token(
        {"grant_type": grant_type, "username": "alice", "password": "x"},
        (reg.client.client_id, reg.client_secret),
    )
    assert response.status_code == 400
    assert response.json()["error"] == "unsupported_grant_type"


def test_disabled_client_cannot_get_tokens_and_its_tokens_are_revoked(oauth, make_client):
    reg = make_client()
    assert oauth.client_credentials(reg).status_code == 200
    client_disable(client=reg.client, actor="user:admin")
    assert AccessToken.objects.count() == 0
    response = oauth.client_credentials(reg)
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"
    assert AuditEvent.objects.filter(kind="client.disabled", actor="user:admin").exists()


def test_device_grant_without_device_code_is_invalid_request_not_a_crash(oauth, make_client):
    reg = make_client(grants=("device-code",), public=True)
    response = oauth.token(
        {"grant_type": "urn:ietf:params:oauth:grant-type:device_code", "client_id": reg.client.client_id}
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


def test_malformed_basic_auth_is_invalid_client(client, db):
    response = client.post(
        "/oauth/token/", {"grant_type": "client_credentials"}, HTTP_AUTHORIZATION="Basic %%%"
    )
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


def test_issuing_a_token_does_not_read_its_row_back_and_still_announces_it(oauth, make_client):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext
    from oauth2_provider.signals import app_authorized

    reg = make_client()
    oauth.client_credentials(reg)  # the first token also creates the signing key
    announced: list[AccessToken] = []

    def receiver(sender, request, token, **kwargs):
        announced.append(token)

    app_authorized.connect(receiver)
    try:
        with CaptureQueriesContext(connection) as queries:
            response = oauth.client_credentials(reg)
    finally:
        app_authorized.disconnect(receiver)
    assert response.status_code == 200
    reads = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("SELECT")]
    assert not [sql for sql in reads if 'FROM "authserver_accesstoken"' in sql]
    assert [sql for sql in reads if 'FROM "authserver_client"' in sql]  # client authentication still reads
    row = AccessToken.objects.get(jti=announced[0].jti)
    assert announced == [row]
    assert row.token_checksum == AccessToken.objects.latest("created").token_checksum


def test_a_nul_byte_in_the_grant_type_is_refused_and_recorded_not_a_500(client):
    response = client.post("/oauth/token/", {"grant_type": "client\x00credentials"})
    assert response.status_code == 400
    assert response.json()["error"] in {"unsupported_grant_type", "invalid_request"}
    denied = AuditEvent.objects.get(kind="token.denied")
    assert "\x00" not in json.dumps(denied.data)


def test_the_client_lookup_loads_the_same_row_as_the_orm(make_client):
    from authserver.selectors import client_by_client_id

    reg = make_client(grants=("client-credentials", "authorization-code"), description="d\u00e9j\u00e0 vu")
    fast = client_by_client_id(reg.client.client_id)
    orm = Client.objects.get(client_id=reg.client.client_id)
    assert fast is not None
    assert fast.pk == orm.pk
    assert not fast._state.adding
    for field in Client._meta.concrete_fields:
        mine, theirs = getattr(fast, field.attname), getattr(orm, field.attname)
        assert (mine, type(mine)) == (theirs, type(theirs)), field.name
    assert fast.grant_types == ["client-credentials", "authorization-code"]  # JSON, decoded
    assert client_by_client_id("no-such-client") is None
    assert client_by_client_id("nul\x00byte") is None
    assert client_by_client_id(None) is None


def test_a_nul_byte_in_the_client_id_is_invalid_client_not_a_500(oauth, make_client, client):
    reg = make_client()
    auth = basic_auth(reg.client.client_id + "\x00", reg.client_secret)
    response = client.post("/oauth/token/", {"grant_type": "client_credentials"}, HTTP_AUTHORIZATION=auth)
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"
    response = client.post(
        "/oauth/token/",
        {"grant_type": "client_credentials", "client_id": "a\x00b", "client_secret": "x"},
    )
    assert response.status_code == 400  # in the form: refused before anything is looked up
    assert response.json()["error"] == "invalid_request"


def test_a_client_credentials_token_is_one_insert_without_a_transaction_of_its_own(oauth, make_client):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    reg = make_client()
    oauth.client_credentials(reg)  # the first token also creates the signing key
    with CaptureQueriesContext(connection) as queries:
        assert oauth.client_credentials(reg).status_code == 200
    sqls = [q["sql"] for q in queries.captured_queries]
    writes = [i for i, sql in enumerate(sqls) if '"authserver_accesstoken"' in sql]
    assert len(writes) == 1
    assert sqls[writes[0]].startswith("INSERT")
    # inside this test's transaction DOT's atomic block shows as a savepoint just before the insert
    assert not sqls[writes[0] - 1].startswith("SAVEPOINT"), sqls


@pytest.mark.parametrize(
    "fields",
    [
        {"grant_type": "authorization_code", "code": "a\x00b", "redirect_uri": "https://app.example/cb"},
        {"grant_type": "refresh_token", "refresh_token": "a\x00b"},
        {"grant_type": "urn:ietf:params:oauth:grant-type:device_code", "device_code": "a\x00b"},
        {"grant_type": "client_credentials", "scope": "models.read\x00"},
    ],
    ids=["code", "refresh_token", "device_code", "scope"],
)
def test_a_nul_byte_in_any_grant_field_is_an_oauth_error_not_a_500(oauth, make_client, client, fields):
    reg = make_client(grants=("client-credentials", "authorization-code", "device-code"))
    auth = basic_auth(reg.client.client_id, reg.client_secret)
    response = client.post("/oauth/token/", fields, HTTP_AUTHORIZATION=auth)
    assert 400 <= response.status_code < 500
    assert response.json()["error"] in {"invalid_grant", "invalid_request", "invalid_scope"}


def test_the_access_token_insert_writes_what_the_orm_reads_back_and_sends_the_save_signals(make_client):
    import uuid
    from datetime import timedelta

    from django.db.models.signals import post_save, pre_save
    from django.utils import timezone

    from authserver.services import access_token_insert

    reg = make_client()
    token = AccessToken(
        user=None,
        scope="models.read",
        expires=timezone.now() + timedelta(seconds=300),
        application=reg.client,
        resource=["https://api.example"],
        jti=uuid.uuid4(),
    )
    token._raw_token = "header.payload.signature"
    token.token = ""
    heard: list[tuple[str, bool]] = []

    def pre(sender, instance, **kwargs):
        heard.append(("pre", instance.pk is None))

    def post(sender, instance, created, **kwargs):
        heard.append(("post", created))

    pre_save.connect(pre, sender=AccessToken)
    post_save.connect(post, sender=AccessToken)
    try:
        access_token_insert(token)
    finally:
        pre_save.disconnect(pre, sender=AccessToken)
        post_save.disconnect(post, sender=AccessToken)
    assert heard == [("pre", True), ("post", True)]
    stored = AccessToken.objects.get(pk=token.pk)
    for field in AccessToken._meta.concrete_fields:
        assert getattr(stored, field.attname) == getattr(token, field.attname), field.name
    assert stored.token_checksum == hashlib.sha256(b"header.payload.signature").hexdigest()
    assert stored.token == ""  # the token itself is never stored
    assert stored.created is not None
    assert not token._state.adding


@pytest.mark.parametrize("returning", [True, False], ids=["returning", "sqlite-before-3.35"])
def test_the_embedded_sqlite_default_issues_client_credentials_tokens(tmp_path, returning):
    from tests.conftest import embedded_sqlite_run

    code = """
import base64
from django.test import Client as Http
from authserver.models import GRANT_DEVICE_CODE, AccessToken, Client
from authserver.selectors import client_by_client_id
from authserver.services import client_register
reg = client_register(name="app", grant_types=["client-credentials"], scopes=["models.read"])
fast, orm = client_by_client_id(reg.client.client_id), Client.objects.get(pk=reg.client.pk)
for field in Client._meta.concrete_fields:
    mine, theirs = getattr(fast, field.attname), getattr(orm, field.attname)
    assert (mine, type(mine)) == (theirs, type(theirs)), field.name
auth = "Basic " + base64.b64encode(f"{reg.client.client_id}:{reg.client_secret}".encode()).decode()
for _ in range(2):
    form = {"grant_type": "client_credentials"}
    answer = Http(HTTP_HOST="127.0.0.1").post("/oauth/token/", form, HTTP_AUTHORIZATION=auth)
    assert answer.status_code == 200, (answer.status_code, answer.content[:400])
rows = list(AccessToken.objects.order_by("pk"))
assert len(rows) == 2 and rows[0].pk != rows[1].pk and all(r.jti for r in rows), rows
call_command("verifyaudit")
"""
    result = embedded_sqlite_run(tmp_path, code, returning=returning)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "audit chain OK" in result.stdout


FORM_ENDPOINTS = [
    ("/oauth/token/", "token.denied"),
    ("/oauth/revoke/", "token.revoke_denied"),
    ("/oauth/introspect/", "introspect.denied"),
    ("/oauth/device-authorization/", "device.denied"),
]


def _is_rfc_refusal(response, status: int) -> None:
    assert response.status_code == status
    assert response["Content-Type"] == "application/json"
    assert response["Cache-Control"] == "no-store"
    assert response.json()["error"] == "invalid_request"


@pytest.mark.parametrize(("path", "kind"), FORM_ENDPOINTS)
@pytest.mark.parametrize("method", ["get", "put", "delete", "head"])
def test_a_form_endpoint_answers_another_method_with_an_audited_rfc_405(client, path, kind, method):
    response = getattr(client, method)(path)
    assert response.status_code == 405
    assert response["Allow"] == "POST"
    if method != "head":
        _is_rfc_refusal(response, 405)
    assert AuditEvent.objects.filter(kind=kind, data__error_code="invalid_request").count() == 1


@pytest.mark.parametrize(("path", "kind"), FORM_ENDPOINTS)
@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (
            "application/x-www-form-urlencoded; charset=utf-16",
            "grant_type=client_credentials".encode("utf-16"),
        ),
        ("multipart/form-data", b"x"),  # no boundary
        ("application/x-www-form-urlencoded", b"&".join(b"f%d=1" % i for i in range(1100))),  # > 1,000 fields
    ],
    ids=["utf-16", "no-boundary", "too-many-fields"],
)
def test_a_body_that_is_no_readable_form_is_an_audited_invalid_request_not_a_page(
    client, path, kind, content_type, body
):
    response = client.generic("POST", path, body, content_type=content_type)
    _is_rfc_refusal(response, 400)
    assert AuditEvent.objects.filter(kind=kind, data__error_code="invalid_request").count() == 1


def test_a_cors_preflight_of_the_token_endpoint_is_not_refused(client):
    assert client.options("/oauth/token/").status_code == 200


@pytest.mark.parametrize(("path", "kind"), FORM_ENDPOINTS)
def test_a_repeated_parameter_is_an_audited_invalid_request_not_the_last_one_read(client, path, kind):
    body = "grant_type=authorization_code&grant_type=client_credentials&token=x&client_id=a&client_id=b"
    response = client.generic("POST", path, body, content_type="application/x-www-form-urlencoded")
    _is_rfc_refusal(response, 400)
    assert "repeated" in response.json()["error_description"]
    assert AuditEvent.objects.filter(kind=kind, data__error_code="invalid_request").count() == 1


def test_a_repeated_scope_does_not_give_the_last_one(oauth, make_client):
    reg = make_client(scopes="models.read completions")
    response = oauth.http.generic(
        "POST",
        "/oauth/token/",
        "grant_type=client_credentials&scope=admin.write&scope=models.read",
        content_type="application/x-www-form-urlencoded",
        HTTP_AUTHORIZATION=basic_auth(reg.client.client_id, reg.client_secret),
    )
    _is_rfc_refusal(response, 400)


def test_two_client_authentication_methods_in_one_request_are_refused(oauth, make_client):
    reg = make_client()
    response = oauth.http.post(
        "/oauth/token/",
        {"grant_type": "client_credentials", "client_id": reg.client.client_id, "client_secret": "WRONG"},
        HTTP_AUTHORIZATION=basic_auth(reg.client.client_id, reg.client_secret),
    )
    _is_rfc_refusal(response, 400)
    assert not AccessToken.objects.exists()


@pytest.mark.parametrize("resource", ["notauri", "https://[zz]/", "https://[::1"])  # DOT's parse raised
def test_a_refusal_dot_makes_before_oauthlib_is_labelled_json(oauth, make_client, resource):
    reg = make_client()
    response = oauth.token(
        {"grant_type": "client_credentials", "resource": resource}, (reg.client.client_id, reg.client_secret)
    )
    assert response.status_code == 400
    assert response["Content-Type"] == "application/json"
    assert response.json()["error"] == "invalid_target"
    assert AuditEvent.objects.get(kind="token.denied").data["error_code"] == "invalid_target"


@pytest.mark.parametrize(("path", "kind"), FORM_ENDPOINTS)
def test_the_form_endpoints_take_no_csrf_token_clients_authenticate_themselves(path, kind):
    from django.test import Client as DjangoClient

    strict = DjangoClient(enforce_csrf_checks=True)
    response = strict.post(path, {"grant_type": "client_credentials", "client_id": "nobody", "token": "x"})
    assert response.status_code != 403
    assert response["Content-Type"] == "application/json"


def test_introspection_advertises_only_the_methods_it_takes(client):
    assert client.options("/oauth/introspect/")["Allow"] == "POST, OPTIONS"


def _public_with_what_registration_now_refuses(make_client):
    """A public client stored with client credentials and introspection (before clean() refused that)."""
    reg = make_client(grants=("device-code",), public=True)
    grants = [GRANT_DEVICE_CODE, Client.GRANT_CLIENT_CREDENTIALS]
    Client.objects.filter(pk=reg.client.pk).update(grant_types=grants, can_introspect=True)
    return reg


@pytest.mark.parametrize("how", ["basic", "body", "client_id alone"])
def test_a_public_client_cannot_authenticate_without_a_secret_to_mint_or_introspect(oauth, make_client, how):
    reg = _public_with_what_registration_now_refuses(make_client)
    client_id = reg.client.client_id
    token = oauth.client_credentials(make_client())
    assert token.status_code == 200
    body: dict[str, str] = {"grant_type": "client_credentials"}
    headers: dict[str, str] = {}
    if how == "basic":  # its stored secret is the hash of "", which "" matched
        headers["HTTP_AUTHORIZATION"] = basic_auth(client_id, "")
    else:
        body.update(
            {"client_id": client_id, "client_secret": ""} if how == "body" else {"client_id": client_id}
        )
    minted = oauth.http.post("/oauth/token/", body, **headers)
    assert minted.status_code == 401
    assert minted.json()["error"] == "invalid_client"
    introspection = {
        "token": token.json()["access_token"],
        **{k: v for k, v in body.items() if k != "grant_type"},
    }
    introspected = oauth.http.post("/oauth/introspect/", introspection, **headers)
    assert introspected.status_code == 401
    assert introspected.json()["error"] == "invalid_client"
    assert AccessToken.objects.count() == 1  # the other client's
    assert AuditEvent.objects.get(kind="token.denied").data["error_code"] == "invalid_client"
    assert AuditEvent.objects.get(kind="introspect.denied").data["error_code"] == "invalid_client"


def test_a_public_client_is_never_allowed_the_client_credentials_grant(make_client):
    from oauthlib.common import Request

    from authserver.validators import PortcullisValidator

    reg = _public_with_what_registration_now_refuses(make_client)
    client = Client.objects.get(pk=reg.client.pk)
    request = Request("https://as.example/oauth/token/")
    request.client = client
    validator = PortcullisValidator()
    # RFC 6749 §4.4: confidential clients only; oauthlib answers a refused grant unauthorized_client
    assert not validator.validate_grant_type(client.client_id, "client_credentials", client, request)
    assert validator.validate_grant_type(client.client_id, GRANT_DEVICE_CODE, client, request)


@pytest.mark.parametrize("resource", ["https://evil.example", "https://evil.example/v1", "{audience}/"])
def test_a_token_for_a_resource_other_than_the_gateway_is_invalid_target(
    oauth, make_client, settings, resource
):
    reg = make_client()
    asked = resource.format(audience=settings.PORTCULLIS_AUDIENCE)
    form = {"grant_type": "client_credentials", "resource": asked}
    response = oauth.token(form, (reg.client.client_id, reg.client_secret))
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_target"  # RFC 8707 §2: its aud would name the gateway
    assert not AccessToken.objects.exists()
    assert AuditEvent.objects.get(kind="token.denied").data["error_code"] == "invalid_target"
    assert not AuditEvent.objects.filter(kind="token.issued").exists()


def test_a_token_for_the_gateway_names_it_as_introspection_reports_it(oauth, make_client, settings):
    from authserver.tokens import jwt_unverified_claims

    reg = make_client()
    introspector = make_client(can_introspect=True, name="Introspector")
    form = {"grant_type": "client_credentials", "resource": settings.PORTCULLIS_AUDIENCE}
    response = oauth.token(form, (reg.client.client_id, reg.client_secret))
    assert response.status_code == 200, response.content
    token = response.json()["access_token"]
    assert jwt_unverified_claims(token)["aud"] == settings.PORTCULLIS_AUDIENCE
    auth = basic_auth(introspector.client.client_id, introspector.client_secret)
    info = oauth.http.post("/oauth/introspect/", {"token": token}, HTTP_AUTHORIZATION=auth).json()
    assert info["active"] is True
    assert info["aud"] in (settings.PORTCULLIS_AUDIENCE, [settings.PORTCULLIS_AUDIENCE])


@pytest.mark.parametrize(("path", "kind"), FORM_ENDPOINTS)
@pytest.mark.parametrize("query", ["x=%zz", "x=[", "client_secret=TOPSECRET&x=]"])
def test_a_query_string_oauthlib_cannot_read_is_an_audited_invalid_request_and_not_logged(
    make_client, path, kind, query, caplog
):
    # oauthlib decodes the query itself and raised a ValueError (a 500) whose logged message quoted it
    from django.test import Client as DjangoClient

    reg = make_client(grants=("client-credentials", "device-code"))
    http = DjangoClient(raise_request_exception=False)
    response = http.post(
        f"{path}?{query}",
        {"grant_type": "client_credentials", "client_id": reg.client.client_id, "token": "x"},
        HTTP_AUTHORIZATION=basic_auth(reg.client.client_id, reg.client_secret),
    )
    _is_rfc_refusal(response, 400)
    assert response.json()["error_description"] == "The query string is not x-www-form-urlencoded"
    assert AuditEvent.objects.filter(kind=kind, data__error_code="invalid_request").count() == 1
    assert "TOPSECRET" not in caplog.text


@pytest.mark.parametrize(("path", "kind"), FORM_ENDPOINTS)
@pytest.mark.parametrize("credentials", ["Basic é", "Basic YWJj\x85"])
def test_basic_credentials_that_are_not_ascii_are_an_invalid_client_not_a_500(
    client, path, kind, credentials
):
    # Django reads header bytes as Latin-1: b"Basic \xc3\xa9" arrives as "Basic Ã©", which DOT's
    # base64.b64decode refused with a ValueError it did not catch
    from django.test import Client as DjangoClient

    http = DjangoClient(raise_request_exception=False)
    response = http.post(
        path, {"grant_type": "client_credentials", "token": "x"}, HTTP_AUTHORIZATION=credentials
    )
    assert response.status_code == 401  # RFC 6749 §5.2: it authenticated by the header, and that failed
    assert response.json()["error"] == "invalid_client"
    assert response["WWW-Authenticate"] == 'Basic realm="portcullis"'
    assert response["Cache-Control"] == "no-store"
    assert AuditEvent.objects.filter(kind=kind, data__error_code="invalid_client").count() == 1


@pytest.mark.parametrize(("path", "kind"), FORM_ENDPOINTS)
def test_a_client_id_in_the_body_other_than_the_basic_credentials_name_is_refused(make_client, path, kind):
    # the token endpoint ignored it; the device endpoint made the device code out to the client it named
    ours = make_client(grants=("client-credentials", "device-code"))
    other = make_client(grants=("device-code",), public=True)
    from django.test import Client as DjangoClient

    http = DjangoClient()
    body = {"grant_type": "client_credentials", "token": "x", "client_id": other.client.client_id}
    response = http.post(
        path,
        urlencode(body),
        content_type=FORM,
        HTTP_AUTHORIZATION=basic_auth(ours.client.client_id, ours.client_secret),
    )
    _is_rfc_refusal(response, 400)
    assert "Basic credentials name" in response.json()["error_description"]
    assert AuditEvent.objects.filter(kind=kind, data__error_code="invalid_request").count() == 1
    assert not AccessToken.objects.exists()
    body["client_id"] = ours.client.client_id  # the same client named twice is one client
    agreeing = http.post(
        path,
        urlencode(body),
        content_type=FORM,
        HTTP_AUTHORIZATION=basic_auth(ours.client.client_id, ours.client_secret),
    )
    allowed = 403 if path == "/oauth/introspect/" else 200  # a client may introspect only if an admin says
    assert agreeing.status_code == allowed, agreeing.content


@pytest.mark.parametrize("how", ["basic", "body"])
def test_a_client_registered_without_the_device_grant_gets_no_device_code(oauth, make_client, how):
    reg = make_client(grants=("client-credentials",))
    body = {"scope": "models.read"}
    headers = {}
    if how == "basic":
        headers["HTTP_AUTHORIZATION"] = basic_auth(reg.client.client_id, reg.client_secret)
    else:
        body.update(client_id=reg.client.client_id, client_secret=reg.client_secret)
    response = oauth.http.post("/oauth/device-authorization/", urlencode(body), content_type=FORM, **headers)
    assert response.status_code == 400, response.content
    assert response.json()["error"] == "unauthorized_client"
    assert (
        AuditEvent.objects.filter(kind="device.denied", data__error_code="unauthorized_client").count() == 1
    )
    from oauth2_provider.models import get_device_grant_model

    assert not get_device_grant_model().objects.exists()


# ---------------------------------------------------------------- RFC 6749 §5: what every answer says


@pytest.mark.parametrize(
    ("path", "kind", "how"),
    [
        ("/oauth/token/", "token.denied", "basic"),
        ("/oauth/token/", "token.denied", "body"),
        ("/oauth/token/", "token.denied", "none"),
        ("/oauth/revoke/", "token.revoke_denied", "basic"),
        ("/oauth/revoke/", "token.revoke_denied", "body"),
        ("/oauth/device-authorization/", "device.denied", "basic"),
        ("/oauth/device-authorization/", "device.denied", "body"),
        ("/oauth/introspect/", "introspect.denied", "basic"),
    ],
)
def test_a_failed_client_authentication_is_challenged_basic_as_clients_authenticate_not_bearer(
    client, make_client, path, kind, how
):
    # RFC 6749 §5.2: 401 with "the WWW-Authenticate response header field matching the authentication
    # scheme used by the client"; oauthlib answered every 401 with RFC 6750's Bearer, a resource server's
    reg = make_client(grants=("client-credentials", "device-code"), can_introspect=True)
    cid = reg.client.client_id
    form = {"grant_type": "client_credentials", "token": "x", "client_id": cid, "scope": "models.read"}
    headers = {}
    if how == "basic":
        headers["HTTP_AUTHORIZATION"] = basic_auth(cid, "wrong")
    elif how == "body":
        form["client_secret"] = "wrong"
    response = client.post(path, urlencode(form), content_type=FORM, **headers)
    assert response.status_code == 401, response.content
    assert response.json()["error"] == "invalid_client"
    assert response["WWW-Authenticate"] == 'Basic realm="portcullis"'
    assert (response["Cache-Control"], response["Pragma"]) == ("no-store", "no-cache")
    assert AuditEvent.objects.get(kind=kind).data["error_code"] == "invalid_client"
    assert "wrong" not in json.dumps(list(AuditEvent.objects.values_list("data", flat=True)))


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (FORM, "scope=models.read"),
        (FORM, "grant_type=&scope=models.read"),
        ("application/json", json.dumps({"grant_type": "client_credentials"})),
    ],
    ids=["missing", "empty", "json"],
)
def test_a_token_request_without_a_grant_type_is_invalid_request(client, make_client, content_type, body):
    # RFC 6749 §5.2: "missing a required parameter" is invalid_request (oauthlib: unsupported_grant_type)
    reg = make_client()
    auth = basic_auth(reg.client.client_id, reg.client_secret)
    response = client.generic(
        "POST", "/oauth/token/", body, content_type=content_type, HTTP_AUTHORIZATION=auth
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert "grant_type" in response.json()["error_description"]
    assert AuditEvent.objects.get(kind="token.denied").data["error_code"] == "invalid_request"
    assert not AccessToken.objects.exists()


def test_answers_holding_a_device_code_or_a_tokens_description_are_kept_out_of_every_cache(
    client, make_client
):
    # RFC 6749 §5.1: Cache-Control: no-store and Pragma: no-cache; some answers had only the first
    reg = make_client(grants=("client-credentials", "device-code"), can_introspect=True)
    auth = {"HTTP_AUTHORIZATION": basic_auth(reg.client.client_id, reg.client_secret)}
    started = client.post(
        "/oauth/device-authorization/",
        urlencode({"client_id": reg.client.client_id, "scope": "models.read"}),
        content_type=FORM,
        **auth,
    )
    polled = client.post(
        "/oauth/token/",
        {"grant_type": GRANT_DEVICE_CODE, "device_code": started.json()["device_code"]},
        **auth,
    )
    assert polled.json()["error"] == "authorization_pending"
    token = client.post("/oauth/token/", {"grant_type": "client_credentials"}, **auth).json()["access_token"]
    introspected = client.post("/oauth/introspect/", {"token": token}, **auth)
    assert introspected.json()["active"] is True
    for answer in (started, polled, introspected):
        assert (answer["Cache-Control"], answer["Pragma"]) == ("no-store", "no-cache")


def test_a_revocation_answers_an_empty_body_with_no_media_type(client, make_client):
    # RFC 7009 §2.2: the status says it all and the body is ignored; the empty body was labelled text/html
    reg = make_client()
    auth = {"HTTP_AUTHORIZATION": basic_auth(reg.client.client_id, reg.client_secret)}
    token = client.post("/oauth/token/", {"grant_type": "client_credentials"}, **auth).json()["access_token"]
    for revoked in (token, "not-a-token"):
        response = client.post("/oauth/revoke/", {"token": revoked}, **auth)
        assert response.status_code == 200
        assert response.content == b""
        assert "Content-Type" not in response
        assert response["Cache-Control"] == "no-store"
    assert AuditEvent.objects.filter(kind="token.revoked").count() == 1
    assert AuditEvent.objects.filter(kind="token.revoke_unknown").count() == 1
