"""OpenID Connect RP-initiated logout at /oauth/logout/, and the sign-out's audit record."""

from __future__ import annotations

from io import StringIO
from typing import Any
from urllib.parse import urlencode

import pytest
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.test import Client as HttpClient
from django.utils import timezone

from audit.models import AuditEvent
from authserver.models import AUTH_TIME_SESSION_KEY, AccessToken, Client, RefreshToken
from authserver.selectors import active_key_cache_clear
from authserver.services import client_register, client_update, signing_key_rotate
from tests.conftest import OAuthDriver, pkce_pair

pytestmark = pytest.mark.django_db

BACK = "https://app.example.com/signed-out"
LOGOUT = "/oauth/logout/"


@pytest.fixture
def rp(make_client):
    return make_client(
        grants=("authorization-code",),
        scopes="openid models.read offline_access",
        post_logout_redirect_uris=[BACK],
        name="Relying Party",
    )


@pytest.fixture
def browser() -> HttpClient:
    """A browser: Django's CSRF check applies, as it does to a real one."""
    return HttpClient(enforce_csrf_checks=True)


def _sign_in_and_get_tokens(http: HttpClient, reg: Any, user: Any) -> dict[str, str]:
    """Sign ``user`` in to ``http``'s session (unless signed in) and run the code flow for ``reg``; return
    its tokens, whose ID token then belongs to that session."""
    if not _signed_in(http):
        http.force_login(user)
    oauth = OAuthDriver(http=HttpClient())  # consent and tokens in a session of their own...
    oauth.http.cookies = http.cookies  # ...that is the same browser session
    verifier, challenge = pkce_pair()
    code = oauth.code_from(
        oauth.authorize(reg.client, challenge=challenge, scope="openid models.read offline_access")
    )
    response = oauth.code_exchange(reg, code, verifier)
    assert response.status_code == 200, response.content
    return dict(response.json())


def _signed_in(http: HttpClient) -> bool:
    return "_auth_user_id" in http.session


def _logout(http: HttpClient, **params: str) -> Any:
    return http.get(f"{LOGOUT}?{urlencode(params)}")


def _page_form(page: Any) -> dict[str, str]:
    """The confirmation page's hidden fields and CSRF token, as a browser would post them back."""
    assert page.status_code == 200, page.content
    form = page.context["form"]
    fields = {name: form.initial.get(name) or "" for name in form.fields if name != "allow"}
    fields["csrfmiddlewaretoken"] = page.context["csrf_token"]
    return fields


def test_a_hint_from_this_session_signs_out_revokes_the_clients_tokens_and_redirects_with_state(
    browser, rp, make_client, alice
):
    tokens = _sign_in_and_get_tokens(browser, rp, alice)
    other = make_client(grants=("authorization-code",), scopes="openid models.read offline_access")
    kept = _sign_in_and_get_tokens(browser, other, alice)
    response = _logout(browser, id_token_hint=tokens["id_token"], post_logout_redirect_uri=BACK, state="s 1")
    assert response.status_code == 302
    assert response["Location"] == f"{BACK}?state=s+1"
    assert not _signed_in(browser)
    # the user's tokens at that client are revoked, and recorded; another client's are not touched
    assert not AccessToken.objects.filter(user=alice, application=rp.client).exists()
    assert not RefreshToken.objects.filter(application=rp.client, revoked__isnull=True).exists()
    assert AccessToken.objects.filter(user=alice, application=other.client).count() == 1
    assert RefreshToken.objects.get(application=other.client).revoked is None
    assert kept["access_token"]
    revoked = AuditEvent.objects.get(kind="token.revoked", client_id=rp.client.client_id)
    assert (revoked.actor, revoked.data["tokens_revoked"]) == ("user:alice", 1)
    event = AuditEvent.objects.get(kind="logout.succeeded")
    assert (event.actor, event.client_id, event.data) == (
        "user:alice",
        rp.client.client_id,
        {"via": "rp_initiated_logout"},
    )


def test_without_a_redirect_uri_the_user_lands_on_the_sign_in_page_which_says_so(browser, rp, alice):
    tokens = _sign_in_and_get_tokens(browser, rp, alice)
    response = _logout(browser, id_token_hint=tokens["id_token"])
    assert (response.status_code, response["Location"]) == (302, "/accounts/login/")
    assert b"You have signed out." in browser.get(response["Location"]).content
    assert not _signed_in(browser)


@pytest.mark.parametrize(
    "uri",
    [
        "https://evil.example/",
        "https://APP.example.com/signed-out",  # another spelling of the host
        f"{BACK}?next=https://evil.example/",  # a query never registered
        f"{BACK}#x",
        "https://app.example.com/callback",  # the client's redirect URI, not a post-logout one
        "//evil.example/",
        "https://[zz]/",  # no URI: DOT's parse raised (a 500)
    ],
)
def test_a_post_logout_redirect_uri_not_registered_is_refused_and_never_followed(browser, rp, alice, uri):
    tokens = _sign_in_and_get_tokens(browser, rp, alice)
    response = _logout(browser, id_token_hint=tokens["id_token"], post_logout_redirect_uri=uri, state="s")
    assert response.status_code == 400
    assert not response.has_header("Location")
    assert b"This sign-out request cannot be completed" in response.content
    assert _signed_in(browser)  # nothing happened
    assert AccessToken.objects.filter(user=alice, application=rp.client).exists()
    event = AuditEvent.objects.get(kind="logout.denied")
    assert (event.outcome, event.actor, event.client_id) == ("denied", "user:alice", rp.client.client_id)
    assert event.data["error_code"] == "invalid_request"
    assert not AuditEvent.objects.filter(kind="logout.succeeded").exists()


def test_a_redirect_uri_registered_for_another_client_is_refused(browser, rp, make_client, alice):
    _sign_in_and_get_tokens(browser, rp, alice)
    elsewhere = "https://other.example/bye"
    other = make_client(
        grants=("authorization-code",), scopes="openid", post_logout_redirect_uris=[elsewhere]
    )
    response = _logout(browser, client_id=rp.client.client_id, post_logout_redirect_uri=elsewhere)
    assert response.status_code == 400
    response = _logout(browser, post_logout_redirect_uri=elsewhere)  # no client named: none to check it by
    assert response.status_code == 400
    assert other.client.post_logout_redirect_uri_allowed(elsewhere)
    assert _signed_in(browser)


@pytest.mark.parametrize(
    "params",
    [
        {"client_id": "no-such-client"},
        {"client_id": "nul\x00client"},
        {"id_token_hint": "not.a.token"},
        {"id_token_hint": "mismatch"},  # another client's ID token with this client_id
        {"id_token_hint": "access"},  # an access token is no ID token
        {"client_id": "disabled"},
    ],
)
def test_a_malformed_logout_request_is_an_audited_400_page_not_a_500(browser, rp, make_client, alice, params):
    tokens = _sign_in_and_get_tokens(browser, rp, alice)
    other = make_client(grants=("authorization-code",), scopes="openid")
    if params.get("id_token_hint") == "mismatch":
        params = {"id_token_hint": tokens["id_token"], "client_id": other.client.client_id}
    elif params.get("id_token_hint") == "access":
        params = {"id_token_hint": tokens["access_token"]}
    elif params.get("client_id") == "disabled":
        Client.objects.filter(pk=other.client.pk).update(disabled=True)
        params = {"client_id": other.client.client_id, "post_logout_redirect_uri": BACK}
    response = _logout(browser, **params)
    assert response.status_code == 400
    assert _signed_in(browser)
    assert AuditEvent.objects.get(kind="logout.denied").data["error_code"] == "invalid_request"


def test_without_a_hint_a_get_only_asks_and_the_pages_own_form_signs_out(browser, rp, alice):
    _sign_in_and_get_tokens(browser, rp, alice)
    page = _logout(browser, client_id=rp.client.client_id, post_logout_redirect_uri=BACK, state="xyz")
    assert page.status_code == 200
    assert _signed_in(browser)  # a link alone ends no session (logout CSRF)
    assert b"Relying Party" in page.content
    assert b"access to your account ends too" in page.content
    assert b'name="csrfmiddlewaretoken"' in page.content
    assert page["X-Frame-Options"] == "DENY"
    assert "no-store" in page["Cache-Control"]  # it holds the request's hint
    answer = browser.post(LOGOUT, {**_page_form(page), "allow": "yes"})
    assert (answer.status_code, answer["Location"]) == (302, f"{BACK}?state=xyz")
    assert not _signed_in(browser)
    assert not AccessToken.objects.filter(user=alice, application=rp.client).exists()
    assert AuditEvent.objects.get(kind="logout.succeeded").client_id == rp.client.client_id


def test_without_any_client_the_page_ends_the_session_and_no_token(browser, rp, alice):
    _sign_in_and_get_tokens(browser, rp, alice)
    page = _logout(browser)
    assert b"access to your account ends too" not in page.content
    answer = browser.post(LOGOUT, {**_page_form(page), "allow": "yes"})
    assert (answer.status_code, answer["Location"]) == (302, "/accounts/login/")
    assert not _signed_in(browser)
    assert AccessToken.objects.filter(user=alice, application=rp.client).exists()
    event = AuditEvent.objects.get(kind="logout.succeeded")
    assert (event.client_id, event.data) == ("", {"via": "rp_initiated_logout"})


def test_staying_signed_in_on_the_page_keeps_the_session_and_the_tokens(browser, rp, alice):
    tokens = _sign_in_and_get_tokens(browser, rp, alice)
    page = _logout(browser, client_id=rp.client.client_id, post_logout_redirect_uri=BACK)
    answer = browser.post(LOGOUT, _page_form(page))  # the other button: no "allow"
    assert answer.status_code == 200
    assert b"You are still signed in" in answer.content
    assert _signed_in(browser)
    assert AccessToken.objects.filter(user=alice, application=rp.client).exists()
    assert not AuditEvent.objects.filter(kind__startswith="logout.").exists()
    assert tokens["id_token"]


def test_a_forged_confirmation_without_the_csrf_token_signs_no_one_out(browser, rp, alice):
    _sign_in_and_get_tokens(browser, rp, alice)
    forged = {"client_id": rp.client.client_id, "post_logout_redirect_uri": BACK, "allow": "yes"}
    response = browser.post(LOGOUT, forged)
    assert response.status_code == 200  # read as a relying party's request: the page asks
    assert b'name="csrfmiddlewaretoken"' in response.content
    assert _signed_in(browser)
    assert AccessToken.objects.filter(user=alice, application=rp.client).exists()
    assert not AuditEvent.objects.filter(kind="logout.succeeded").exists()


def test_a_relying_partys_post_is_read_as_its_get(browser, rp, alice):
    tokens = _sign_in_and_get_tokens(browser, rp, alice)
    response = browser.post(
        LOGOUT, {"id_token_hint": tokens["id_token"], "post_logout_redirect_uri": BACK, "state": "p"}
    )
    assert (response.status_code, response["Location"]) == (302, f"{BACK}?state=p")
    assert not _signed_in(browser)


def test_a_relying_partys_post_that_shows_no_session_asks_rather_than_claim_a_sign_out(browser, rp, alice):
    # a browser withholds the SameSite=Lax session cookie from another site's POST
    tokens = _sign_in_and_get_tokens(HttpClient(), rp, alice)
    response = browser.post(LOGOUT, {"id_token_hint": tokens["id_token"], "post_logout_redirect_uri": BACK})
    assert response.status_code == 200
    assert b"If you are signed in here, you will be signed out." in response.content
    # a GET, which carries the cookie, showing no session: nothing to end, straight back
    response = _logout(browser, id_token_hint=tokens["id_token"], post_logout_redirect_uri=BACK)
    assert (response.status_code, response["Location"]) == (302, BACK)
    assert AccessToken.objects.filter(user=alice, application=rp.client).exists()  # no one signed out


def test_a_hint_from_an_earlier_session_of_the_same_user_asks_first(browser, rp, alice):
    tokens = _sign_in_and_get_tokens(browser, rp, alice)
    session = browser.session
    session[AUTH_TIME_SESSION_KEY] = int(timezone.now().timestamp()) + 60  # signed in again since
    session.save()
    page = _logout(browser, id_token_hint=tokens["id_token"], post_logout_redirect_uri=BACK)
    assert page.status_code == 200
    assert _signed_in(browser)


def test_a_hint_for_another_user_asks_first(browser, rp, alice, django_user_model):
    tokens = _sign_in_and_get_tokens(HttpClient(), rp, alice)
    browser.force_login(django_user_model.objects.create_user("bob", "bob@example.com", "a good password"))
    page = _logout(browser, id_token_hint=tokens["id_token"], post_logout_redirect_uri=BACK)
    assert page.status_code == 200
    assert _signed_in(browser)


def test_a_hint_signed_before_a_key_rotation_is_still_taken(browser, rp, alice):
    tokens = _sign_in_and_get_tokens(browser, rp, alice)
    signing_key_rotate(force=True, activate_now=True)  # the key that signed it is retired, still published
    active_key_cache_clear()
    response = _logout(browser, id_token_hint=tokens["id_token"], post_logout_redirect_uri=BACK)
    assert (response.status_code, response["Location"]) == (302, BACK)


def test_the_sign_out_button_is_audited_too(client, alice):
    client.force_login(alice)
    client.post("/accounts/logout/")
    event = AuditEvent.objects.get(kind="logout.succeeded")
    assert (event.actor, event.client_id, event.data) == ("user:alice", "", {"via": "sign_out"})
    client.post("/accounts/logout/")  # signed out already: no session ended, nothing recorded
    assert AuditEvent.objects.filter(kind="logout.succeeded").count() == 1


def test_discovery_names_the_end_session_endpoint_in_both_documents(client, settings):
    oidc = client.get("/.well-known/openid-configuration").json()
    rfc8414 = client.get("/.well-known/oauth-authorization-server").json()
    assert oidc["end_session_endpoint"] == rfc8414["end_session_endpoint"]
    assert oidc["end_session_endpoint"] == f"{settings.PORTCULLIS_ISSUER}{LOGOUT}"


@pytest.mark.parametrize(
    ("uris", "refused"),
    [
        (["http://app.example.com/bye"], "must use https"),
        (["https://app.example.com/bye#top"], "fragment"),
        (["https://app.example.com/a https://x.example/"], "no whitespace"),
        ([BACK, BACK], "listed twice"),
    ],
)
def test_post_logout_redirect_uris_are_held_to_the_redirect_uris_rules(uris, refused):
    with pytest.raises(ValidationError) as error:
        client_register(
            name="RP",
            grant_types=["authorization-code"],
            redirect_uris=[BACK],
            post_logout_redirect_uris=uris,
        )
    assert refused in " ".join(error.value.message_dict["post_logout_redirect_uris"])


def test_a_loopback_post_logout_uri_may_change_its_port_as_a_native_apps_redirect_uri(rp):
    client_update(client=rp.client, actor="test", post_logout_redirect_uris="http://127.0.0.1:4000/bye")
    assert rp.client.post_logout_redirect_uri_allowed("http://127.0.0.1:53124/bye")
    assert not rp.client.post_logout_redirect_uri_allowed("http://127.0.0.2:53124/bye")
    changed = AuditEvent.objects.get(kind="client.changed")
    assert changed.data["changed"] == ["post_logout_redirect_uris"]


def test_createclient_registers_post_logout_redirect_uris():
    out = StringIO()
    call_command(
        "createclient",
        "--name=CLI RP",
        "--grant=authorization-code",
        f"--redirect-uri={BACK}",
        f"--post-logout-redirect-uri={BACK}",
        "--json",
        stdout=out,
    )
    assert Client.objects.get(name="CLI RP").post_logout_redirect_uris == BACK
