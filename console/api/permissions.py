"""Admin API permission: admin scopes for tokens, staff (read) or superuser (write) for sessions."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user
from rest_framework import exceptions, permissions

from audit.services import actor_for_user
from console.access import can_read, can_write, denial_record
from console.api.authentication import AdminToken

READ_SCOPE = "admin.read"
WRITE_SCOPE = "admin.write"


def api_actor(request: Any) -> str:
    """Return the audit actor of an API request: the user, or the client of a client-credentials token."""
    auth = request.auth
    if isinstance(auth, AdminToken) and auth.user is None:
        return f"client:{auth.client_id}"
    return f"user:{request.user.get_username()}"


def api_denial_record(request: Any, exc: exceptions.APIException) -> None:
    """Audit a refused admin API request (``admin_api.denied``): a bad token, a missing scope or right,
    a failed CSRF check. A request without any credentials is not one: it is answered 401 and nothing
    more, as anonymous visits to the console pages are sent to the login."""
    auth = request.auth
    if isinstance(auth, AdminToken):
        actor, client_id = api_actor(request), auth.client_id
    else:  # DRF has set the user to anonymous by now; the session still says who it was (a CSRF failure)
        actor, client_id = actor_for_user(get_user(request._request)), ""
    denial_record(
        request._request, kind="admin_api.denied", reason=str(exc.detail), actor=actor, client_id=client_id
    )


class AdminAccess(permissions.BasePermission):
    """GET and HEAD need read rights (``admin.read``), everything else write rights (``admin.write``).

    A user-delegated token needs both the scope and the user's own console rights; a session needs
    the console rights (staff to read, superuser to write).
    """

    message = "You do not have permission to use the admin API."

    def has_permission(self, request: Any, view: Any) -> bool:
        write = request.method not in permissions.SAFE_METHODS
        user = request.user
        auth = request.auth
        if isinstance(auth, AdminToken):
            granted = {WRITE_SCOPE} if write else {READ_SCOPE, WRITE_SCOPE}  # write implies read
            if not granted & auth.scopes:
                return False
            if auth.user is None:
                return True
            return can_write(user) if write else can_read(user)
        return can_write(user) if write else can_read(user)
