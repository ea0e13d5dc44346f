"""Admin API permission: admin scopes for tokens, staff (read) or superuser (write) for sessions."""

from __future__ import annotations

from typing import Any

from rest_framework import permissions

from console.access import can_read, can_write
from console.api.authentication import AdminToken

READ_SCOPE = "admin.read"
WRITE_SCOPE = "admin.write"


def api_actor(request: Any) -> str:
    """Return the audit actor of an API request: the user, or the client of a client-credentials token."""
    auth = request.auth
    if isinstance(auth, AdminToken) and auth.user is None:
        return f"client:{auth.client_id}"
    return f"user:{request.user.get_username()}"


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
