"""Discovery metadata, the device flow, login with lockout, client registration rules and the CLI."""

from __future__ import annotations

import json
from datetime import timedelta
from io import StringIO
from typing import Any
from urllib.parse import urlencode

import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.utils import timezone

from audit.models import AuditEvent
from authserver.models import Client

pytestmark = pytest.mark.django_db


def test_rfc8414_metadata_lists_every_endpoint_and_only_supported_methods(client, settings):
    meta = client.get("/.well-known/oauth-authorization-server").json()
    base = settings.PORTCULLIS_ISSUER
    assert meta["issuer"] == base
    assert meta["authorization_endpoint"] == f"{base}/oauth/authorize/"
    assert meta["token_endpoint"] == f"{base}/oauth/token/"
    assert meta["revocation_endpoint"] == f"{base}/oauth/revoke/"
    assert meta["introspection_endpoint"] == f"{base}/oauth/introspect/"
    assert meta["device_authorization_endpoint"] == f"{base}/oauth/device-authorization/"
    assert meta["jwks_uri"] == f"{base}/.well-known/jwks.json"
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert meta["response_types_supported"] == ["code"]
    assert "password" not in meta["grant_types_supported"]
    assert "implicit" not in meta["grant_types_supported"]
    assert meta["authorization_response_iss_parameter_supported"] is True
    assert {"models.read", "completions", "embeddings", "offline_access", "openid", "profile"} <= set(
        meta["scopes_supported"]
    )


def test_openid_configuration_and_protected_resource_metadata(client, settings):
    oidc = client.get("/.well-known/openid-configuration").json()
    assert oidc["issuer"] == settings.PORTCULLIS_ISSUER
    assert oidc["userinfo_endpoint"].endswith("/oauth/userinfo/")
    assert oidc["id_token_signing_alg_values_supported"] == ["RS256"]
    # Absent, OIDC Discovery reads it as authorization code and implicit, which is not served here.
    rfc8414 = client.get("/.well-known/oauth-authorization-server").json()
    assert oidc["grant_types_supported"] == rfc8414["grant_types_supported"]
    assert "implicit" not in oidc["grant_types_supported"]
    assert "authorization_code" in oidc["grant_types_supported"]
    # both documents list every endpoint, at the same address
    endpoints = {key for key in (*oidc, *rfc8414) if key.endswith("_endpoint")}
    assert {"revocation_endpoint", "introspection_endpoint", "device_authorization_endpoint"} <= endpoints
    assert {key: oidc.get(key) for key in endpoints} == {key: rfc8414.get(key) for key in endpoints}
    resource = client.get("/.well-known/oauth-protected-resource").json()
    assert resource["resource"] == settings.PORTCULLIS_AUDIENCE
    assert resource["authorization_servers"] == [settings.PORTCULLIS_ISSUER]
    assert resource["bearer_methods_supported"] == ["header"]
    # RFC 9728 §2: these describe keys and algorithms the resource signs its responses with; the gateway
    # signs none (the authorization server's keys are found through authorization_servers)
    assert {"resource_signing_alg_values_supported", "jwks_uri"}.isdisjoint(resource)


def test_device_flow_from_code_to_token(client, make_client, alice):
    device = make_client(grants=("device-code",), public=True, scopes="models.read completions")
    started = client.post(
        "/oauth/device-authorization/",
        urlencode({"client_id": device.client.client_id, "scope": "models.read"}),
        content_type="application/x-www-form-urlencoded",
    )
    assert started.status_code == 200, started.content
    grant = started.json()
    assert grant["verification_uri"].endswith("/device/")
    poll = {
        "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
        "device_code": grant["device_code"],
        "client_id": device.client.client_id,
    }
    pending = client.post("/oauth/token/", poll)
    assert pending.status_code == 400
    assert pending.json()["error"] == "authorization_pending"
    client.force_login(alice)
    entered = client.post("/oauth/device/", {"user_code": grant["user_code"]})
    assert entered.status_code == 302
    confirm = client.get(entered["Location"])
    assert b"Allow" in confirm.content
    # as the consent page does, it says which models and limits the app would get (none set here)
    assert b"Models it can use" in confirm.content
    assert b"Limits" in confirm.content
    neither = client.post(entered["Location"], {"action": "maybe"})  # DOT: an empty 400
    assert neither.status_code == 400
    assert b"Choose Allow or Deny." in neither.content
    assert client.post(entered["Location"], {"action": "accept"}).status_code == 302
    token = client.post("/oauth/token/", poll)
    assert token.status_code == 200, token.content
    assert token.json()["scope"] == "models.read"
    assert AuditEvent.objects.filter(kind="token.issued", data__grant_type=poll["grant_type"]).exists()


DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
FORM = "application/x-www-form-urlencoded"


def _device_approved(client, make_client, alice, *, scope: str = "models.read") -> tuple[Any, str]:
    """Start a device flow, have alice approve it in the browser; return the client and its device code."""
    device = make_client(
        grants=("device-code",), public=True, scopes="models.read completions offline_access"
    )
    started = _device_start(client, device.client.client_id, scope, FORM).json()
    client.force_login(alice)
    entered = client.post("/oauth/device/", {"user_code": started["user_code"]})
    assert client.post(entered["Location"], {"action": "accept"}).status_code == 302
    client.logout()
    return device, started["device_code"]


def _device_start(client, client_id: str, scope: str, content_type: str | None) -> Any:
    body = urlencode({"client_id": client_id, "scope": scope})
    if content_type is None:
        return client.generic("POST", "/oauth/device-authorization/", body, content_type="")
    return client.post("/oauth/device-authorization/", body, content_type=content_type)


def _poll(client, client_id: str, device_code: str, **extra: str) -> Any:
    return client.post(
        "/oauth/token/",
        {"grant_type": DEVICE_GRANT, "device_code": device_code, "client_id": client_id, **extra},
    )


def test_a_device_approval_is_remembered_and_audited_and_the_app_stays_listed_until_withdrawn(
    client, make_client, alice
):
    from authserver.models import AccessToken, Consent, RefreshToken
    from authserver.selectors import connected_apps_for_user

    device, code = _device_approved(client, make_client, alice, scope="models.read offline_access")
    granted = AuditEvent.objects.get(kind="consent.granted", client_id=device.client.client_id)
    assert (granted.actor, granted.data) == ("user:alice", {"scope": "models.read offline_access"})
    tokens = _poll(client, device.client.client_id, code)
    assert "refresh_token" in tokens.json()
    [app] = connected_apps_for_user(user=alice)
    assert app.client == device.client
    # approved before approvals were remembered: no consent row, its access token expired, its refresh
    # token live, and still listed (so it can be withdrawn)
    Consent.objects.filter(user=alice).delete()
    AccessToken.objects.filter(user=alice).update(expires=timezone.now() - timedelta(seconds=1))
    [app] = connected_apps_for_user(user=alice)
    assert app.client == device.client
    client.force_login(alice)
    withdrawn = client.post(f"/accounts/connected-apps/{device.client.client_id}/withdraw/")
    assert withdrawn.status_code == 302
    assert not RefreshToken.objects.filter(user=alice, revoked__isnull=True).exists()
    assert connected_apps_for_user(user=alice) == []


def test_a_device_refused_by_the_user_is_audited_as_a_denied_consent(client, make_client, alice):
    device = make_client(grants=("device-code",), public=True, scopes="models.read")
    started = _device_start(client, device.client.client_id, "models.read", FORM).json()
    client.force_login(alice)
    entered = client.post("/oauth/device/", {"user_code": started["user_code"]})
    assert client.post(entered["Location"], {"action": "deny"}).status_code == 302
    denied = AuditEvent.objects.get(kind="consent.denied", client_id=device.client.client_id)
    assert (denied.actor, denied.outcome, denied.data["flow"]) == ("user:alice", "denied", "device")
    assert not AuditEvent.objects.filter(kind="consent.granted").exists()


def test_wrong_device_codes_are_audited_and_after_ten_the_user_must_wait(client, make_client, alice):
    from django.core.cache import cache
    from oauth2_provider.models import get_device_grant_model

    device = make_client(grants=("device-code",), public=True, scopes="models.read")
    started = _device_start(client, device.client.client_id, "models.read", FORM).json()
    client.force_login(alice)
    cache.delete(f"portcullis:device-code-wrong:{alice.pk}")
    for guess in range(10):
        wrong = client.post("/oauth/device/", {"user_code": f"GUESS{guess:03d}"})
        assert wrong.status_code == 200
        assert b"Incorrect user code" in wrong.content
    counts = AuditEvent.objects.filter(kind="device.code_wrong", actor="user:alice").values_list(
        "data", flat=True
    )
    assert sorted(data["count"] for data in counts) == list(range(1, 11))
    paused = client.post("/oauth/device/", {"user_code": started["user_code"]})  # the right code waits too
    assert paused.status_code == 429
    assert b"Too many wrong codes" in paused.content
    assert AuditEvent.objects.filter(kind="device.code_throttled", actor="user:alice").exists()
    assert get_device_grant_model().objects.get(user_code=started["user_code"]).user is None
    cache.delete(f"portcullis:device-code-wrong:{alice.pk}")  # the window has passed
    assert client.post("/oauth/device/", {"user_code": started["user_code"]}).status_code == 302


def test_a_user_code_two_grants_share_is_a_wrong_code_not_a_500(client, make_client, alice):
    from oauth2_provider.models import get_device_grant_model

    device = make_client(grants=("device-code",), public=True, scopes="models.read")
    first = _device_start(client, device.client.client_id, "models.read", FORM).json()
    second = _device_start(client, device.client.client_id, "models.read", FORM).json()
    get_device_grant_model().objects.filter(user_code=second["user_code"]).update(
        user_code=first["user_code"]
    )
    client.force_login(alice)
    answer = client.post("/oauth/device/", {"user_code": first["user_code"]})
    assert answer.status_code == 200  # DOT's lookup raised MultipleObjectsReturned: a 500
    assert b"Incorrect user code" in answer.content  # two pending: which one is meant is unknown
    model = get_device_grant_model()
    model.objects.filter(device_code=second["device_code"]).update(status=model.DENIED)  # an old one
    assert client.post("/oauth/device/", {"user_code": first["user_code"]}).status_code == 302
    assert (
        client.post("/oauth/device/", {"user_code": "AB\x00CD"}).status_code == 200
    )  # the field refuses NUL


def test_a_device_code_gives_one_token_for_the_user_who_approved_it(client, make_client, alice):
    from authserver.tokens import jwt_unverified_claims

    device, code = _device_approved(client, make_client, alice)
    first = _poll(client, device.client.client_id, code)
    assert first.status_code == 200, first.content
    assert jwt_unverified_claims(first.json()["access_token"])["sub"] == str(alice.pk)
    again = _poll(client, device.client.client_id, code)
    assert again.status_code == 400
    assert again.json()["error"] == "invalid_grant"
    assert AuditEvent.objects.filter(kind="token.denied", data__error_code="invalid_grant").exists()


def test_polling_a_pending_device_code_faster_than_its_interval_is_slow_down(client, make_client):
    device = make_client(grants=("device-code",), public=True)
    started = _device_start(client, device.client.client_id, "models.read", FORM).json()
    first = _poll(client, device.client.client_id, started["device_code"])
    assert first.json()["error"] == "authorization_pending"
    again = _poll(client, device.client.client_id, started["device_code"])
    assert again.status_code == 400
    assert again.json()["error"] == "slow_down"
    assert not AuditEvent.objects.filter(kind="token.denied").exists()  # polling, not a failure


def test_a_device_poll_is_answered_when_the_cache_that_paces_polls_fails(client, make_client, monkeypatch):
    from redis.exceptions import ConnectionError as RedisConnectionError

    from authserver.views import tokens

    def down(*args: Any, **kwargs: Any) -> bool:
        raise RedisConnectionError("Redis is down")

    monkeypatch.setattr(tokens.cache, "add", down)
    device = make_client(grants=("device-code",), public=True)
    started = _device_start(client, device.client.client_id, "models.read", FORM).json()
    for _ in range(2):
        pending = _poll(client, device.client.client_id, started["device_code"])
        assert pending.json()["error"] == "authorization_pending"  # not paced, and not a 500


def test_another_client_cannot_redeem_a_device_code_and_its_own_still_can(client, make_client, alice):
    from authserver.models import AccessToken

    device, code = _device_approved(client, make_client, alice)
    other = make_client(grants=("device-code",), public=True, name="Other app")
    stolen = _poll(client, other.client.client_id, code)
    assert stolen.status_code == 400
    assert stolen.json()["error"] == "invalid_grant"
    assert not AuditEvent.objects.filter(kind="token.issued", client_id=other.client.client_id).exists()
    assert not AccessToken.objects.exists()  # the token it was issued was rolled back
    assert _poll(client, device.client.client_id, code).status_code == 200


def test_a_device_token_carries_the_scope_the_user_approved_not_a_wider_one_asked_at_the_token_endpoint(
    client, make_client, alice
):
    device, code = _device_approved(client, make_client, alice, scope="models.read")
    token = _poll(client, device.client.client_id, code, scope="models.read completions")
    assert token.status_code == 200, token.content
    assert token.json()["scope"] == "models.read"


def test_an_approved_device_code_past_its_lifetime_gives_no_token(client, make_client, alice):
    from oauth2_provider.models import get_device_grant_model

    device, code = _device_approved(client, make_client, alice)
    get_device_grant_model().objects.filter(device_code=code).update(expires=timezone.now())
    late = _poll(client, device.client.client_id, code)
    assert late.status_code == 400
    assert late.json()["error"] == "expired_token"


@pytest.mark.parametrize("how", ["locked in the console", "deactivated in the Django admin"])
def test_a_device_code_approved_by_a_user_since_locked_or_deactivated_gives_no_token(
    client, make_client, alice, how
):
    from oauth2_provider.models import get_device_grant_model

    from authserver.models import AccessToken, RefreshToken
    from authserver.services import user_lock

    device, code = _device_approved(client, make_client, alice, scope="models.read offline_access")
    if how == "locked in the console":
        user_lock(user=alice, actor="user:admin")
        assert not get_device_grant_model().objects.filter(user=alice).exists()  # dropped with her tokens
    else:
        type(alice).objects.filter(pk=alice.pk).update(is_active=False)  # a path that revokes nothing
    response = _poll(client, device.client.client_id, code)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"
    assert not AccessToken.objects.exists()
    assert not RefreshToken.objects.exists()
    assert not AuditEvent.objects.filter(kind="token.issued").exists()
    assert AuditEvent.objects.get(kind="token.denied").data["error_code"] == "invalid_grant"


def test_device_authorization_reads_a_form_with_a_charset_and_keeps_its_answer_out_of_caches(
    client, make_client
):
    device = make_client(grants=("device-code",), public=True)
    started = _device_start(client, device.client.client_id, "models.read", FORM + "; charset=UTF-8")
    assert started.status_code == 200, started.content
    assert "device_code" in started.json()
    assert started["Cache-Control"] == "no-store"


def test_device_authorization_without_a_content_type_is_an_audited_invalid_request_not_a_500(
    client, make_client
):
    device = make_client(grants=("device-code",), public=True)
    response = _device_start(client, device.client.client_id, "models.read", None)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert AuditEvent.objects.get(kind="device.denied").data["error_code"] == "invalid_request"


@pytest.mark.parametrize("scope", ["admin.write", "models.read embeddings", "bogus-scope"])
def test_device_authorization_refuses_a_scope_the_client_may_not_have(client, make_client, scope):
    device = make_client(grants=("device-code",), public=True, scopes="models.read completions")
    response = _device_start(client, device.client.client_id, scope, FORM)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_scope"
    assert AuditEvent.objects.filter(kind="device.denied", data__error_code="invalid_scope").exists()


def test_unknown_device_code_is_invalid_grant(client, make_client):
    device = make_client(grants=("device-code",), public=True)
    response = _poll(client, device.client.client_id, "nope")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"


def test_login_success_and_failure_are_audited_without_the_password(client, alice):
    bad = client.post("/accounts/login/", {"username": "alice", "password": "wrong-password-123"})
    assert bad.status_code == 200
    assert b"did not match" in bad.content
    good = client.post("/accounts/login/", {"username": "alice", "password": "correct horse battery"})
    assert good.status_code == 302
    events = AuditEvent.objects.filter(kind__startswith="login.")
    assert set(events.values_list("kind", flat=True)) == {"login.failed", "login.succeeded"}
    assert all("wrong-password-123" not in json.dumps(e.data) for e in events)


def test_repeated_login_failures_lock_the_account_out(client, alice, settings):
    for _ in range(settings.AXES_FAILURE_LIMIT):
        client.post("/accounts/login/", {"username": "alice", "password": "nope"}, REMOTE_ADDR="10.9.9.9")
    locked = client.post(
        "/accounts/login/", {"username": "alice", "password": "correct horse battery"}, REMOTE_ADDR="10.9.9.9"
    )
    assert locked.status_code == 429
    assert b"locked" in locked.content
    assert AuditEvent.objects.filter(kind="login.locked_out", ip="10.9.9.9").exists()


def test_a_name_typed_that_is_no_user_is_kept_as_a_keyed_hash_not_as_typed(client, alice, settings):
    # sometimes a password typed in the wrong field: the audit log is append-only, and axes keeps it too
    from axes.models import AccessAttempt

    typed = "Tr0ub4dor&3-in-the-wrong-field"
    device_next = "/oauth/device/?user_code=WXYZABCD"
    for _ in range(settings.AXES_FAILURE_LIMIT):
        client.post(
            f"/accounts/login/?next={device_next}",
            {"username": typed, "password": "x", "next": device_next},
            REMOTE_ADDR="10.8.8.8",
        )
    client.post("/accounts/login/", {"username": "alice", "password": "nope"}, REMOTE_ADDR="10.8.8.8")
    failed = list(
        AuditEvent.objects.filter(kind="login.failed").order_by("id").values_list("actor", flat=True)
    )
    hashed = failed[0]
    assert hashed.startswith("user:?")
    assert len(hashed) == len("user:?") + 16
    assert failed == [hashed] * settings.AXES_FAILURE_LIMIT + ["user:alice"]  # the same name, the same hash
    locked = AuditEvent.objects.get(kind="login.locked_out")
    assert locked.actor == hashed
    stored = json.dumps(list(AuditEvent.objects.values("actor", "data")))
    stored += json.dumps(list(AccessAttempt.objects.values("username", "get_data", "post_data")))
    assert typed not in stored
    assert "WXYZABCD" not in stored
    assert "csrfmiddlewaretoken=" not in stored or "csrfmiddlewaretoken=********" in stored
    assert AccessAttempt.objects.filter(username="alice").exists()  # a user's own name, as before


def test_signing_out_lands_on_the_sign_in_page_which_says_so(client, alice):
    client.force_login(alice)
    page = client.post("/accounts/logout/", follow=True)
    assert page.redirect_chain == [("/accounts/login/", 302)]  # was Django admin's "Logged out" page
    assert b"You have signed out." in page.content
    assert b"Django site admin" not in page.content
    assert not page.wsgi_request.user.is_authenticated
    assert b"You have signed out." not in client.get("/accounts/login/").content  # said once
    client.force_login(alice)
    assert client.post("/accounts/logout/?next=/device/")["Location"] == "/device/"  # a safe next still wins
    client.force_login(alice)
    assert client.post("/accounts/logout/?next=https://evil.example/")["Location"] == "/accounts/login/"


def test_login_page_has_csrf_and_security_headers(client):
    page = client.get("/accounts/login/")
    assert b"csrfmiddlewaretoken" in page.content
    assert page["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in page["Content-Security-Policy"]


@pytest.mark.parametrize(
    ("uri", "ok"),
    [
        ("https://app.example.com/cb", True),
        ("http://127.0.0.1:8765/cb", True),
        ("http://[::1]/cb", True),
        ("http://app.example.com/cb", False),
        ("http://localhost:8765/cb", False),
        ("https://*.example.com/cb", False),
    ],
)
def test_redirect_uris_are_https_or_loopback_only(make_client, uri, ok):
    if ok:
        assert make_client(grants=("authorization-code",), redirect_uris=(uri,)).client.pk
    else:
        with pytest.raises(ValidationError):
            make_client(grants=("authorization-code",), redirect_uris=(uri,))


def test_createclient_json_prints_only_the_id_and_the_secret(db):
    out = StringIO()
    call_command("createclient", "--name", "svc", "--grant", "client-credentials", "--json", stdout=out)
    data = json.loads(out.getvalue())
    assert set(data) == {"client_id", "client_secret"}
    assert len(data["client_secret"]) == 128
    stored = Client.objects.get(client_id=data["client_id"])
    assert stored.client_secret != data["client_secret"]
    assert AuditEvent.objects.filter(kind="client.created", client_id=data["client_id"]).exists()
    assert data["client_secret"] not in json.dumps(list(AuditEvent.objects.values("data")))


def test_createclient_public_with_bad_redirect_is_a_clear_error(db):
    with pytest.raises(CommandError, match="https"):
        call_command(
            "createclient",
            "--name",
            "x",
            "--grant",
            "authorization-code",
            "--public",
            "--redirect-uri",
            "http://example.com/cb",
        )


def test_under_asgi_every_middleware_runs_synchronously_around_the_sync_views():
    from asgiref.sync import AsyncToSync, SyncToAsync
    from django.core.handlers.asgi import ASGIHandler
    from django.utils.deprecation import MiddlewareMixin

    handler = ASGIHandler()._middleware_chain  # type: ignore[attr-defined]
    assert isinstance(handler, SyncToAsync)  # the whole chain runs in one hop to the request's thread
    mixins: list[MiddlewareMixin] = []
    layer: Any = handler.func
    while layer is not None:
        if isinstance(layer, AsyncToSync):
            layer = layer.awaitable
        instance = getattr(layer, "__wrapped__", layer)
        if isinstance(instance, MiddlewareMixin):
            mixins.append(instance)
        layer = getattr(instance, "get_response", None)
    assert len(mixins) >= 7
    in_async_mode = [type(m).__name__ for m in mixins if getattr(m, "async_mode", True)]
    assert not in_async_mode, "an async MiddlewareMixin hops to a thread and back twice a request"


def test_concurrent_polls_of_one_device_code_on_the_embedded_sqlite_give_one_token_and_no_500(tmp_path):
    from tests.conftest import embedded_sqlite_run

    code = r"""
import collections, json, threading
from datetime import timedelta
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client as Http
from django.utils import timezone
from oauth2_provider.models import get_device_grant_model
from authserver.services import client_register

reg = client_register(name="tv", grant_types=["device-code"], scopes=["models.read"], public=True)
alice = get_user_model().objects.create_user("alice", "a@example.com", "correct horse battery")
answers = collections.Counter()
for round_ in range(3):
    device_code = f"dc-{round_}"
    get_device_grant_model().objects.create(
        client_id=reg.client.client_id, device_code=device_code, user_code=f"UC{round_}", scope="models.read",
        expires=timezone.now() + timedelta(minutes=5), status="authorized", user=alice,
    )
    barrier = threading.Barrier(4)

    def poll():
        barrier.wait()
        try:
            answer = Http(HTTP_HOST="127.0.0.1", raise_request_exception=False).post("/oauth/token/", {
                "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
                "device_code": device_code, "client_id": reg.client.client_id,
            })
            answers[(answer.status_code, json.loads(answer.content).get("error", "token"))] += 1
        finally:
            connection.close()

    threads = [threading.Thread(target=poll) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
print("ANSWERS", json.dumps(sorted([list(k) + [v] for k, v in answers.items()])))
"""
    done = embedded_sqlite_run(tmp_path, code)
    line = next((x for x in done.stdout.splitlines() if x.startswith("ANSWERS ")), None)
    assert line is not None, done.stderr[-3000:]
    assert json.loads(line.removeprefix("ANSWERS ")) == [[200, "token", 3], [400, "invalid_grant", 9]]


def test_a_form_post_refused_by_the_csrf_check_is_audited(alice):
    from django.test import Client as HttpClient

    from audit.models import AuditEvent

    browser = HttpClient(enforce_csrf_checks=True)
    browser.get("/accounts/login/")  # sets the CSRF cookie; the forged post below does not carry its token
    response = browser.post("/accounts/login/", {"username": "alice", "password": "wrong"})
    assert response.status_code == 403
    event = AuditEvent.objects.get(kind="csrf.denied")
    assert event.outcome == "denied"
    assert event.data["view"] == "login"
    assert event.data["method"] == "POST"
    assert "CSRF" in event.data["reason"]
    assert not AuditEvent.objects.filter(kind="login.failed").exists()  # refused before the password


@pytest.mark.parametrize("path", ["/device/", "/oauth/device/"])
def test_a_device_page_link_with_a_query_no_code_needs_goes_to_the_bare_page(client, path, caplog):
    # its sign-in redirect (or the short URI's forward) was refused by Django past 16,384 characters: a
    # bare 400 page, and an error logged for each such link
    response = client.get(path, {"user_code": "A" * 20_000})
    assert response.status_code == 302
    assert response["Location"] == "/oauth/device/"
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    short = client.get("/device/", {"user_code": "WDJB-MJHT"})  # a code's own link keeps its code
    assert short["Location"] == "/oauth/device/?user_code=WDJB-MJHT"
