"""A change to a client that revokes what it may no longer hold does not miss a refresh under way: the
refresh holds the client's row (shared) from its start, so the change waits for it and then revokes what
it issued."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from django.db import connection
from django.test import Client as HttpClient

from authserver.models import AccessToken, Client, RefreshToken
from authserver.services.clients import client_disable, client_update
from tests.conftest import OAuthDriver

SCOPES = "models.read completions offline_access"


def _in_thread(work: Any, results: dict[str, Any], name: str) -> threading.Thread:
    def run() -> None:
        try:
            results[name] = work()
        except Exception as exc:  # noqa: BLE001  (reported to the test, which fails on it)
            results[name] = exc
        finally:
            connection.close()  # this thread's own connection

    thread = threading.Thread(target=run, name=name)
    thread.start()
    return thread


def _waiting_on_a_lock(within_s: float) -> bool:
    """Whether a session of this database waits for a row lock within this time (PostgreSQL's view)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
            )
            if cursor.fetchone()[0]:
                return True
        time.sleep(0.02)
    return False


CHANGES = {
    "narrowed": lambda c: client_update(client=c, actor="test", grant_types=["client-credentials"]),
    "disabled": lambda c: client_disable(client=c, actor="test"),
    "scope taken": lambda c: client_update(
        client=c, actor="test", allowed_scopes="completions offline_access"
    ),
}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("public", "change"),
    [(False, "narrowed"), (False, "disabled"), (False, "scope taken"), (True, "disabled")],
)
def test_a_change_that_revokes_does_not_miss_a_refresh_under_way(
    oauth, make_client, alice, monkeypatch, public, change
):
    if public:  # it names itself in the form: the lock is taken by that name
        app = make_client(grants=("authorization-code",), public=True, scopes=SCOPES)
    else:
        app = make_client(grants=("authorization-code", "client-credentials"), scopes=SCOPES)
    oauth.http.force_login(alice)
    first = oauth.code_tokens(app, SCOPES).json()
    refreshing, go = threading.Event(), threading.Event()

    import authserver.validators as validators

    recorded = validators.audit_record

    def held_before_commit(**record: Any) -> Any:  # the refresh has written its tokens, not committed them
        if record.get("kind") == "token.refreshed":
            refreshing.set()
            go.wait(timeout=30)
        return recorded(**record)

    monkeypatch.setattr(validators, "audit_record", held_before_commit)
    results: dict[str, Any] = {}
    form = {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
    auth = None if public else (app.client.client_id, app.client_secret)
    if public:
        form["client_id"] = app.client.client_id

    def refresh() -> Any:
        return OAuthDriver(http=HttpClient(raise_request_exception=False)).token(form, auth)

    refreshed = _in_thread(refresh, results, "refresh")
    assert refreshing.wait(timeout=30)
    changed = _in_thread(lambda: CHANGES[change](Client.objects.get(pk=app.client.pk)), results, "change")
    waited = _waiting_on_a_lock(within_s=10)
    go.set()
    refreshed.join(timeout=30)
    changed.join(timeout=30)
    assert waited, "the change did not wait for the refresh that holds the client"
    assert not isinstance(results.get("change"), Exception), results.get("change")
    assert results["refresh"].status_code == 200  # it began first, and was answered
    # ... and what it issued is revoked with the rest: no token carrying what was taken lives on
    live = RefreshToken.objects.filter(application=app.client, revoked__isnull=True)
    if change == "scope taken":
        assert not AccessToken.objects.filter(application=app.client, scope__contains="models.read").exists()
        assert not live.filter(access_token__scope__contains="models.read").exists()
    else:
        assert not live.exists()
        assert not AccessToken.objects.filter(application=app.client, user=alice).exists()
