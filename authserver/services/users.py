"""Users: administrators lock and unlock them, and every change to who may sign in and with what rights is
recorded, whichever path made it (the console, the Django admin, ``createsuperuser``, a shell)."""

from __future__ import annotations

from typing import Any

from axes.utils import reset as axes_reset
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.utils.crypto import salted_hmac

from audit.services import audit_record, request_actor
from authserver.services.tokens import tokens_revoke_for_user

SIGN_IN_NAME_CHARS = 150  # Django's user name column


def sign_in_name(typed: Any) -> str:
    """The user name a sign-in was tried with, as the audit log and django-axes keep it: the name of a user
    who exists, else ``?`` and a keyed hash of what was typed (16 hex digits).

    What is typed there is sometimes a password (in the wrong field, or the line after the user name), and
    the audit log is append-only: kept as typed, it stayed for the retention period, on the console, in
    exports and in the live feed. A hash under the server's key still tells repeated guesses at one name
    apart from guesses at many (the lockout, the anomaly scan's login_spread), and no user name can begin
    with ``?`` (Django's user name characters are letters, digits and ``@.+-_``)."""
    name = str(typed or "")[:SIGN_IN_NAME_CHARS]
    users = get_user_model()
    if name and users._default_manager.filter(**{users.USERNAME_FIELD: name}).exists():
        return name
    return "?" + salted_hmac("authserver.sign_in_name", name).hexdigest()[:16]


def axes_username(request: Any, credentials: dict[str, Any] | None) -> str:
    """django-axes' ``AXES_USERNAME_CALLABLE``: the name its lockouts and attempts are kept under."""
    typed = (credentials or {}).get("username")
    if typed is None and request is not None:
        typed = request.POST.get("username")
    return sign_in_name(typed)


def user_lock(*, user: Any, actor: str) -> None:
    """Lock a user out: no sign-in, and every token they hold is revoked at once."""
    if actor == f"user:{user.get_username()}":
        raise ValidationError({"user": ["you cannot lock yourself out"]})
    user.is_active = False
    user.deactivated_by = actor, "user locked"  # the save's receiver revokes their tokens, as this actor
    user.activity_audited = True  # recorded below as user.locked, not again as user.changed
    user.save(update_fields=["is_active"])
    audit_record(kind="user.locked", actor=actor, data={"user": user.get_username()})


def user_deactivated(*, user: Any) -> None:
    """A user's ``is_active`` went from true to false, by whatever path (``user_lock``, the Django admin, a
    shell): every token they hold is revoked at once. ``user_lock`` says who; otherwise the actor is the
    signed-in user of the request that saved it (the Django admin), or ``system``."""
    actor, reason = getattr(user, "deactivated_by", None) or (request_actor(), "user deactivated")
    user.deactivated_by = None
    tokens_revoke_for_user(user=user, actor=actor, reason=reason)


def user_unlock(*, user: Any, actor: str) -> None:
    """Unlock a user: allow sign-in again and clear their failed-login lockouts (django-axes)."""
    user.is_active = True
    user.activity_audited = True
    user.save(update_fields=["is_active"])
    axes_reset(username=user.get_username())
    audit_record(kind="user.unlocked", actor=actor, data={"user": user.get_username()})


# The fields that decide who may sign in and what they may do: the console reads is_staff (look) and
# is_superuser (change); the Django admin reads both and the permissions below.
USER_RIGHTS = ("is_active", "is_staff", "is_superuser")


def user_rights_before(*, user: Any, update_fields: Any) -> dict[str, bool] | None:
    """The rights a user held before this save (None for a new user or a save that changes none of them).

    Read only when the save may change them: a sign-in's save of ``last_login`` alone reads nothing."""
    fields = [f for f in USER_RIGHTS if update_fields is None or f in update_fields]
    if user.pk is None or not fields:
        return None
    before: dict[str, bool] | None = type(user).objects.filter(pk=user.pk).values(*fields).first()
    return before


def user_saved_audit(*, user: Any, created: bool, before: dict[str, bool] | None) -> None:
    """Record a user's creation, a change of their rights, or a new password, by whatever path it came.

    A password is never recorded, only that it changed (Django's ``set_password`` marks it; the hash
    upgrade at sign-in does not)."""
    actor, name = request_actor(), user.get_username()
    if created:
        rights = {f: bool(getattr(user, f)) for f in USER_RIGHTS}
        audit_record(kind="user.created", actor=actor, data={"user": name, **rights})
        return
    changed = {f: bool(getattr(user, f)) for f, old in (before or {}).items() if old != getattr(user, f)}
    if getattr(user, "activity_audited", False):
        user.activity_audited = False
        changed.pop("is_active", None)  # user_lock and user_unlock record it as user.locked or user.unlocked
    if changed:
        audit_record(kind="user.changed", actor=actor, data={"user": name, "changed": changed})
    if getattr(user, "_password", None) is not None:
        audit_record(kind="user.password_changed", actor=actor, data={"user": name})


def user_deleted_audit(*, user: Any) -> None:
    """Record a user's deletion (their tokens go with them: each deletion is a revocation)."""
    audit_record(kind="user.deleted", actor=request_actor(), data={"user": user.get_username()})


def user_memberships_audit(*, kind: str, holders: list[str], action: str, names: list[str]) -> None:
    """Record groups or permissions given to or taken from users or groups (``holders``), one record each."""
    key = "user" if kind.startswith("user.") else "group"
    for holder in holders:
        audit_record(
            kind=kind, actor=request_actor(), data={key: holder, "action": action, "names": sorted(names)}
        )


def group_deleted_audit(*, name: str, users: list[str], permissions: list[str]) -> None:
    """Record a group's deletion with the users it held and the permissions it gave them: the deletion's
    cascade takes both without a word (no ``m2m_changed``), so this is the record of the rights taken."""
    audit_record(
        kind="group.deleted",
        actor=request_actor(),
        data={"group": name, "users": sorted(users), "permissions": sorted(permissions)},
    )
