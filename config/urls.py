"""URL routing for everything Django serves (the gateway's /v1 is routed in config/asgi.py)."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest, JsonResponse
from django.urls import include, path, re_path

from audit.metrics import metrics_view
from authserver import views as authserver_views
from console.views.home import home


def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness: the process answers."""
    return JsonResponse({"status": "ok"})


# JSON errors on the OAuth endpoints and the admin API; Django's pages elsewhere (config/errors.py).
handler400 = "config.errors.bad_request"
handler403 = "config.errors.permission_denied"
handler404 = "config.errors.page_not_found"
handler500 = "config.errors.server_error"

urlpatterns = [
    path("healthz", healthz, name="healthz"),
    path("metrics", metrics_view, name="metrics"),
    path("oauth/", include("authserver.urls")),
    path("device/", authserver_views.device_entry, name="device-entry"),
    path(".well-known/jwks.json", authserver_views.jwks, name="jwks"),
    path(
        ".well-known/oauth-authorization-server",
        authserver_views.ServerMetadataView.as_view(),
        name="oauth-authorization-server",
    ),
    re_path(r"^\.well-known/openid-configuration/?$", authserver_views.OIDCDiscoveryView.as_view()),
    path(".well-known/oauth-protected-resource", authserver_views.protected_resource_metadata),
    path("accounts/login/", authserver_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", authserver_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("", home, name="home"),
    path("", include("console.urls")),
]
