"""Error pages for the paths machines call: the OAuth endpoints and discovery documents answer an
RFC 6749 §5.2 body, and the admin API the body its other errors have (``{"detail": ...}``), where Django
would answer its HTML page. People's pages (the console, login, the consent screen and the device pages,
the admin site) keep Django's.

Django calls these for an error no view answered: 404 for an unknown path, 400 for a request it refused
(a disallowed host), 403 for a permission refused by an exception, 500 for an exception a view let escape
(Django has logged it with its traceback, without the query string: ``audit.context``). The request id
is in the body, so that a client's report can be matched with that log line.
"""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import defaults

from authserver.views.common import oauth_error

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
}


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


def server_error(request: HttpRequest) -> HttpResponse:
    return _machine_error(request, 500) or defaults.server_error(request)


class MachineErrorMiddleware:
    """Give a 405 that a view answered with Django's empty page (``require_GET``, a class-based view's
    ``http_method_not_allowed``) the JSON error of its path, keeping its ``Allow``. The form endpoints
    answer their own 405, audited."""

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
