"""Console pages end to end through Django's test client: every change is made by the service and audited
with the admin as actor; validation errors come back on the form; secrets are shown exactly once."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import Mapping
from datetime import timedelta
from html.parser import HTMLParser
from typing import Any

import pytest
from django.contrib.auth.hashers import check_password
from django.db import connection
from django.test import Client as HttpClient
from django.utils import timezone
from django.utils.html import escape

from audit.models import AuditEvent, UsageRecord
from authserver.models import AccessToken, Client, Consent, SigningKey
from authserver.services import client_register
from gateway.models import ClientPolicy
from gateway.services import POLICY_FIELDS, policy_set
from tests.conftest import OAuthDriver, asgi_get_scope, django_asgi_get
from tests.console.conftest import issue_token

pytestmark = pytest.mark.django_db

ADMIN = "user:root"


def last_event(kind: str) -> AuditEvent:
    return AuditEvent.objects.filter(kind=kind).latest("id")


def test_creating_a_client_shows_its_secret_once_and_the_secret_works(as_admin):
    response = as_admin.post(
        "/console/clients/new/",
        {
            "name": "Billing bot",
            "grant_types": ["client-credentials"],
            "scopes": ["models.read", "completions"],
            "description": "Nightly billing",
        },
    )
    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    secret = response.context["secret"]
    assert len(secret) == 128
    assert secret.encode() in response.content
    client = Client.objects.get(name="Billing bot")
    assert check_password(secret, client.client_secret)  # stored hashed, never in clear
    assert secret not in client.client_secret
    event = last_event("client.created")
    assert event.actor == ADMIN
    assert event.client_id == client.client_id
    assert secret not in str(event.data)
    detail = as_admin.get(f"/console/clients/{client.client_id}/")
    assert secret.encode() not in detail.content  # never shown again
    token = OAuthDriver(http=as_admin).token(
        {"grant_type": "client_credentials", "scope": "completions"}, (client.client_id, secret)
    )
    assert token.status_code == 200


def test_a_client_form_with_errors_is_shown_again_with_messages_and_nothing_is_created(as_admin):
    before = AuditEvent.objects.count()
    response = as_admin.post(
        "/console/clients/new/",
        {
            "name": "Bad redirects",
            "grant_types": ["authorization-code"],
            "scopes": ["models.read", "admin.read"],
            "redirect_uris": "http://evil.example.com/cb",
        },
    )
    assert response.status_code == 200
    form = response.context["form"]
    assert "Admin scopes are only for clients marked administrative." in form.errors["scopes"]
    assert not Client.objects.filter(name="Bad redirects").exists()
    response = as_admin.post(
        "/console/clients/new/",
        {
            "name": "Bad redirects",
            "grant_types": ["authorization-code"],
            "scopes": ["models.read"],
            "redirect_uris": "http://evil.example.com/cb",
        },
    )
    assert "must use https" in " ".join(response.context["form"].errors["redirect_uris"])
    assert b"Please correct the errors below." in response.content
    assert AuditEvent.objects.count() == before


UNPARSABLE_REDIRECT_URIS = ["http://[::1:8080/cb", "https://app.example.com:99999/cb", "https://[::1/cb"]


@pytest.mark.parametrize("uri", UNPARSABLE_REDIRECT_URIS)
def test_a_redirect_uri_that_cannot_be_parsed_is_a_form_error_not_a_server_error(as_admin, world, uri):
    fields = {"grant_types": ["authorization-code"], "scopes": ["models.read"], "redirect_uris": uri}
    created = as_admin.post("/console/clients/new/", {"name": "Broken", **fields})
    assert created.status_code == 200
    assert "redirect_uris" in created.context["form"].errors
    assert not Client.objects.filter(name="Broken").exists()
    client = world.app.client
    edited = as_admin.post(f"/console/clients/{client.client_id}/edit/", {"name": client.name, **fields})
    assert edited.status_code == 200
    assert "redirect_uris" in edited.context["form"].errors
    client.refresh_from_db()
    assert client.redirect_uris == "https://acme.example.com/cb"


def test_a_redirect_uri_given_twice_is_a_form_error(as_admin, world):
    client = world.app.client
    uri = "https://acme.example.com/cb"
    fields = {"grant_types": ["authorization-code"], "scopes": ["models.read"]}
    edited = as_admin.post(
        f"/console/clients/{client.client_id}/edit/",
        {"name": client.name, **fields, "redirect_uris": f"{uri}\r\nhttps://acme.example.com/b\r\n{uri}"},
    )
    assert edited.status_code == 200
    assert edited.context["form"].errors["redirect_uris"] == [f"{uri}: listed twice"]
    client.refresh_from_db()
    assert client.redirect_uris == uri
    saved = as_admin.post(
        f"/console/clients/{client.client_id}/edit/",
        {"name": client.name, **fields, "redirect_uris": f"{uri}\r\nhttps://acme.example.com/b"},
    )
    assert saved.status_code == 302


def test_editing_a_client_changes_it_and_audits_which_fields_changed(as_admin, world):
    client = world.app.client
    response = as_admin.post(
        f"/console/clients/{client.client_id}/edit/",
        {
            "name": "Acme reports v2",
            "grant_types": ["client-credentials"],
            "scopes": ["models.read", "embeddings"],
            "is_admin_client": "on",
        },
    )
    assert response.status_code == 302
    client.refresh_from_db()
    assert client.name == "Acme reports v2"
    assert client.scope_list() == ["models.read", "embeddings"]
    assert client.grant_types == [Client.GRANT_CLIENT_CREDENTIALS]
    assert client.is_admin_client
    event = last_event("client.changed")
    assert event.actor == ADMIN
    assert set(event.data["changed"]) >= {"name", "allowed_scopes", "grant_types", "is_admin_client"}


def test_rotating_a_secret_asks_first_then_shows_the_new_secret_once_and_the_old_one_stops_working(
    as_admin, world
):
    client = world.app.client
    confirm = as_admin.get(f"/console/clients/{client.client_id}/rotate-secret/")
    assert b"Rotate the secret" in confirm.content
    client.refresh_from_db()
    assert check_password(world.app.client_secret, client.client_secret)  # asking changed nothing
    response = as_admin.post(f"/console/clients/{client.client_id}/rotate-secret/")
    new_secret = response.context["secret"]
    assert new_secret != world.app.client_secret
    client.refresh_from_db()
    assert check_password(new_secret, client.client_secret)
    assert not check_password(world.app.client_secret, client.client_secret)
    assert last_event("client.secret_rotated").actor == ADMIN
    old = OAuthDriver(http=as_admin).token(
        {"grant_type": "client_credentials"}, (client.client_id, world.app.client_secret)
    )
    assert old.status_code == 401


def test_disabling_a_client_asks_first_then_revokes_every_token(as_admin, world):
    client = world.app.client
    confirm = as_admin.get(f"/console/clients/{client.client_id}/disable/")
    assert b"Disable the client" in confirm.content
    assert AccessToken.objects.filter(application=client).exists()
    response = as_admin.post(f"/console/clients/{client.client_id}/disable/")
    assert response.status_code == 302
    client.refresh_from_db()
    assert client.disabled
    assert not AccessToken.objects.filter(application=client).exists()
    assert last_event("client.disabled").actor == ADMIN
    assert last_event("token.revoked").data["tokens_revoked"] == 1
    as_admin.post(f"/console/clients/{client.client_id}/enable/")
    client.refresh_from_db()
    assert not client.disabled
    assert last_event("client.enabled").actor == ADMIN


def test_the_policy_form_saves_a_valid_policy_and_explains_an_invalid_one(as_admin, world):
    client = world.app.client
    url = f"/console/clients/{client.client_id}/policy/"
    bad = as_admin.post(url, {"allowed_models": "m1", "rpm": "-1", "allow_ips": "10.0.0.0/8\nnot-a-network"})
    assert bad.status_code == 200
    errors = bad.context["form"].errors
    assert "rpm" in errors
    assert not ClientPolicy.objects.filter(client=client).exists()
    bad = as_admin.post(url, {"allowed_models": "m1", "allow_ips": "10.0.0.0/8\nnot-a-network"})
    assert "'not-a-network' is not an IP network (CIDR)" in bad.context["form"].errors["allow_ips"]
    # the admin API's schema caps a network at 64 characters, and the form took 500; an IPv4-mapped
    # network never matches, as the gateway reads a mapped client address as its IPv4 one
    for network, error in [
        ("fe80::1%" + "e" * 500 + "/64", "an IP network is at most 64 characters"),
        ("::ffff:10.0.0.0/104", "'::ffff:10.0.0.0/104' is IPv4-mapped: write the IPv4 network"),
    ]:
        bad = as_admin.post(url, {"allowed_models": "m1", "allow_ips": network})
        assert error in bad.context["form"].errors["allow_ips"]
    assert not ClientPolicy.objects.filter(client=client).exists()
    good = as_admin.post(
        url,
        {"allowed_models": "m1\r\n m2 \r\n\r\n", "rpm": "60", "max_tokens": "512", "allow_ips": "10.0.0.0/8"},
    )
    assert good.status_code == 302
    policy = ClientPolicy.objects.get(client=client)
    assert policy.allowed_models == ["m1", "m2"]
    assert (policy.rpm, policy.tpm, policy.max_tokens) == (60, None, 512)
    assert policy.allow_ips == ["10.0.0.0/8"]
    assert last_event("policy.changed").actor == ADMIN
    page = as_admin.get(url)
    assert page.context["form"].initial["allowed_models"] == "m1\nm2"


class PostedForms(HTMLParser):
    """The fields a browser posts from each form of a page, as the page shows them (a checkbox if checked)."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, list[str]]] = []
        self._textarea: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = {key: value or "" for key, value in attrs}
        if tag == "form":
            self.forms.append({})
        elif tag == "textarea":
            self._textarea = attr["name"]
            self.forms[-1][self._textarea] = [""]
        elif tag == "input" and "name" in attr:
            checkbox = attr.get("type") == "checkbox"
            if not checkbox or "checked" in attr:
                default = "on" if checkbox else ""
                self.forms[-1].setdefault(attr["name"], []).append(attr.get("value", default))

    def handle_data(self, data: str) -> None:
        if self._textarea is not None:
            self.forms[-1][self._textarea][0] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "textarea" and self._textarea is not None:
            text = self.forms[-1][self._textarea][0]  # HTML: a newline right after <textarea> is not content
            self.forms[-1][self._textarea][0] = text[1:] if text.startswith("\n") else text
            self._textarea = None


def form_with(field: str, page: str) -> dict[str, list[str]]:
    """Return what the browser posts from the one form of this page that has this field."""
    parser = PostedForms()
    parser.feed(page)
    [form] = [form for form in parser.forms if field in form]
    return form


def test_the_policy_form_posted_back_as_shown_leaves_the_policy_as_it_was(as_admin, world):
    client = world.app.client
    stored = policy_set(
        client=client,
        actor="test",
        allowed_models=["My Model", "org/m,v2", "m1"],  # the API and the gateway take spaces and commas
        rpm=10,
        daily_tokens=2**40,
        allow_ips=["10.0.0.0/8", "2001:db8::/32"],
        quarantine_on_anomaly=True,
    )
    before = {name: getattr(stored, name) for name in POLICY_FIELDS}
    url = f"/console/clients/{client.client_id}/policy/"
    fields = form_with("allowed_models", as_admin.get(url).content.decode())
    assert fields["allowed_models"] == ["My Model\norg/m,v2\nm1"]
    assert as_admin.post(url, fields).status_code == 302
    after = ClientPolicy.objects.get(client=client)
    assert {name: getattr(after, name) for name in POLICY_FIELDS} == before
    assert last_event("policy.changed").data == {"changed": {}}


@pytest.mark.parametrize("model", ["bell\u0007", "tab\there", "rtl\u202emodel"])
def test_a_model_id_with_a_control_or_format_character_is_a_policy_form_error(as_admin, world, model):
    url = f"/console/clients/{world.app.client.client_id}/policy/"
    response = as_admin.post(url, {"allowed_models": f"m1\r\n{model}\r\n"})
    assert response.status_code == 200
    [error] = response.context["form"].errors["allowed_models"]
    assert repr(model) in error
    assert escape(repr(model)).encode() in response.content  # shown on the page, escaped
    assert not ClientPolicy.objects.exists()


@pytest.mark.parametrize(
    ("field", "largest"),
    [("rpm", 2**31 - 1), ("concurrency", 2**31 - 1), ("daily_tokens", 2**63 - 1), ("user_tpm", 2**31 - 1)],
)
def test_a_limit_too_big_for_its_column_is_a_form_error_not_a_server_error(as_admin, world, field, largest):
    url = f"/console/clients/{world.app.client.client_id}/policy/"
    for too_big in (largest + 1, 10**30):
        response = as_admin.post(url, {"allowed_models": "m1", field: str(too_big)})
        assert response.status_code == 200
        assert field in response.context["form"].errors
    assert not ClientPolicy.objects.filter(client=world.app.client).exists()
    assert as_admin.post(url, {"allowed_models": "m1", field: str(largest)}).status_code == 302
    assert getattr(ClientPolicy.objects.get(client=world.app.client), field) == largest


def test_the_default_policy_has_its_own_page(as_admin):
    response = as_admin.post("/console/policy/default/", {"allowed_models": "m1", "tpm": "1000"})
    assert response.status_code == 302
    assert ClientPolicy.objects.get(client=None).tpm == 1000


def test_the_client_page_charts_its_usage_per_hour_and_per_minute(as_admin, world):
    client = world.app.client
    now = timezone.now()
    for index in range(3):
        UsageRecord.objects.create(
            request_id=f"chart-{index}",
            occurred_at=now - timedelta(minutes=index),
            client_id=client.client_id,
            endpoint="chat",
            status=200 if index else 429,
            prompt_tokens=10,
        )
    hourly = as_admin.get(f"/console/clients/{client.client_id}/")
    assert hourly.context["total_requests"] == 4  # three here and one in the world
    assert hourly.context["total_errors"] == 1
    assert len(hourly.context["bars"]) in (24, 25)
    assert b"<rect" in hourly.content
    minutes = as_admin.get(f"/console/clients/{client.client_id}/?unit=minute")
    assert minutes.context["total_tokens"] == 42
    assert max(bar["height"] for bar in minutes.context["bars"]) == 100


def test_the_client_list_searches_by_name(as_admin, world):
    client_register(name="Zebra importer", grant_types=["client-credentials"])
    response = as_admin.get("/console/clients/?q=zebra")
    names = [c.name for c in response.context["page"]]
    assert names == ["Zebra importer"]
    empty = as_admin.get("/console/clients/?q=nothing-like-this")
    assert b"No client matches" in empty.content


def test_the_tokens_page_lists_live_tokens_by_client_and_revokes_one(as_admin, world):
    other = issue_token(world.app)
    listing = as_admin.get(f"/console/tokens/?client={world.app.client.client_id}")
    assert {t.pk for t in listing.context["page"]} == {world.token.pk, other.pk}
    assert str(world.token.jti).encode() in listing.content
    nobody = as_admin.get("/console/tokens/?user=nobody-by-this-name")
    assert list(nobody.context["page"]) == []
    response = as_admin.post(f"/console/tokens/{world.token.pk}/revoke/", {"next": "/console/tokens/"})
    assert response.status_code == 302
    assert response["Location"] == "/console/tokens/"
    assert not AccessToken.objects.filter(pk=world.token.pk).exists()
    assert AccessToken.objects.filter(pk=other.pk).exists()
    event = last_event("token.revoked")
    assert event.actor == ADMIN
    assert event.data["jti"] == str(world.token.jti)


def test_revoke_never_redirects_to_another_site(as_admin, world):
    response = as_admin.post(f"/console/tokens/{world.token.pk}/revoke/", {"next": "https://evil.example/"})
    assert response["Location"] == "/console/tokens/"


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/", "/\\evil.example/"])
def test_revoking_all_tokens_of_a_client_never_redirects_to_another_site(as_admin, world, target):
    client_id = world.app.client.client_id
    response = as_admin.post(f"/console/clients/{client_id}/revoke-tokens/", {"next": target})
    assert response.status_code == 302
    assert response["Location"] == f"/console/clients/{client_id}/"
    back = as_admin.post(
        f"/console/clients/{client_id}/revoke-tokens/", {"next": "/console/tokens/?client=x"}
    )
    assert back["Location"] == "/console/tokens/?client=x"  # the tokens page's own form comes back to it


def test_revoking_all_tokens_of_a_client_keeps_it_enabled(as_admin, world):
    issue_token(world.app)
    response = as_admin.post(f"/console/clients/{world.app.client.client_id}/revoke-tokens/")
    assert response.status_code == 302
    assert not AccessToken.objects.filter(application=world.app.client).exists()
    world.app.client.refresh_from_db()
    assert not world.app.client.disabled
    assert last_event("token.revoked").data["tokens_revoked"] == 2


def test_locking_a_user_blocks_sign_in_and_revokes_their_tokens_and_unlocking_restores_it(
    as_admin, world, client
):
    user = world.user
    AccessToken.objects.filter(pk=world.token.pk).update(user=user)
    response = as_admin.post(f"/console/users/{user.pk}/lock/")
    assert response.status_code == 302
    user.refresh_from_db()
    assert not user.is_active
    assert not AccessToken.objects.filter(user=user).exists()
    assert last_event("user.locked").actor == ADMIN
    assert last_event("user.locked").data == {"user": "mallory"}
    credentials = {"username": "mallory", "password": "a long and good password"}
    assert client.post("/accounts/login/", credentials).status_code == 200  # the form again: refused
    as_admin.post(f"/console/users/{user.pk}/unlock/")
    user.refresh_from_db()
    assert user.is_active
    assert last_event("user.unlocked").actor == ADMIN
    assert client.post("/accounts/login/", credentials).status_code == 302


def test_an_admin_cannot_lock_themselves_out(as_admin, admin_user):
    response = as_admin.post(f"/console/users/{admin_user.pk}/lock/", follow=True)
    admin_user.refresh_from_db()
    assert admin_user.is_active
    assert b"you cannot lock yourself out" in response.content
    assert not AuditEvent.objects.filter(kind="user.locked").exists()


def test_the_user_page_shows_their_connected_apps_and_tokens(as_admin, world):
    response = as_admin.get(f"/console/users/{world.user.pk}/")
    assert [app.client.name for app in response.context["apps"]] == ["Acme reports"]
    listing = as_admin.get("/console/users/?q=mall")
    rows = list(listing.context["page"])
    assert [u.username for u in rows] == ["mallory"]
    assert rows[0].consent_count == 1


def test_the_audit_list_filters_by_kind_actor_client_outcome_and_time(as_admin, world):
    response = as_admin.get("/console/audit/?kind=token.&outcome=success")
    kinds = {e.kind for e in response.context["page"]}
    assert kinds == {"token.issued"}
    response = as_admin.get(f"/console/audit/?client_id={world.app.client.client_id}&kind=consent")
    assert [e.kind for e in response.context["page"]] == ["consent.granted"]
    response = as_admin.get("/console/audit/?actor=mallory")
    assert {e.actor for e in response.context["page"]} == {"user:mallory"}
    later = (timezone.now() + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")
    response = as_admin.get(f"/console/audit/?since={later}")
    assert list(response.context["page"]) == []
    assert b"No events match these filters." in response.content


@pytest.mark.parametrize("field", ["since", "until"])
@pytest.mark.parametrize("when", ["0001-01-01T00:00+05:00", "9999-12-31T23:59-05:00"])
def test_a_time_filter_past_the_calendar_in_utc_is_a_form_error_not_a_500(as_admin, world, field, when):
    from console.forms import AuditFilterForm

    form = AuditFilterForm({field: when})
    assert form.filters() == {}  # SQLite's query converted it to UTC: OverflowError
    assert form.errors[field] == ["This time is out of range."]
    assert as_admin.get("/console/audit/", {field: when}).status_code == 200
    assert as_admin.get("/console/audit/export.csv", {field: when}).status_code == 200


def test_the_csv_export_has_every_filtered_event_and_defuses_formulas(as_admin, world):
    from audit.services import audit_record

    audit_record(kind="test.formula", actor="=HYPERLINK(1)")
    response = as_admin.get("/console/audit/export.csv?kind=test.")
    assert response["Content-Type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert rows[0][:3] == ["occurred_at", "kind", "outcome"]
    assert len(rows) == 2
    assert rows[1][3] == "'=HYPERLINK(1)"


def test_the_front_door_sends_each_visitor_where_they_can_act(signed_in, member, staff_user, settings):
    assert signed_in(staff_user).get("/")["Location"] == "/console/"
    assert signed_in(member).get("/")["Location"] == "/accounts/connected-apps/"  # their only page
    page = signed_in(None).get("/")  # was a 404, behind every page's "Portcullis" link
    assert page.status_code == 200
    assert b'href="/accounts/login/"' in page.content
    assert b'href="/.well-known/oauth-authorization-server"' in page.content
    assert f"<code>{settings.PORTCULLIS_ISSUER}/v1</code>".encode() in page.content
    assert b'class="brand" href="/"' in page.content
    for response in (page, signed_in(member).get("/")):
        assert "no-store" in response["Cache-Control"]  # who asks decides the answer


def test_signing_in_without_a_destination_takes_staff_to_the_console_and_others_to_their_apps(
    client, member, staff_user
):
    from tests.console.conftest import PASSWORD

    for user, landing in ((staff_user, "/console/"), (member, "/accounts/connected-apps/")):
        signed = client.post(
            "/accounts/login/", {"username": user.username, "password": PASSWORD}, follow=True
        )
        assert signed.redirect_chain == [("/", 302), (landing, 302)]
        assert signed.status_code == 200
        client.logout()
    sent_on = client.post(
        "/accounts/login/?next=/oauth/authorize/%3Fclient_id%3Dx",
        {"username": member.username, "password": PASSWORD, "next": "/oauth/authorize/?client_id=x"},
    )
    assert sent_on["Location"] == "/oauth/authorize/?client_id=x"  # a flow's own destination comes first


def session_cookie(user: Any) -> tuple[bytes, bytes]:
    """A ``Cookie`` header signing ``user`` in, for a request sent to the ASGI handler directly."""
    http = HttpClient()
    http.force_login(user)
    return (b"cookie", f"sessionid={http.cookies['sessionid'].value}".encode())


@pytest.mark.django_db(transaction=True)  # Django's ASGI handler runs the view in a thread of its own
def test_under_asgi_the_csv_export_streams_its_rows_from_an_async_iterator(admin_user, monkeypatch):
    from audit.services import audit_record

    monkeypatch.setattr("console.views.audit.EXPORT_CHUNK", 2)
    for n in range(3):
        audit_record(kind="test.row", actor=f"user:row{n}")
    start, *bodies = django_asgi_get(
        "/console/audit/export.csv?kind=test.", headers=[session_cookie(admin_user)]
    )
    assert (
        start["status"] == 200
    )  # a synchronous iterator was read whole first, with a warning (an error here)
    parts = [m["body"] for m in bodies if m.get("body")]
    assert len(parts) == 3  # the header, then a page at a time
    rows = list(csv.reader(io.StringIO(b"".join(parts).decode())))
    assert [row[3] for row in rows] == ["actor", "user:row2", "user:row1", "user:row0"]


def test_the_csv_export_pages_through_events_of_the_same_instant_each_once_in_order(as_admin, monkeypatch):
    from audit.services import audit_record

    monkeypatch.setattr("console.views.audit.EXPORT_CHUNK", 2)
    instant = timezone.now()
    recorded = [audit_record(kind="test.tie", actor=f"user:tie{n}", occurred_at=instant) for n in range(5)]
    audit_record(kind="test.tie", actor="user:older", occurred_at=instant - timedelta(seconds=1))
    response = as_admin.get("/console/audit/export.csv?kind=test.")  # WSGI: the synchronous pages
    rows = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))
    expected = [e.actor for e in sorted(recorded, key=lambda e: e.pk, reverse=True)] + ["user:older"]
    assert [row[3] for row in rows[1:]] == expected  # a page boundary inside a tie skips or repeats none


def open_cursors() -> int:
    """Server-side cursors open on this thread's database connection (PostgreSQL's ``pg_cursors``)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_cursors")
        return int(cursor.fetchone()[0])


@pytest.mark.django_db(transaction=True)
def test_a_client_leaving_mid_export_leaves_no_cursor_open_on_the_connection(admin_user, monkeypatch):
    from asgiref.sync import sync_to_async
    from django.core.handlers.asgi import ASGIHandler

    from audit.services import audit_record

    monkeypatch.setattr("console.views.audit.EXPORT_CHUNK", 2)
    for n in range(5):
        audit_record(kind="test.row", actor=f"user:row{n}")
    scope = asgi_get_scope("/console/audit/export.csv?kind=test.", headers=[session_cookie(admin_user)])
    bodies: list[bytes] = []
    cursors_between_chunks: list[int] = []

    async def run() -> None:
        left = asyncio.Event()
        requests = [{"type": "http.request", "body": b"", "more_body": False}]

        async def receive() -> dict[str, Any]:
            if requests:
                return requests.pop()
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(message: Mapping[str, Any]) -> None:
            if message.get("body"):
                bodies.append(message["body"])
                # The view's thread (one per request under ASGI): the connection the export reads on.
                cursors_between_chunks.append(await sync_to_async(open_cursors)())
                if len(bodies) == 2:  # the header and the first rows: the client goes away
                    left.set()
                    await asyncio.sleep(0)

        await ASGIHandler()(scope, receive, send)

    asyncio.run(run())
    assert set(cursors_between_chunks) == {0}  # aiterator() held a server-side cursor between chunks
    assert b"user:row4" in bodies[1]
    assert b"user:row0" not in b"".join(bodies)  # the export stopped when the client left


def test_chain_verification_runs_on_request_and_reports_its_result(as_admin, world):
    page = as_admin.get("/console/audit/verify/")
    assert page.context["result"] is None
    response = as_admin.post("/console/audit/verify/")
    result = response.context["result"]
    try:
        from audit.chain import chain_verify
    except ImportError:
        assert result == {"available": False}
    else:
        expected = chain_verify()
        assert result["ok"] is expected.ok
        assert result["checked"] == expected.checked
        assert b'id="verify-result"' in response.content


def test_one_chain_verification_runs_at_a_time_across_processes(as_admin, world, settings):
    # any staff user may ask, and asking again and again had run as many full reads of the log at once
    import psycopg

    from console.views.audit import CONSOLE_VERIFY_LOCK

    params = settings.DATABASES["default"]
    other = psycopg.connect(  # another process's session, holding the lock as a running verification does
        host=params["HOST"],
        port=params["PORT"] or 5432,
        user=params["USER"],
        dbname=params["NAME"],
        password=params["PASSWORD"] or None,
        autocommit=True,
    )
    with other:
        other.execute("SELECT pg_advisory_lock(%s)", [CONSOLE_VERIFY_LOCK])
        busy = as_admin.post("/console/audit/verify/")
        assert busy.status_code == 409
        assert busy.context["result"] == {"available": True, "busy": True}
        assert b"A verification is running already" in busy.content
        other.execute("SELECT pg_advisory_unlock(%s)", [CONSOLE_VERIFY_LOCK])
        done = as_admin.post("/console/audit/verify/")
    assert done.status_code == 200
    assert done.context["result"]["ok"] is True
    again = as_admin.post("/console/audit/verify/")  # the lock was given back after the first
    assert again.status_code == 200


def test_a_stored_report_downloads_as_an_attachment(as_admin, world):
    listing = as_admin.get("/console/reports/")
    assert world.report.filename().encode() in listing.content
    response = as_admin.get(f"/console/reports/{world.report.pk}/download/")
    assert response["Content-Disposition"] == f'attachment; filename="{world.report.filename()}"'
    assert response["Content-Type"] == "text/csv"
    assert response.content == world.report.content.encode()


def test_rotating_keys_asks_first_and_activate_now_makes_a_new_key_sign(as_admin, world):
    first = SigningKey.objects.get(state=SigningKey.State.ACTIVE, algorithm="ES256")
    confirm = as_admin.get("/console/keys/rotate/")
    assert b"Rotate now" in confirm.content
    assert SigningKey.objects.count() == 2  # the world's first token started both families
    said = as_admin.post("/console/keys/rotate/", follow=True).content.decode()
    pending = SigningKey.objects.get(state=SigningKey.State.PENDING, algorithm="ES256")
    pending_rs256 = SigningKey.objects.get(state=SigningKey.State.PENDING, algorithm="RS256")
    assert "Signing new tokens now" not in said
    assert f"Published, signing once due: {pending.kid}, {pending_rs256.kid}." in said
    assert f"RS256 key <code>{pending_rs256.kid}</code> is already published" in (
        as_admin.get("/console/keys/rotate/").content.decode()
    )
    assert last_event("key.created").actor == ADMIN
    as_admin.post("/console/keys/rotate/", {"activate_now": "on"})
    pending.refresh_from_db()
    first.refresh_from_db()
    assert pending.state == SigningKey.State.ACTIVE
    assert first.state == SigningKey.State.RETIRED
    assert last_event("key.activated").actor == ADMIN
    listing = as_admin.get("/console/keys/")
    assert pending.kid.encode() in listing.content
    assert [f.algorithm for f in listing.context["families"]] == ["ES256"]  # the world's access token
    assert b"<strong>ES256</strong>, last" in listing.content
    assert b"signed with it within the last 7 days" in listing.content  # the default rotation interval


def test_revoking_a_leaked_key_asks_first_then_replaces_and_unpublishes_it(as_admin, world):
    leaked = SigningKey.objects.get(state=SigningKey.State.ACTIVE, algorithm="ES256")
    listing = as_admin.get("/console/keys/").content.decode()
    assert f'href="/console/keys/{leaked.kid}/revoke/"' in listing
    confirm = as_admin.get(f"/console/keys/{leaked.kid}/revoke/")
    assert b"Revoke the key" in confirm.content
    assert SigningKey.objects.get(pk=leaked.pk).state == SigningKey.State.ACTIVE  # asking changed nothing
    said = as_admin.post(f"/console/keys/{leaked.kid}/revoke/", follow=True).content.decode()
    leaked.refresh_from_db()
    assert leaked.state == SigningKey.State.REMOVED
    replacement = SigningKey.objects.get(state=SigningKey.State.ACTIVE, algorithm="ES256")
    assert f"Signing new tokens now: {replacement.kid}." in said
    assert last_event("key.revoked").actor == ADMIN
    assert as_admin.get(f"/console/keys/{leaked.kid}/revoke/").status_code == 404  # once is all it takes


def test_a_key_revoked_meanwhile_by_someone_else_is_a_message_not_a_500(as_admin, world, monkeypatch):
    from django.core.exceptions import ValidationError

    from console.views import keys

    def gone(kid: str, *, actor: str) -> None:
        raise ValidationError({"kid": [f"no published key has the id {kid}"]})

    monkeypatch.setattr(keys, "signing_key_revoke", gone)
    kid = SigningKey.objects.get(state=SigningKey.State.ACTIVE, algorithm="ES256").kid
    said = as_admin.post(f"/console/keys/{kid}/revoke/", follow=True)
    assert said.status_code == 200
    assert f"Key {kid} is no longer published." in said.content.decode()


def test_the_dashboard_shows_live_figures_security_events_and_the_active_key(as_admin, world):
    from audit.services import audit_record

    audit_record(kind="token.refresh_reuse", outcome="denied", actor="client:x")
    audit_record(kind="anomaly.token_burst", actor="system", data={"client": "x"})
    response = as_admin.get("/console/")
    assert response.context["live"]["requests_per_s"] == 0.1  # the world's one record in a 10 s window
    kinds = [e.kind for e in response.context["security_events"]]
    assert "token.refresh_reuse" in kinds
    assert [e.kind for e in response.context["anomalies"]] == ["anomaly.token_burst"]
    active = list(SigningKey.objects.filter(state=SigningKey.State.ACTIVE).order_by("algorithm"))
    assert response.context["active_keys"] == active
    assert [key.algorithm for key in active] == ["ES256", "RS256"]
    assert b"Active ES256 key" in response.content
    assert b"Active RS256 key" in response.content
    assert b"console/live.js" in response.content
    assert b"<script>" not in response.content  # CSP: no inline script


def test_connected_apps_lists_apps_in_plain_words_and_withdraws_one(signed_in, world):
    http = signed_in(world.user)
    AccessToken.objects.filter(pk=world.token.pk).update(user=world.user)
    page = http.get("/accounts/connected-apps/")
    assert b"Acme reports" in page.content
    assert b"See which models you can use" in page.content
    apps = page.context["apps"]
    assert apps[0].live_tokens == 1
    response = http.post(f"/accounts/connected-apps/{world.app.client.client_id}/withdraw/")
    assert response.status_code == 302
    assert not Consent.objects.filter(user=world.user).exists()
    assert not AccessToken.objects.filter(user=world.user).exists()
    event = last_event("consent.withdrawn")
    assert event.actor == "user:mallory"
    assert b"No app has access to your account." in http.get("/accounts/connected-apps/").content


def test_a_user_cannot_withdraw_an_app_they_never_connected(signed_in, world, staff_user):
    response = signed_in(staff_user).post(f"/accounts/connected-apps/{world.app.client.client_id}/withdraw/")
    assert response.status_code == 404
    assert Consent.objects.filter(user=world.user).exists()


def test_console_pages_carry_the_csp_and_no_inline_styles(as_admin, world):
    for url in ("/console/", "/console/clients/", f"/console/clients/{world.app.client.client_id}/"):
        response = as_admin.get(url)
        assert "script-src 'self'" in response["Content-Security-Policy"]
        assert b"style=" not in response.content
        assert b"<style" not in response.content


def test_read_only_staff_see_the_pages_without_the_buttons_they_may_not_use(staff_user, signed_in, world):
    http = signed_in(staff_user)
    detail = http.get(f"/console/clients/{world.app.client.client_id}/")
    assert detail.status_code == 200
    assert b"Rotate secret" not in detail.content
    assert b"Danger zone" not in detail.content
    tokens = http.get("/console/tokens/")
    assert str(world.token.jti).encode() in tokens.content
    assert b"Revoke token" not in tokens.content
    plain_user = signed_in(world.user)  # no console at all
    assert plain_user.get("/console/tokens/").status_code == 403


def test_an_export_page_after_the_first_starts_where_the_occurred_at_index_can():
    from console.views.audit import _export_page

    after = AuditEvent(pk=5, occurred_at=timezone.now())  # the last event of the page before
    sql = str(_export_page(AuditEvent.objects.all(), after).query)
    # the OR of (earlier) and (same instant, lower id) alone gives the index no bound: every page scanned
    # every event already exported
    assert '"occurred_at" <= ' in sql, sql


def _edit_form(client):
    """The console's edit page of a code-flow client, and the fields its form needs besides the one tried."""
    fields = {
        "name": client.name,
        "grant_types": ["authorization-code"],
        "scopes": ["models.read"],
        "redirect_uris": client.redirect_uris,
    }
    return f"/console/clients/{client.client_id}/edit/", fields


def test_a_clients_allowed_origins_are_edited_one_per_line_and_checked(as_admin, world):
    client = world.app.client
    url, fields = _edit_form(client)
    refused = as_admin.post(url, {**fields, "allowed_origins": "https://app.example/\r\nhttp://x.example"})
    assert refused.status_code == 200
    assert refused.context["form"].errors["allowed_origins"] == [
        "https://app.example/: write it as a browser sends it: https://app.example",
        "http://x.example: an origin must be https (http only for a loopback IP such as http://127.0.0.1:5173)",
    ]
    client.refresh_from_db()
    assert client.allowed_origins == ""
    saved = as_admin.post(url, {**fields, "allowed_origins": "https://app.example\r\nhttps://b.example:8443"})
    assert saved.status_code == 302
    client.refresh_from_db()
    assert client.allowed_origins == "https://app.example https://b.example:8443"
    page = as_admin.get(f"/console/clients/{client.client_id}/")
    assert b"<code>https://b.example:8443</code>" in page.content
    form = as_admin.get(url)
    assert "https://app.example\nhttps://b.example:8443" in form.content.decode()


def test_a_clients_post_logout_redirect_uris_are_edited_one_per_line(as_admin, world):
    client = world.app.client
    url, fields = _edit_form(client)
    refused = as_admin.post(url, {**fields, "post_logout_redirect_uris": "http://acme.example.com/bye"})
    assert refused.status_code == 200
    assert "post_logout_redirect_uris" in refused.context["form"].errors
    saved = as_admin.post(
        url,
        {**fields, "post_logout_redirect_uris": "https://acme.example.com/bye\r\nhttps://acme.example.com/b"},
    )
    assert saved.status_code == 302
    client.refresh_from_db()
    assert client.post_logout_redirect_uris == "https://acme.example.com/bye https://acme.example.com/b"
    assert (
        b"<code>https://acme.example.com/bye</code>"
        in as_admin.get(f"/console/clients/{client.client_id}/").content
    )
