"""Error pages for the paths machines call: the OAuth endpoints and discovery documents answer an
RFC 6749 §5.2 body, and the admin API the body its other errors have (``{"detail": ...}``), where Django
would answer its HTML page. People's pages (the console, login, the consent screen and the device pages,
the admin site) keep Django's.

Django calls these for an error no view answered: 404 for an unknown path, 400 for a request it refused
(a disallowed host), 403 for a permission refused by an exception, 500 for an exception a view let escape
(Django has logged it with its traceback, without the query string: ``audit.context``). The request id
is in the body, so that a client's report can be matched with that log line.

A database that cannot be used (down, unreachable, a connection it closed, no pooled connection free in
time, read-only after a failover: ``database_unavailable``) is a 503 with ``Retry-After`` wherever it
escapes, not a 500: ``temporarily_unavailable`` on the OAuth endpoints, the admin API's own body there, and
a short page for people (never a traceback, in DEBUG either). It is logged as a warning naming the path,
the request id and the error, never the request's body or query string.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import psycopg
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import defaults

from audit.ingest import sqlstate, sqlstate_unavailable
from authserver.views.common import oauth_error

logger = logging.getLogger(__name__)

OAUTH_PREFIXES = ("/oauth/", "/.well-known/")
PAGES_UNDER_OAUTH = ("/oauth/authorize/", "/oauth/device/")  # the consent screen and the device pages
API_PREFIX = "/api/"

# status: (the RFC 6749 error code, what the admin API says, the description)
_ERRORS: dict[int, tuple[str, str, str]] = {
    400: ("invalid_request", "Bad request.", "The request was refused before it reached an endpoint"),
    403: ("access_denied", "Permission denied.", "The request is not allowed"),
    404: ("not_found", "Not found.", "No endpoint answers at this path"),
    405: ("invalid_request", "Method not allowed.", "This endpoint does not take this method"),
    500: ("server_error", "Server error.", "The server met an unexpected condition"),
    # RFC 6749 §4.1.2.1's code; DRF's ServiceUnavailable's words
    503: (
        "temporarily_unavailable",
        "Service temporarily unavailable, try again later.",
        "The server cannot reach its database right now; try again shortly",
    ),
}
# Seconds a client is asked to wait: a restart or a failover takes this long or more, and a client that
# retries at once only adds to the requests that wait for a connection.
RETRY_AFTER_S = 5
UNAVAILABLE_PAGE = (
    "<!doctype html><title>Service unavailable</title><h1>Service unavailable (503)</h1>"
    "<p>The service cannot reach its database right now. Try again in a moment.</p>"
)
# What says the database cannot be used now rather than that a query is wrong: Django's OperationalError
# and InterfaceError, and psycopg's own where Django does not translate them (COPY), with no SQLSTATE (no
# server answered: a connection refused or closed, psycopg_pool's PoolTimeout when no pooled connection was
# free in time); any error whose SQLSTATE says the server cannot take work now (``sqlstate_unavailable``:
# shutting down, read-only, out of connections, a lost connection); and the refusals a retry gets past (a
# serialization failure, a deadlock, a lock or statement timeout). An OperationalError that is a query's own
# fault (a value past a program limit, 54xxx) stays a 500 with its traceback: a bug, not an outage.
UNAVAILABLE = (OperationalError, InterfaceError, psycopg.OperationalError, psycopg.InterfaceError)
TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03", "57014"})


def database_unavailable(exc: BaseException) -> bool:
    """Whether an exception says the database cannot be used right now (a 503), not that a query failed."""
    state = sqlstate(exc)
    if state is None:
        return isinstance(exc, UNAVAILABLE)
    return sqlstate_unavailable(exc) or state in TRANSIENT_SQLSTATES


def _machine_error(request: HttpRequest, status: int) -> HttpResponse | None:
    """The JSON error for a machine's path, or None for a person's page."""
    path = request.path
    code, detail, description = _ERRORS[status]
    request_id = getattr(request, "request_id", "")
    if path.startswith(PAGES_UNDER_OAUTH):
        return None
    if path.lower().lstrip("/").startswith("v1"):  # "//v1/...", "/V1/...": not the gateway's route
        kind = (
            "not_found_error" if status == 404 else "api_error" if status >= 500 else "invalid_request_error"
        )
        error = {"message": f"{description}.", "type": kind, "param": None, "code": code}
        return JsonResponse({"error": error}, status=status)
    if path.startswith(OAUTH_PREFIXES):
        if request_id:
            description = f"{description} (request id {request_id})"
        return oauth_error(code, description, status=status)
    if not path.startswith(API_PREFIX):
        return None
    response = JsonResponse({"detail": detail, "request_id": request_id}, status=status)
    response["Cache-Control"] = "no-store"  # as every other answer of the admin API
    response["Pragma"] = "no-cache"
    return response


def _with_exception(status: int, page: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    def view(request: HttpRequest, exception: Exception) -> HttpResponse:
        return _machine_error(request, status) or page(request, exception)

    view.__name__ = page.__name__
    return view


bad_request = _with_exception(400, defaults.bad_request)
permission_denied = _with_exception(403, defaults.permission_denied)
page_not_found = _with_exception(404, defaults.page_not_found)


def database_unavailable_response(request: HttpRequest, exc: BaseException) -> HttpResponse | None:
    """The 503 for an exception that says the database cannot be used, logged; None for any other."""
    if not database_unavailable(exc):
        return None
    reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    logger.warning(
        "the database is unavailable: %s %s answered 503 (request %s): %s: %s",
        request.method,
        request.path[:200],
        getattr(request, "request_id", "-"),
        type(exc).__name__,
        reason,
    )
    response = _machine_error(request, 503) or HttpResponse(UNAVAILABLE_PAGE, status=503)
    response["Retry-After"] = str(RETRY_AFTER_S)
    response["Cache-Control"] = "no-store"
    return response


def server_error(request: HttpRequest) -> HttpResponse:
    """Django's handler500: called while the exception is handled, outside a view too (a middleware's)."""
    exc = sys.exc_info()[1]
    unavailable = database_unavailable_response(request, exc) if exc is not None else None
    return unavailable or _machine_error(request, 500) or defaults.server_error(request)


class MachineErrorMiddleware:
    """Give a 405 that a view answered with Django's empty page (``require_GET``, a class-based view's
    ``http_method_not_allowed``) the JSON error of its path, keeping its ``Allow``. The form endpoints
    answer their own 405, audited.

    A view's exception that says the database cannot be used is answered here with its 503
    (``process_exception``), before Django would log a 500 and answer its page (in DEBUG, the technical
    page, whatever the path); one raised outside a view reaches ``server_error``."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if response.status_code != 405 or response.get("Content-Type", "").startswith("application/json"):
            return response
        shaped = _machine_error(request, 405)
        if shaped is None:
            return response
        if "Allow" in response:
            shaped["Allow"] = response["Allow"]
        return shaped

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        return database_unavailable_response(request, exception)
