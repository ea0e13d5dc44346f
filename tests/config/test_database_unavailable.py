"""A database that cannot be used is a 503 with ``Retry-After`` on every path, never a 500 or a traceback:
RFC 6749's ``temporarily_unavailable`` on the OAuth endpoints, the admin API's own body there, a short page
for people. The pool waits briefly for a connection, and checks one before handing it out, so that one the
server closed (a restart, a failover, ``pg_terminate_backend``) is replaced rather than failing a request.

"Down" is a port nothing listens on (a socket bound, never listening: refused at once) with a fresh pool;
the shared server is never touched. Only this test database's own connections are ever terminated.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from django.conf import settings as django_settings
from django.db import (
    DatabaseError,
    IntegrityError,
    InterfaceError,
    InternalError,
    OperationalError,
    ProgrammingError,
    connections,
)
from django.test import Client as HttpClient
from django.test import RequestFactory
from psycopg_pool import PoolTimeout

from audit.models import AuditEvent
from authserver.models import AccessToken
from config.errors import database_unavailable, server_error
from tests.conftest import basic_auth
from tests.console.test_api import admin_app, admin_scopes_enabled, bearer  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(
    not django_settings.DATABASES["default"]["ENGINE"].endswith("postgresql"), reason="PostgreSQL's pool"
)


@contextmanager
def database_down(timeout: float = 0.3) -> Iterator[None]:
    """Point the default database at a port that refuses connections, through a fresh pool waiting
    ``timeout`` for one; put everything back after."""
    db: Any = connections["default"]  # PostgreSQL's: it has a pool
    db.close()  # the test's connection back to the pool
    db.close_pool()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))  # bound and never listening: a connection is refused at once
    saved = db.settings_dict["HOST"], db.settings_dict["PORT"], db.settings_dict["OPTIONS"]["pool"]
    db.settings_dict["HOST"], db.settings_dict["PORT"] = "127.0.0.1", str(listener.getsockname()[1])
    db.settings_dict["OPTIONS"]["pool"] = {**saved[2], "timeout": timeout}
    try:
        yield
    finally:
        db.close()
        db.close_pool()
        db.settings_dict["HOST"], db.settings_dict["PORT"], db.settings_dict["OPTIONS"]["pool"] = saved
        listener.close()


def assert_temporarily_unavailable(response: Any, request_id: str) -> None:
    assert response.status_code == 503, response.content[:300]
    assert response["Content-Type"] == "application/json"
    assert response["Cache-Control"] == "no-store"
    assert response["Retry-After"] == "5"
    assert response["X-Request-ID"] == request_id
    assert response.json() == {
        "error": "temporarily_unavailable",
        "error_description": "The server cannot reach its database right now; try again shortly "
        f"(request id {request_id})",
    }


def logged_unavailable(caplog: pytest.LogCaptureFixture, path: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "config.errors" and r.levelno == logging.WARNING and path in r.getMessage()
    ]


FORM_ENDPOINTS: dict[str, Callable[[Any], dict[str, str]]] = {
    "/oauth/token/": lambda reg: {"grant_type": "client_credentials", "scope": "models.read"},
    "/oauth/introspect/": lambda reg: {"token": "x" * 40},
    "/oauth/revoke/": lambda reg: {"token": "x" * 40},
    "/oauth/device-authorization/": lambda reg: {"scope": "models.read"},
}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("path", list(FORM_ENDPOINTS))
def test_the_oauth_endpoints_answer_503_temporarily_unavailable_while_the_database_is_down(
    make_client, caplog, path
):
    reg = make_client(grants=("client-credentials", "device-code"))
    issued = AccessToken.objects.count()
    events = AuditEvent.objects.count()
    http = HttpClient(HTTP_X_REQUEST_ID="req-db-down")
    with database_down(), caplog.at_level(logging.WARNING):
        response = http.post(
            path,
            FORM_ENDPOINTS[path](reg),
            HTTP_AUTHORIZATION=basic_auth(reg.client.client_id, reg.client_secret),
        )
    assert_temporarily_unavailable(response, "req-db-down")
    (line,) = logged_unavailable(caplog, path)
    assert "req-db-down" in line.getMessage()
    assert "OperationalError" in line.getMessage()
    # Django's own line for a 5xx, without a traceback: not the 500's
    assert [(r.levelname, r.exc_info) for r in caplog.records if r.name == "django.request"] == [
        ("ERROR", None)
    ]
    assert "Service Unavailable" in caplog.text
    assert reg.client_secret not in caplog.text  # nor the request's body
    assert AccessToken.objects.count() == issued  # nothing was issued; nothing could be recorded either
    assert AuditEvent.objects.count() == events


@pytest.mark.django_db(transaction=True)
def test_in_debug_the_token_endpoint_still_answers_the_json_503_not_the_technical_page(make_client, settings):
    settings.DEBUG = True
    reg = make_client()
    http = HttpClient(HTTP_X_REQUEST_ID="req-db-debug")
    with database_down():
        response = http.post(
            "/oauth/token/",
            {"grant_type": "client_credentials"},
            HTTP_AUTHORIZATION=basic_auth(reg.client.client_id, reg.client_secret),
        )
    assert_temporarily_unavailable(response, "req-db-debug")


@pytest.mark.django_db(transaction=True)
def test_userinfo_answers_503_while_the_database_is_down():
    http = HttpClient(HTTP_X_REQUEST_ID="req-db-userinfo")
    with database_down():
        response = http.get("/oauth/userinfo/", HTTP_AUTHORIZATION="Bearer " + "x" * 40)
    assert_temporarily_unavailable(response, "req-db-userinfo")


@pytest.mark.django_db(transaction=True)
def test_the_admin_api_answers_its_own_503_while_the_database_is_down(bearer):  # noqa: F811
    api = bearer("admin.read")
    with database_down():
        response = api.get("/api/admin/clients/", HTTP_X_REQUEST_ID="req-db-api")
    assert response.status_code == 503
    assert response["Retry-After"] == "5"
    assert response["Cache-Control"] == "no-store"
    assert response.json() == {
        "detail": "Service temporarily unavailable, try again later.",
        "request_id": "req-db-api",
    }


@pytest.mark.django_db(transaction=True)
def test_a_persons_page_answers_a_short_503_page_not_a_traceback(django_user_model, settings):
    settings.DEBUG = True  # the technical page would be this one
    staff = django_user_model.objects.create_user("ops", password="x-long-password-1", is_staff=True)
    http = HttpClient()
    http.force_login(staff)
    with database_down():
        response = http.get("/console/")
    assert response.status_code == 503
    assert response["Content-Type"].startswith("text/html")
    assert response["Retry-After"] == "5"
    assert b"Service unavailable (503)" in response.content
    assert b"Traceback" not in response.content
    assert len(response.content) < 500


@pytest.mark.django_db(transaction=True)
def test_the_token_endpoint_waits_for_a_connection_about_the_pools_two_seconds_not_ten(make_client):
    timeout = django_settings.DATABASES["default"]["OPTIONS"]["pool"]["timeout"]
    assert timeout <= 2
    reg = make_client()
    http = HttpClient(HTTP_X_REQUEST_ID="req-db-wait")
    with database_down(timeout=timeout):
        started = time.monotonic()
        response = http.post(
            "/oauth/token/",
            {"grant_type": "client_credentials"},
            HTTP_AUTHORIZATION=basic_auth(reg.client.client_id, reg.client_secret),
        )
        waited = time.monotonic() - started
    assert_temporarily_unavailable(response, "req-db-wait")
    assert timeout - 0.1 < waited < timeout + 5  # the pool's wait, not the 10 s it was


def _terminate_connections_to_the_test_database() -> int:
    """Terminate every other session on this test database (only this one), as a restart or an idle
    killer would; wait until they are gone. Return how many."""
    params = connections["default"].get_connection_params()
    params.pop("pool", None)
    params.pop("cursor_factory", None)
    params.pop("context", None)
    name = connections["default"].settings_dict["NAME"]
    assert name.startswith("test_")  # never the shared server's other databases
    with psycopg.connect(**params, autocommit=True) as admin:
        pids = [
            pid
            for (pid,) in admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", [name]
            ).fetchall()
        ]
        for pid in pids:
            admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if not admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%s)", [pids]).fetchall():
                break
            time.sleep(0.02)
    return len(pids)


@pytest.mark.django_db(transaction=True)
def test_token_requests_around_a_termination_of_the_pools_connections_both_succeed(make_client, oauth):
    reg = make_client()
    assert oauth.client_credentials(reg).status_code == 200
    connections["default"].close()  # back to the pool, as at the end of a request (the test client keeps it)
    assert _terminate_connections_to_the_test_database() >= 1
    response = oauth.client_credentials(reg)
    assert response.status_code == 200, response.content[:300]
    assert response.json()["token_type"] == "Bearer"


def test_the_pool_checks_each_connection_through_djangos_health_check_setting():
    database = django_settings.DATABASES["default"]
    assert database["CONN_HEALTH_CHECKS"] is True  # Django 5.1+: check=ConnectionPool.check_connection
    assert "check" not in database["OPTIONS"]["pool"]  # both: a TypeError at the first connection


@pytest.mark.parametrize(
    "exc",
    [
        OperationalError("connection refused"),
        InterfaceError("connection already closed"),
        PoolTimeout("couldn't get a connection after 2.00 sec"),
        psycopg.OperationalError("consuming input failed: server closed the connection unexpectedly"),
    ],
)
def test_what_says_the_database_cannot_be_used_is_unavailable(exc):
    assert database_unavailable(exc)


def _wrapped(django_class: type[DatabaseError], psycopg_error: psycopg.Error) -> DatabaseError:
    """A Django error as Django raises it: from psycopg's, which holds the SQLSTATE."""
    try:
        raise django_class(str(psycopg_error)) from psycopg_error
    except DatabaseError as exc:
        return exc


@pytest.mark.parametrize(
    ("exc", "unavailable"),
    [
        (_wrapped(InternalError, psycopg.errors.ReadOnlySqlTransaction("read-only transaction")), True),
        (_wrapped(OperationalError, psycopg.errors.AdminShutdown("terminating connection")), True),
        (_wrapped(IntegrityError, psycopg.errors.UniqueViolation("duplicate key")), False),
        (_wrapped(ProgrammingError, psycopg.errors.UndefinedTable("no such table")), False),
        (_wrapped(OperationalError, psycopg.errors.TooManyConnections("too many clients")), True),
        (_wrapped(OperationalError, psycopg.errors.DeadlockDetected("deadlock detected")), True),
        (_wrapped(OperationalError, psycopg.errors.QueryCanceled("statement timeout")), True),
        # a query's own fault, which an attacker's input may cause: a 500 with its traceback, not an outage
        (_wrapped(OperationalError, psycopg.errors.ProgramLimitExceeded("index row size exceeds")), False),
        (ValueError("not a database error"), False),
    ],
)
def test_a_read_only_database_is_unavailable_and_a_refused_query_is_not(exc, unavailable):
    assert database_unavailable(exc) is unavailable


@pytest.mark.parametrize(
    ("exc", "status"), [(OperationalError("the server closed the connection"), 503), (ValueError("x"), 500)]
)
def test_a_database_error_raised_outside_a_view_is_a_503_too_and_any_other_a_500(exc, status):
    request = RequestFactory().post("/oauth/token/")
    request.request_id = "req-outside"  # type: ignore[attr-defined]
    try:
        raise exc
    except Exception:
        response = server_error(request)  # Django's handler500, called while the exception is handled
    assert response.status_code == status
    assert response["Cache-Control"] == "no-store"
    error = json.loads(response.content)["error"]
    assert error == {503: "temporarily_unavailable", 500: "server_error"}[status]
