"""Who may use the console: the one place that answers it, for pages, the live feed and the API.

- **Read** (every console page, the live feed, GET on the admin API): an active staff user (``is_staff``).
- **Write** (every change: create, edit, rotate, disable, revoke, lock, policy): an active superuser.
  A staff user who is not a superuser can look at everything and change nothing.
- Anyone signed in may use their own Connected apps page.

Anonymous visitors are sent to the login page; signed-in users without the permission get a 403 and
never any data, and the refusal is an audit event (``console.denied``: who, which page, which method).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest
from django.http.response import HttpResponseBase

from audit.services import actor_for_user, audit_record

View = Callable[..., HttpResponseBase]


def can_read(user: Any) -> bool:
    """Return whether this user may see the console."""
    return bool(user is not None and user.is_authenticated and user.is_active and user.is_staff)


def can_write(user: Any) -> bool:
    """Return whether this user may change anything through the console or the API."""
    return can_read(user) and bool(user.is_superuser)


def console_view(*, write: bool = False) -> Callable[[View], View]:
    """Guard a console view: login for anonymous users, 403 without the read (or write) permission, and
    ``Cache-Control: no-store, private`` on what it answers.

    The decorated view carries ``console_access`` ("read" or "write") so tests can check every URL.
    """

    def decorate(view: View) -> View:
        @wraps(view)
        def guarded(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            if not request.user.is_authenticated:
                return redirect_to_login(request.get_full_path())
            if not (can_write(request.user) if write else can_read(request.user)):
                denial_record(
                    request,
                    kind="console.denied",
                    reason="no_write_permission" if write else "no_read_permission",
                )
                raise PermissionDenied("You do not have permission to use this page.")
            return _uncached(view(request, *args, **kwargs))

        guarded.console_access = "write" if write else "read"  # type: ignore[attr-defined]
        return guarded

    return decorate


def denial_record(
    request: HttpRequest, *, kind: str, reason: str, actor: str = "", client_id: str = ""
) -> None:
    """Audit a refused console or admin API request: who asked, for which endpoint, and why not.

    The endpoint is the URL's name (``console:client-edit``), never the raw path, which is the caller's own
    text and could hold anything.
    """
    match = request.resolver_match
    audit_record(
        kind=kind,
        outcome="denied",
        actor=actor or actor_for_user(request.user),
        client_id=client_id,
        data={
            "reason": reason[:200],
            "endpoint": match.view_name if match is not None else "",
            "method": request.method or "",
        },
    )


def _uncached(response: HttpResponseBase) -> HttpResponseBase:
    """Clients, tokens, users, audit records, a user's apps: for no cache, nor for the back button after
    signing out. A page that set its own (a secret shown once: no-store) keeps it."""
    response.headers.setdefault("Cache-Control", "no-store, private")
    return response


def signed_in_view(view: View) -> View:
    """Guard a page for any signed-in user (their own Connected apps), uncached."""

    @wraps(view)
    def guarded(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        if not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path())
        return _uncached(view(request, *args, **kwargs))

    guarded.console_access = "user"  # type: ignore[attr-defined]
    return guarded


def actor(request: HttpRequest) -> str:
    """Return the audit actor for the user behind a request (``user:<username>``)."""
    return actor_for_user(request.user)
