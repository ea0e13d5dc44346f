"""Users, as administrators lock and unlock them."""

from __future__ import annotations

from typing import Any

from axes.utils import reset as axes_reset
from django.core.exceptions import ValidationError

from audit.services import audit_record
from authserver.services.tokens import tokens_revoke_for_user


def user_lock(*, user: Any, actor: str) -> None:
    """Lock a user out: no sign-in, and every token they hold is revoked at once."""
    if actor == f"user:{user.get_username()}":
        raise ValidationError({"user": ["you cannot lock yourself out"]})
    user.is_active = False
    user.save(update_fields=["is_active"])
    audit_record(kind="user.locked", actor=actor, data={"user": user.get_username()})
    tokens_revoke_for_user(user=user, actor=actor, reason="user locked")


def user_unlock(*, user: Any, actor: str) -> None:
    """Unlock a user: allow sign-in again and clear their failed-login lockouts (django-axes)."""
    user.is_active = True
    user.save(update_fields=["is_active"])
    axes_reset(username=user.get_username())
    audit_record(kind="user.unlocked", actor=actor, data={"user": user.get_username()})
