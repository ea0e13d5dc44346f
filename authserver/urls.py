"""OAuth endpoints, mounted under ``/oauth/`` with DOT's URL names (DOT's views reverse them)."""

from __future__ import annotations

from django.urls import path
from oauth2_provider import views as dot_views

from authserver import views

app_name = "oauth2_provider"

urlpatterns = [
    path("authorize/", views.AuthorizationView.as_view(), name="authorize"),
    path("token/", views.TokenView.as_view(), name="token"),
    path("revoke/", views.RevokeTokenView.as_view(), name="revoke-token"),
    path("introspect/", views.IntrospectView.as_view(), name="introspect"),
    path("userinfo/", views.UserInfoView.as_view(), name="user-info"),
    path("logout/", views.RPInitiatedLogoutView.as_view(), name="rp-initiated-logout"),
    path("device-authorization/", views.DeviceAuthorizationView.as_view(), name="device-authorization"),
    path("device/", views.DeviceUserCodeView.as_view(), name="device"),
    path(
        "device/confirm/<slug:client_id>/<slug:user_code>/",
        views.DeviceConfirmView.as_view(),
        name="device-confirm",
    ),
    path(
        "device/status/<slug:client_id>/<slug:user_code>/",
        dot_views.DeviceGrantStatusView.as_view(),
        name="device-grant-status",
    ),
    path(".well-known/jwks.json", views.jwks, name="jwks-info"),
]
