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
    user.deactivated_by = actor, "user locked"  # the save's receiver revokes their tokens, as this actor
    user.save(update_fields=["is_active"])
    audit_record(kind="user.locked", actor=actor, data={"user": user.get_username()})


def user_deactivated(*, user: Any) -> None:
    """A user's ``is_active`` went from true to false, by whatever path (``user_lock``, the Django admin, a
    shell): every token they hold is revoked at once. Only ``user_lock`` said who; otherwise it was saved
    past the services, and the revocation's actor is ``system``."""
    actor, reason = getattr(user, "deactivated_by", None) or ("system", "user deactivated")
    user.deactivated_by = None
    tokens_revoke_for_user(user=user, actor=actor, reason=reason)


def user_unlock(*, user: Any, actor: str) -> None:
    """Unlock a user: allow sign-in again and clear their failed-login lockouts (django-axes)."""
    user.is_active = True
    user.save(update_fields=["is_active"])
    axes_reset(username=user.get_username())
    audit_record(kind="user.unlocked", actor=actor, data={"user": user.get_username()})
