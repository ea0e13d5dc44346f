"""Console and admin-API URLs (mounted at the project root by config/urls.py).

Every console page is guarded by ``console.access``; ``tests/console/test_access.py`` walks this list,
so a new page cannot be added without its access rule being checked.
"""

from __future__ import annotations

from django.urls import URLPattern, URLResolver, include, path, register_converter

from console.api.views import CLIENT_ID_REGEX, KID_REGEX
from console.views import audit, clients, connected, dashboard, keys, tokens, users


class ClientIdConverter:
    """A client id: visible ASCII without "/" (RFC 6749 §A.1 VSCHAR), so no NUL ever reaches a query."""

    regex = CLIENT_ID_REGEX

    def to_python(self, value: str) -> str:
        return value

    def to_url(self, value: str) -> str:
        return value


register_converter(ClientIdConverter, "client_id")


class KidConverter(ClientIdConverter):
    """A signing key's id: base64url (a NUL in one reached PostgreSQL, a 500)."""

    regex = KID_REGEX


register_converter(KidConverter, "kid")

app_name = "console"

urlpatterns: list[URLPattern | URLResolver] = [
    path("console/", dashboard.dashboard, name="dashboard"),
    path("console/clients/", clients.client_list, name="clients"),
    path("console/clients/new/", clients.client_new, name="client-new"),
    path("console/clients/<client_id:client_id>/", clients.client_detail, name="client-detail"),
    path("console/clients/<client_id:client_id>/edit/", clients.client_edit, name="client-edit"),
    path(
        "console/clients/<client_id:client_id>/rotate-secret/",
        clients.client_rotate_secret,
        name="client-rotate",
    ),
    path(
        "console/clients/<client_id:client_id>/disable/", clients.client_disable_view, name="client-disable"
    ),
    path("console/clients/<client_id:client_id>/enable/", clients.client_enable_view, name="client-enable"),
    path(
        "console/clients/<client_id:client_id>/revoke-tokens/",
        clients.client_revoke_tokens,
        name="client-revoke",
    ),
    path("console/clients/<client_id:client_id>/policy/", clients.client_policy, name="client-policy"),
    path("console/policy/default/", clients.client_policy, name="policy-default"),
    path("console/tokens/", tokens.token_list, name="tokens"),
    path("console/tokens/<int:pk>/revoke/", tokens.token_revoke, name="token-revoke"),
    path("console/users/", users.user_list, name="users"),
    path("console/users/<int:pk>/", users.user_detail, name="user-detail"),
    path("console/users/<int:pk>/lock/", users.user_lock_view, name="user-lock"),
    path("console/users/<int:pk>/unlock/", users.user_unlock_view, name="user-unlock"),
    path("console/audit/", audit.audit_list, name="audit"),
    path("console/audit/export.csv", audit.audit_export, name="audit-export"),
    path("console/audit/verify/", audit.audit_verify, name="audit-verify"),
    path("console/reports/", audit.report_list, name="reports"),
    path("console/reports/<int:pk>/download/", audit.report_download, name="report-download"),
    path("console/keys/", keys.key_list, name="keys"),
    path("console/keys/rotate/", keys.key_rotate, name="key-rotate"),
    path("console/keys/<kid:kid>/revoke/", keys.key_revoke, name="key-revoke"),
    path("accounts/connected-apps/", connected.connected_apps, name="connected-apps"),
    path(
        "accounts/connected-apps/<client_id:client_id>/withdraw/",
        connected.connected_app_withdraw,
        name="connected-app-withdraw",
    ),
    path("api/admin/", include("console.api.urls")),
]
