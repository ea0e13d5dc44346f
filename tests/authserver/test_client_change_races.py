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

SCOPES = "models.read offline_access"


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


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "change",
    [
        pytest.param(
            lambda c: client_update(client=c, actor="test", grant_types=["client-credentials"]), id="narrowed"
        ),
        pytest.param(lambda c: client_disable(client=c, actor="test"), id="disabled"),
    ],
)
def test_a_change_that_revokes_does_not_miss_a_refresh_under_way(
    oauth, make_client, alice, monkeypatch, change
):
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
    auth = (app.client.client_id, app.client_secret)
    refresh = _in_thread(
        lambda: OAuthDriver(http=HttpClient(raise_request_exception=False)).token(form, auth),
        results,
        "refresh",
    )
    assert refreshing.wait(timeout=30)
    changed = _in_thread(lambda: change(Client.objects.get(pk=app.client.pk)), results, "change")
    time.sleep(0.5)
    assert changed.is_alive(), "the change did not wait for the refresh that holds the client"
    go.set()
    refresh.join(timeout=30)
    changed.join(timeout=30)
    assert not isinstance(results.get("change"), Exception), results.get("change")
    assert results["refresh"].status_code == 200  # it began first, and was answered
    # ... and what it issued is revoked with the rest: no refresh token of the user's lives on
    assert not RefreshToken.objects.filter(application=app.client, revoked__isnull=True).exists()
    assert not AccessToken.objects.filter(application=app.client, user=alice).exists()
