"""The OAuth endpoints on the thread pool answer as Django does, and refuse early what it would not."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

from audit.context import request_id_var
from audit.models import AuditEvent
from config.threadpool import POOLED_PATHS, ThreadPoolDjango
from tests.conftest import basic_auth

pytestmark = pytest.mark.django_db(transaction=True)  # the pool's threads use their own connections


@pytest.fixture
def pooled() -> Iterator[ThreadPoolDjango]:
    app = ThreadPoolDjango(threads=2)
    yield app
    app.pool.shutdown(wait=True)


def call(
    app: ThreadPoolDjango,
    path: str,
    *,
    method: str = "POST",
    body: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    chunks: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Drive the ASGI app once; return the messages it sent."""
    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver"), *(headers or [])],
        "client": ("198.51.100.7", 50000),
        "server": ("127.0.0.1", 8000),
    }
    inbox = chunks if chunks is not None else [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return inbox.pop(0)

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":  # uvicorn writes its access-log line in send()
            message = {**message, "logged_request_id": request_id_var.get()}
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def form(**fields: str) -> bytes:
    return "&".join(f"{k}={v}" for k, v in fields.items()).encode()


FORM = (b"content-type", b"application/x-www-form-urlencoded")


def test_a_token_request_is_answered_and_audited_with_the_callers_address(pooled, make_client):
    reg = make_client()
    auth = (b"authorization", basic_auth(reg.client.client_id, reg.client_secret).encode())
    # sent without Content-Length (as a chunked upload would be): the pool counts what it read
    sent = call(pooled, "/oauth/token/", body=form(grant_type="client_credentials"), headers=[FORM, auth])
    start, body = sent
    headers = dict(start["headers"])
    assert start["status"] == 200
    assert headers[b"cache-control"] == b"no-store"
    assert b"x-request-id" in headers
    assert json.loads(body["body"])["token_type"] == "Bearer"
    event = AuditEvent.objects.get(kind="token.issued")
    assert event.ip == "198.51.100.7"


def test_refusals_match_what_djangos_own_handler_answers(pooled, make_client, client):
    reg = make_client()
    wrong = basic_auth(reg.client.client_id, "not-the-secret")
    start, body = call(
        pooled,
        "/oauth/token/",
        body=form(grant_type="client_credentials"),
        headers=[FORM, (b"authorization", wrong.encode())],
    )
    direct = client.post("/oauth/token/", {"grant_type": "client_credentials"}, HTTP_AUTHORIZATION=wrong)
    assert start["status"] == direct.status_code == 401
    assert json.loads(body["body"]) == json.loads(direct.content)
    assert dict(start["headers"])[b"www-authenticate"].decode() == direct["WWW-Authenticate"]
    assert call(pooled, "/oauth/token/", method="GET")[0]["status"] == client.get("/oauth/token/").status_code


def test_an_oversized_body_is_refused_before_django_reads_it(pooled, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    chunks = [{"type": "http.request", "body": b"a" * 600, "more_body": True}] * 2
    start, body = call(pooled, "/oauth/token/", chunks=chunks)
    assert start["status"] == 413
    assert json.loads(body["body"])["error"] == "invalid_request"
    assert (b"connection", b"close") in start["headers"]
    event = AuditEvent.objects.get(kind="token.denied")
    assert (event.ip, event.data) == ("198.51.100.7", {"error_code": "invalid_request", "status": 413})


def test_a_declared_length_over_the_limit_is_refused_before_any_body_is_read(pooled, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    never_read = [{"type": "http.disconnect"}]  # reading it would be ClientGone: nothing answered
    start, body = call(pooled, "/oauth/token/", headers=[(b"content-length", b"5000")], chunks=never_read)
    assert start["status"] == 413
    assert (b"connection", b"close") in start["headers"]


def test_a_refusal_is_recorded_with_its_own_request_id_not_the_last_request_the_thread_ran(settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    app = ThreadPoolDjango(threads=1)  # one thread: the refusal runs where the request before it ran
    try:
        call(
            app,
            "/oauth/token/",
            body=b"grant_type=password",
            headers=[(b"x-request-id", b"first-request-01")],
        )
        start, _body = call(
            app, "/oauth/token/", headers=[(b"content-length", b"5000")], chunks=[{"type": "http.disconnect"}]
        )
    finally:
        app.pool.shutdown(wait=True)
    assert start["status"] == 413
    first, refusal = AuditEvent.objects.filter(kind="token.denied").order_by("seq")
    assert first.request_id == "first-request-01"
    assert refusal.data["status"] == 413
    assert refusal.request_id not in ("first-request-01", "")  # a new one of its own


def access_log_ids(app: ThreadPoolDjango, **request: Any) -> tuple[str, str]:
    """The request id uvicorn's access-log line would carry, and the X-Request-ID the answer carries."""
    start = call(app, "/oauth/token/", **request)[0]
    return start["logged_request_id"], dict(start["headers"])[b"x-request-id"].decode()


def test_the_access_log_line_of_a_pooled_request_carries_its_request_id(pooled, settings):
    logged, answered = access_log_ids(pooled, headers=[FORM])
    assert logged == answered != "-"  # the id was set in a pool thread, out of the access log's sight
    logged, answered = access_log_ids(pooled, headers=[(b"x-request-id", b"sent-by-client-1")])
    assert logged == answered == "sent-by-client-1"
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000  # refused before Django: the id its audit record has
    logged, answered = access_log_ids(pooled, headers=[(b"content-length", b"5000")])
    assert logged == answered == AuditEvent.objects.get(data__status=413).request_id


def test_a_header_repeated_past_the_limit_is_a_400(pooled):
    start, body = call(pooled, "/oauth/introspect/", headers=[(b"x-a", b"1")] * 101)
    assert start["status"] == 400
    assert json.loads(body["body"])["error"] == "invalid_request"
    assert AuditEvent.objects.get(kind="introspect.denied").data["status"] == 400


def test_a_client_that_leaves_mid_body_gets_nothing_run(pooled):
    chunks: list[dict[str, Any]] = [
        {"type": "http.request", "body": b"grant", "more_body": True},
        {"type": "http.disconnect"},
    ]
    assert call(pooled, "/oauth/token/", chunks=chunks) == []
    assert not AuditEvent.objects.exists()


def test_only_the_machine_endpoints_are_pooled():
    assert POOLED_PATHS == {"/oauth/token/", "/oauth/revoke/", "/oauth/introspect/"}


@pytest.mark.parametrize(("pool_size", "threads"), [(16, 12), (32, 12), (10, 6), (3, 1), (None, 12)])
def test_the_thread_count_leaves_spare_database_connections(pool_size, threads):
    from config.threadpool import threads_for_pool

    database: dict[str, Any] = {"OPTIONS": {}}
    if pool_size is not None:
        database["OPTIONS"]["pool"] = {"min_size": 1, "max_size": pool_size}
    assert threads_for_pool(database) == threads


def test_a_refusal_is_answered_even_when_the_database_cannot_record_it(pooled, settings, monkeypatch):
    from django.db import OperationalError

    import audit.services

    def down(**kwargs: Any) -> None:
        raise OperationalError("the database is down")

    monkeypatch.setattr(audit.services, "audit_record", down)
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    start, _body = call(pooled, "/oauth/token/", headers=[(b"content-length", b"5000")], chunks=[])
    assert start["status"] == 413
