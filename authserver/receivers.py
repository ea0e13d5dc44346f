"""Signal receivers: they only announce, handing each event to a service or to the audit log."""

from __future__ import annotations

import time
from typing import Any

from axes.signals import user_locked_out
from django.conf import settings
from django.contrib.auth.signals import user_logged_in, user_login_failed
from django.db.models.signals import post_delete, post_save, pre_save
from django.dispatch import receiver

from audit.services import audit_record
from authserver.models import AUTH_TIME_SESSION_KEY, AccessToken
from authserver.services import access_tokens_deleted, user_deactivated


@receiver(post_delete, sender=AccessToken)
def access_token_deleted(sender: Any, instance: AccessToken, **kwargs: Any) -> None:
    # DOT revokes an access token by deleting its row; every path (RFC 7009, rotation, family revocation,
    # code replay, a disabled client) therefore passes here, and the revocation is pushed to gateways.
    access_tokens_deleted([instance])


@receiver(pre_save, sender=settings.AUTH_USER_MODEL)
def user_saving(sender: Any, instance: Any, update_fields: Any = None, **kwargs: Any) -> None:
    # is_active going from true to false by any path: the Django admin's checkbox revoked nothing before
    instance.deactivating = (
        instance.pk is not None
        and not instance.is_active
        and (update_fields is None or "is_active" in update_fields)
        and sender.objects.filter(pk=instance.pk, is_active=True).exists()
    )


@receiver(post_save, sender=settings.AUTH_USER_MODEL)
def user_saved(sender: Any, instance: Any, **kwargs: Any) -> None:
    if getattr(instance, "deactivating", False):
        instance.deactivating = False
        user_deactivated(user=instance)


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
