"""Signal receivers: they only announce, handing each event to a service or to the audit log."""

from __future__ import annotations

import time
from typing import Any

from axes.signals import user_locked_out
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.db.models.signals import m2m_changed, post_delete, post_save, pre_delete, pre_save
from django.dispatch import receiver

from audit.services import audit_record
from authserver.models import AUTH_TIME_SESSION_KEY, SIGN_OUT_DETAILS, AccessToken
from authserver.services import access_tokens_deleted, user_deactivated
from authserver.services.users import (
    group_deleted_audit,
    sign_in_name,
    user_deleted_audit,
    user_memberships_audit,
    user_rights_before,
    user_saved_audit,
)

User = get_user_model()


@receiver(post_delete, sender=AccessToken)
def access_token_deleted(sender: Any, instance: AccessToken, **kwargs: Any) -> None:
    # DOT revokes an access token by deleting its row; every path (RFC 7009, rotation, family revocation,
    # code replay, a disabled client) therefore passes here, and the revocation is pushed to gateways.
    access_tokens_deleted([instance])


@receiver(pre_save, sender=settings.AUTH_USER_MODEL)
def user_saving(sender: Any, instance: Any, update_fields: Any = None, **kwargs: Any) -> None:
    instance.rights_before = before = user_rights_before(user=instance, update_fields=update_fields)
    # is_active going from true to false by any path: the Django admin's checkbox revoked nothing before
    instance.deactivating = bool(before and before.get("is_active") and not instance.is_active)


@receiver(post_save, sender=settings.AUTH_USER_MODEL)
def user_saved(sender: Any, instance: Any, created: bool, raw: bool = False, **kwargs: Any) -> None:
    if getattr(instance, "deactivating", False):
        instance.deactivating = False
        user_deactivated(user=instance)
    if not raw:  # a fixture's rows are data being loaded, not changes anyone made
        user_saved_audit(user=instance, created=created, before=getattr(instance, "rights_before", None))


@receiver(post_delete, sender=settings.AUTH_USER_MODEL)
def user_deleted(sender: Any, instance: Any, **kwargs: Any) -> None:
    user_deleted_audit(user=instance)


@receiver(pre_delete, sender=Group)
def group_deleting(sender: Any, instance: Group, **kwargs: Any) -> None:
    # read before the cascade takes them: it sends no m2m_changed for the users and permissions it removes
    users = [u.get_username() for u in instance.user_set.all()]
    permissions = [_label(p) for p in instance.permissions.select_related("content_type")]
    group_deleted_audit(name=instance.name, users=users, permissions=permissions)


# Groups and permissions given or taken, from either side (a user's groups, or a group's users): the
# record kind, and the accessor from each side to the other for a clear.
_MEMBERSHIPS = {
    User.groups.through: ("user.groups_changed", "groups", "user_set"),
    User.user_permissions.through: ("user.permissions_changed", "user_permissions", "user_set"),
    Group.permissions.through: ("group.permissions_changed", "permissions", "group_set"),
}
# A removal is read before it happens, as a clear is: remove() reports every id it was given, held or not.
_ACTIONS = {"post_add": "add", "pre_remove": "remove", "pre_clear": "clear"}


def _label(obj: Any) -> str:
    if isinstance(obj, Permission):
        return f"{obj.content_type.app_label}.{obj.codename}"
    return str(obj.get_username() if isinstance(obj, User) else obj.name)


def memberships_changed(
    sender: Any, instance: Any, action: str, reverse: bool, model: Any, pk_set: Any, **kwargs: Any
) -> None:
    if action not in _ACTIONS:
        return
    kind, forward, backward = _MEMBERSHIPS[sender]
    held = getattr(instance, backward if reverse else forward)
    if pk_set is None:  # a clear: everything on the other side, read before it goes
        other_side = held.all()
    elif action == "pre_remove":  # only what is held: removing what is not changes nothing
        other_side = held.filter(pk__in=pk_set)
    else:  # added: Django reports only the ids that were not held
        other_side = model.objects.filter(pk__in=pk_set)
    if model is Permission:
        other_side = other_side.select_related("content_type")
    others = list(other_side)
    if not others:
        return
    labels = [_label(o) for o in others]
    holders, names = (labels, [_label(instance)]) if reverse else ([_label(instance)], labels)
    user_memberships_audit(kind=kind, holders=holders, action=_ACTIONS[action], names=names)


for _through in _MEMBERSHIPS:
    m2m_changed.connect(memberships_changed, sender=_through, dispatch_uid=f"audit-{_through._meta.label}")


@receiver(user_logged_in)
def login_succeeded(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    if request is not None and hasattr(request, "session"):
        request.session[AUTH_TIME_SESSION_KEY] = int(time.time())  # this session's sign-in, for max_age
    audit_record(kind="login.succeeded", actor=f"user:{user.get_username()}")


@receiver(user_logged_out)
def logout_succeeded(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    # Every session's end by any path (the sign-out button, RP-initiated logout), which audited nothing
    # before; with the client that asked, when one did (views.logout sets it on the request)
    if user is None:
        return  # no one was signed in: no session ended
    asked_by = getattr(request, SIGN_OUT_DETAILS, None)
    audit_record(
        kind="logout.succeeded",
        actor=f"user:{user.get_username()}",
        client_id=asked_by["client_id"] if asked_by else "",
        data={"via": "rp_initiated_logout" if asked_by is not None else "sign_out"},
    )


@receiver(user_login_failed)
def login_failed(sender: Any, credentials: dict[str, Any], request: Any = None, **kwargs: Any) -> None:
    audit_record(
        kind="login.failed", outcome="failure", actor=f"user:{sign_in_name(credentials.get('username'))}"
    )


@receiver(user_locked_out)
def login_locked_out(
    sender: Any, request: Any, username: str | None = None, ip_address: str | None = None, **kwargs: Any
) -> None:
    # axes passes the name its AXES_USERNAME_CALLABLE gave (sign_in_name's), which stays as it is
    audit_record(kind="login.locked_out", outcome="denied", actor=f"user:{username or ''}", ip=ip_address)
