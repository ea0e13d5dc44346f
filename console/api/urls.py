"""Admin API routes, mounted at ``/api/admin/``: an index of them at the root, the resources, and the
OpenAPI schema at ``/api/admin/schema/``."""

from __future__ import annotations

from typing import Any

from django.urls import URLPattern, URLResolver, path, re_path
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.renderers import (
    OpenApiJsonRenderer,
    OpenApiJsonRenderer2,
    OpenApiYamlRenderer,
    OpenApiYamlRenderer2,
)
from drf_spectacular.views import SpectacularAPIView
from rest_framework.routers import DefaultRouter

from console.api import views
from console.api.authentication import AdminBearerAuthentication, StaffSessionAuthentication
from console.api.permissions import AdminAccess


class AdminAPIRouter(DefaultRouter):
    """DRF's router with its root view (``views.AdminAPIRootView``) and no ``.json`` suffix routes: the API
    speaks JSON only."""

    APIRootView = views.AdminAPIRootView
    include_format_suffixes = False


router = AdminAPIRouter()
router.register("clients", views.ClientViewSet, basename="api-client")
router.register("policies", views.PolicyViewSet, basename="api-policy")
router.register("tokens", views.TokenViewSet, basename="api-token")
router.register("users", views.UserViewSet, basename="api-user")
router.register("audit-events", views.AuditEventViewSet, basename="api-audit-event")
router.register("reports", views.ReportViewSet, basename="api-report")
router.register("keys", views.KeyViewSet, basename="api-key")


def endpoints_without_the_schema(endpoints: list[Any], **kwargs: Any) -> list[Any]:
    """drf-spectacular preprocessing hook: leave out the schema itself, the index and the catch-all 404."""
    return [
        (path, regex, method, view)
        for path, regex, method, view in endpoints
        if not path.endswith("/schema/")
        and getattr(view, "cls", None) not in (views.NotFoundView, views.AdminAPIRootView)
    ]


class SchemaView(views.AdminAPIMixin, SpectacularAPIView):
    """The admin API's OpenAPI 3 schema, for the same callers as the API itself (refusals audited alike)."""

    authentication_classes = [AdminBearerAuthentication, StaffSessionAuthentication]
    permission_classes = [AdminAccess]
    schema = AutoSchema()
    # JSON unless YAML is asked for; each under OpenAPI's own media type and the plain one (application/json,
    # application/yaml), which is what an HTTP client sends in Accept
    renderer_classes = [OpenApiJsonRenderer, OpenApiJsonRenderer2, OpenApiYamlRenderer, OpenApiYamlRenderer2]
    custom_settings = {
        "TITLE": "Portcullis admin API",
        "DESCRIPTION": "Everything the admin console does, for scripts and CI. Authenticate with an access "
        "token carrying admin.read (GET) or admin.write (changes), or a staff session with CSRF.",
        "VERSION": "1",
        "SCHEMA_PATH_PREFIX": "/api/admin",
        "COMPONENT_SPLIT_REQUEST": True,
        "PREPROCESSING_HOOKS": ["console.api.urls.endpoints_without_the_schema"],
        "POSTPROCESSING_HOOKS": [
            "drf_spectacular.hooks.postprocess_schema_enums",
            "console.api.schema.error_responses_add",
        ],
    }


urlpatterns: list[URLPattern | URLResolver] = [
    path("schema/", SchemaView.as_view(), name="api-schema"),
    *router.urls,
    re_path(r"^", views.NotFoundView.as_view(), name="api-not-found"),  # last: JSON for unknown paths
]
