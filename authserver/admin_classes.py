"""What the Django admin may do with the OAuth records: look, never change.

A change made there went past the services: a client's scopes, secret, administrative mark or ``disabled``
saved without an audit record, without the push to the gateways and without revoking what it took away,
and a refresh token's ``revoked`` cleared by hand. Every change has its audited path in the console and the
admin API. DOT registers these classes itself (its ``*_ADMIN_CLASS`` settings name them), so this module
is imported by ``oauth2_provider.admin`` as that module ends, and must not be imported before it.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.db import models
from oauth2_provider import admin as dot_admin


class ViewOnly:
    """A model admin that shows records and changes none (no add, change, delete or bulk action)."""

    def has_add_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def get_actions(self, request: Any) -> dict[str, Any]:
        return {}


class ClientAdmin(ViewOnly, dot_admin.ApplicationAdmin):
    form = forms.ModelForm  # DOT's form is for entering a secret, which no one does here
    exclude = ("client_secret",)  # a hash, but a hash of a secret all the same
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}  # Django 6's default, said now


class AccessTokenAdmin(ViewOnly, dot_admin.AccessTokenAdmin):
    pass


class RefreshTokenAdmin(ViewOnly, dot_admin.RefreshTokenAdmin):
    pass


class GrantAdmin(ViewOnly, dot_admin.GrantAdmin):
    pass


class IDTokenAdmin(ViewOnly, dot_admin.IDTokenAdmin):
    pass
