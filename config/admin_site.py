"""The Django admin, for superusers alone.

Django's admin lets in any active staff user and then asks the model permissions. A staff user given
``auth.change_user`` (to help users: unlock one, reset a password) could there make themselves superuser,
grant themselves every permission, or change a superuser's password; ``auth.change_group`` led to the same
place through a group they belong to. Portcullis's rule is that active staff read and superusers change
(the console and the admin API hold to it); the admin now holds to it too, whatever permissions a staff
user has been given, and, as Django's own check and the console do, only for a user who is still staff. A
refused user gets the admin's sign-in page, as anyone else it refuses.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.admin.apps import AdminConfig


class SuperuserAdminSite(admin.AdminSite):
    def has_permission(self, request: Any) -> bool:
        user = request.user
        return bool(user.is_active and user.is_staff and user.is_superuser)  # Django's own asks is_staff


class SuperuserAdminConfig(AdminConfig):
    default_site = "config.admin_site.SuperuserAdminSite"
