"""Who may sign in and with what rights is recorded whichever path changed it, and the Django admin shows
the OAuth records without changing them (their changes go through the audited services)."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.hashers import PBKDF2PasswordHasher
from django.contrib.auth.models import Group, Permission
from django.core.management import call_command
from django.test import Client as HttpClient
from django.utils import timezone

from audit.models import AuditEvent
from authserver.models import AccessToken, RefreshToken
from authserver.services import user_lock, user_unlock

pytestmark = pytest.mark.django_db

PASSWORD = "a long and good password"
PBKDF2 = "django.contrib.auth.hashers.PBKDF2PasswordHasher"


def records(kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [(e.actor, e.data) for e in AuditEvent.objects.filter(kind=kind).order_by("id")]


def records_of_users() -> list[tuple[str, str]]:
    users = AuditEvent.objects.filter(kind__startswith="user.")
    return list(users.order_by("id").values_list("kind", "actor"))


@pytest.fixture
def root(django_user_model: Any) -> Any:
    return django_user_model.objects.create_superuser("root", "root@example.com", PASSWORD)


@pytest.fixture
def as_root(root: Any) -> HttpClient:
    http = HttpClient()
    http.force_login(root)
    return http


def sign_in(username: str, password: str) -> bool:
    """Sign in through the login page, as a person would (django-axes wants the request)."""
    response = HttpClient().post("/accounts/login/", {"username": username, "password": password})
    return response.status_code == 302


def user_form(user: Any, **changes: Any) -> dict[str, Any]:
    """The Django admin's change form for a user, as the page would post it back."""
    form = {
        "username": user.username,
        "first_name": user.first_name,
        "last_name": user.last_name,
        "email": user.email,
        "date_joined_0": user.date_joined.strftime("%Y-%m-%d"),
        "date_joined_1": user.date_joined.strftime("%H:%M:%S"),
        "last_login_0": "",
        "last_login_1": "",
    }
    flags = {f: getattr(user, f) for f in ("is_active", "is_staff", "is_superuser")} | changes
    form.update({name: "on" for name, on in flags.items() if on})
    return form


def test_a_superuser_made_by_the_command_is_recorded_and_no_password_with_it(capsys: Any) -> None:
    call_command("createsuperuser", "--noinput", "--username", "boss", "--email", "boss@example.com")
    assert records("user.created") == [
        ("system", {"user": "boss", "is_active": True, "is_staff": True, "is_superuser": True})
    ]
    assert not AuditEvent.objects.filter(kind="user.password_changed").exists()


def test_rights_given_in_the_django_admin_are_recorded_as_the_admin_who_gave_them(
    as_root: HttpClient, alice: Any
) -> None:
    response = as_root.post(
        f"/admin/auth/user/{alice.pk}/change/", user_form(alice, is_staff=True, is_superuser=True)
    )
    assert response.status_code == 302, response.content[:2000]
    alice.refresh_from_db()
    assert alice.is_superuser
    given = {"user": "alice", "changed": {"is_staff": True, "is_superuser": True}}
    assert records("user.changed") == [("user:root", given)]
    event = AuditEvent.objects.get(kind="user.changed")
    assert event.request_id
    assert event.ip == "127.0.0.1"


def test_the_django_admin_is_for_superusers_whatever_permissions_staff_hold(
    root: Any, django_user_model: Any
) -> None:
    helper = django_user_model.objects.create_user("helper", "helper@example.com", PASSWORD, is_staff=True)
    helper.user_permissions.add(
        *Permission.objects.filter(codename__in=["change_user", "delete_user", "change_group", "view_user"])
    )
    http = HttpClient()
    http.force_login(helper)
    assert http.get("/admin/").status_code == 302  # to the admin's sign-in page, as anyone it refuses
    raised = http.post(
        f"/admin/auth/user/{helper.pk}/change/", user_form(helper, is_superuser=True, is_staff=True)
    )
    assert raised.status_code == 302
    assert raised["Location"].startswith("/admin/login/")
    password = {"password1": "taken over and over", "password2": "taken over and over"}
    taken = http.post(f"/admin/auth/user/{root.pk}/password/", password)
    assert taken["Location"].startswith("/admin/login/")
    helper.refresh_from_db()
    root.refresh_from_db()
    assert not helper.is_superuser
    assert root.check_password(PASSWORD)
    assert not records("user.changed")
    assert not records("user.password_changed")
    root.is_staff = False  # a superuser no longer staff: refused, as by Django's own check and the console
    root.save()
    http.force_login(root)
    assert http.get("/admin/").status_code == 302


def test_a_user_deactivated_in_the_django_admin_has_their_tokens_revoked_as_that_admin(
    as_root: HttpClient, alice: Any, make_client: Any
) -> None:
    AccessToken.objects.create(
        user=alice,
        application=make_client().client,
        token=uuid.uuid4().hex,
        jti=uuid.uuid4(),
        expires=timezone.now() + timedelta(minutes=5),
    )
    response = as_root.post(f"/admin/auth/user/{alice.pk}/change/", user_form(alice, is_active=False))
    assert response.status_code == 302
    assert not AccessToken.objects.filter(user=alice).exists()
    revoked = AuditEvent.objects.get(kind="token.revoked")
    assert (revoked.actor, revoked.data["reason"]) == ("user:root", "user deactivated")
    assert records("user.changed") == [("user:root", {"user": "alice", "changed": {"is_active": False}})]


def test_no_actor_outlives_its_request(as_root: HttpClient, alice: Any) -> None:
    assert as_root.get("/admin/").status_code == 200
    alice.is_staff = True
    alice.save()  # after the request, in the same thread: a shell's change, not root's
    assert records("user.changed") == [("system", {"user": "alice", "changed": {"is_staff": True}})]


def test_a_new_password_is_recorded_and_the_hash_upgrade_at_sign_in_is_not(alice: Any, settings: Any) -> None:
    alice.set_password("another long password")
    alice.save()
    assert records("user.password_changed") == [("system", {"user": "alice"})]
    assert "another long password" not in str(AuditEvent.objects.values_list("data", flat=True))
    # a hash by a hasher no longer preferred is upgraded at the next sign-in
    settings.PASSWORD_HASHERS = [*settings.PASSWORD_HASHERS, PBKDF2]
    weak = PBKDF2PasswordHasher().encode("another long password", "somesalt", iterations=1000)
    type(alice).objects.filter(pk=alice.pk).update(password=weak)
    assert sign_in("alice", "another long password")
    alice.refresh_from_db()
    assert alice.password != weak  # upgraded at sign-in: the same password, not a new one
    assert len(records("user.password_changed")) == 1


def test_a_sign_in_and_a_save_that_changes_no_right_record_nothing_about_the_user(alice: Any) -> None:
    assert sign_in("alice", "correct horse battery")
    alice.first_name = "Alice"
    alice.save()
    assert not AuditEvent.objects.filter(kind__startswith="user.").exclude(kind="user.created").exists()


def test_lock_and_unlock_are_recorded_once_each(root: Any, alice: Any) -> None:
    user_lock(user=alice, actor="user:root")
    user_unlock(user=alice, actor="user:root")
    kinds = [kind for kind, _ in records_of_users()]
    assert kinds == ["user.created", "user.created", "user.locked", "user.unlocked"]
    alice.is_active = False
    alice.save()  # the next change by another path is recorded: the services' mark does not linger
    assert records("user.changed") == [("system", {"user": "alice", "changed": {"is_active": False}})]


def test_groups_and_permissions_are_recorded_from_either_side(alice: Any, django_user_model: Any) -> None:
    bob = django_user_model.objects.create_user("bob", "bob@example.com", PASSWORD)
    operators = Group.objects.create(name="operators")
    change_user = Permission.objects.get(codename="change_user")
    alice.groups.add(operators)
    operators.user_set.add(bob)
    operators.user_set.add(bob)  # already there: nothing was given, nothing recorded
    operators.permissions.add(change_user)
    alice.user_permissions.add(change_user)
    alice.user_permissions.clear()
    alice.user_permissions.clear()  # nothing left to take
    operators.user_set.remove(alice, bob)
    operators.user_set.remove(alice)  # no longer held: nothing taken, nothing recorded
    editors = Group.objects.create(name="editors")
    bob.groups.add(editors)
    alice.groups.remove(operators, editors)  # neither held
    bob.groups.remove(operators, editors)  # editors held, operators no longer
    assert records("user.groups_changed")[-2:] == [
        ("system", {"user": "bob", "action": "add", "names": ["editors"]}),
        ("system", {"user": "bob", "action": "remove", "names": ["editors"]}),
    ]
    removed = sorted(records("user.groups_changed")[2:4], key=lambda r: r[1]["user"])
    assert records("user.groups_changed")[:2] + removed[:2] == [
        ("system", {"user": "alice", "action": "add", "names": ["operators"]}),
        ("system", {"user": "bob", "action": "add", "names": ["operators"]}),
        ("system", {"user": "alice", "action": "remove", "names": ["operators"]}),
        ("system", {"user": "bob", "action": "remove", "names": ["operators"]}),
    ]
    assert records("group.permissions_changed") == [
        ("system", {"group": "operators", "action": "add", "names": ["auth.change_user"]})
    ]
    assert records("user.permissions_changed") == [
        ("system", {"user": "alice", "action": "add", "names": ["auth.change_user"]}),
        ("system", {"user": "alice", "action": "clear", "names": ["auth.change_user"]}),
    ]


def test_a_deleted_user_is_recorded(alice: Any) -> None:
    alice.delete()
    assert records("user.deleted") == [("system", {"user": "alice"})]


def test_the_django_admin_shows_clients_and_tokens_and_changes_none(
    as_root: HttpClient, make_client: Any, alice: Any
) -> None:
    reg = make_client()
    client = reg.client
    page = as_root.get(f"/admin/authserver/client/{client.pk}/change/")
    assert page.status_code == 200
    assert client.name.encode() in page.content
    assert b'name="client_secret"' not in page.content
    assert client.client_secret.encode() not in page.content
    form = {"name": "renamed", "allowed_scopes": "models.read admin.write", "is_admin_client": "on"}
    assert as_root.post(f"/admin/authserver/client/{client.pk}/change/", form).status_code == 403
    client.refresh_from_db()
    assert (client.name, client.is_admin_client) == (reg.client.name, False)
    assert as_root.get("/admin/authserver/client/add/").status_code == 403
    assert as_root.post(f"/admin/authserver/client/{client.pk}/delete/", {"post": "yes"}).status_code == 403
    token = AccessToken.objects.create(
        user=alice,
        application=client,
        token=uuid.uuid4().hex,
        jti=uuid.uuid4(),
        expires=timezone.now() + timedelta(minutes=5),
    )
    refresh = RefreshToken.objects.create(
        user=alice, application=client, token=uuid.uuid4().hex, access_token=token, revoked=timezone.now()
    )
    bulk = {"action": "revoke_tokens", "_selected_action": [str(token.pk)]}
    as_root.post("/admin/authserver/accesstoken/", bulk)
    assert AccessToken.objects.filter(pk=token.pk).exists()
    assert as_root.post(f"/admin/authserver/refreshtoken/{refresh.pk}/change/", {}).status_code == 403
    refresh.refresh_from_db()
    assert refresh.revoked is not None  # a revoked refresh token cannot be brought back by hand
    listing = as_root.get("/admin/")
    assert b"/admin/axes/" not in listing.content  # lockouts are lifted by the console's audited unlock
    assert not AuditEvent.objects.filter(kind__startswith="client.").exclude(kind="client.created").exists()


def test_a_deleted_group_is_recorded_with_the_users_and_rights_it_took(alice: Any, as_root: Any) -> None:
    # the deletion's cascade removes the memberships and the group's permissions with no m2m_changed
    admins = Group.objects.create(name="admins")
    admins.permissions.add(Permission.objects.get(codename="change_user"))
    alice.groups.add(admins)
    assert as_root.post(f"/admin/auth/group/{admins.pk}/delete/", {"post": "yes"}).status_code == 302
    assert not type(alice).objects.get(pk=alice.pk).has_perm("auth.change_user")
    assert records("group.deleted") == [
        ("user:root", {"group": "admins", "users": ["alice"], "permissions": ["auth.change_user"]})
    ]
