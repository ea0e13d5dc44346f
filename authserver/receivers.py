"""Signal receivers: they only announce, handing each event to a service or to the audit log."""

from __future__ import annotations

import time
from typing import Any

from axes.signals import user_locked_out
from django.contrib.auth.signals import user_logged_in, user_login_failed
from django.db.models.signals import post_delete
from django.dispatch import receiver

from audit.services import audit_record
from authserver.models import AUTH_TIME_SESSION_KEY, AccessToken
from authserver.services import access_tokens_deleted


@receiver(post_delete, sender=AccessToken)
def access_token_deleted(sender: Any, instance: AccessToken, **kwargs: Any) -> None:
    # DOT revokes an access token by deleting its row; every path (RFC 7009, rotation, family revocation,
    # code replay, a disabled client) therefore passes here, and the revocation is pushed to gateways.
    access_tokens_deleted([instance])


@receiver(user_logged_in)
def login_succeeded(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    if request is not None and hasattr(request, "session"):
        request.session[AUTH_TIME_SESSION_KEY] = int(time.time())  # this session's sign-in, for max_age
    audit_record(kind="login.succeeded", actor=f"user:{user.get_username()}")


@receiver(user_login_failed)
def login_failed(sender: Any, credentials: dict[str, Any], request: Any = None, **kwargs: Any) -> None:
    username = str(credentials.get("username", ""))[:150]
    audit_record(kind="login.failed", outcome="failure", actor=f"user:{username}")


@receiver(user_locked_out)
def login_locked_out(
    sender: Any, request: Any, username: str | None = None, ip_address: str | None = None, **kwargs: Any
) -> None:
    audit_record(
        kind="login.locked_out", outcome="denied", actor=f"user:{(username or '')[:150]}", ip=ip_address
    )
