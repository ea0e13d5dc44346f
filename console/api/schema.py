"""OpenAPI descriptions of the admin API's two ways in (drf-spectacular authentication extensions), of
request bodies that take no other fields, and of the errors every operation can answer."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from drf_spectacular.extensions import OpenApiAuthenticationExtension, OpenApiSerializerExtension


class AdminBearerScheme(OpenApiAuthenticationExtension):
    target_class = "console.api.authentication.AdminBearerAuthentication"
    name = "adminToken"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "An access token from this server's /oauth/token/ for a client marked "
            "administrative, with admin.read (GET) or admin.write (changes).",
        }


class StaffSessionScheme(OpenApiAuthenticationExtension):
    target_class = "console.api.authentication.StaffSessionAuthentication"
    name = "staffSession"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        return {
            "type": "apiKey",
            "in": "cookie",
            "name": settings.SESSION_COOKIE_NAME,
            "description": "A console session of a staff user; changes also need the X-CSRFToken header.",
        }


class StrictSerializerScheme(OpenApiSerializerExtension):
    """A strict serializer's request body is a closed object (``additionalProperties: false``): the API
    answers any other key with a 400 naming it. Answers stay open, so they may grow fields."""

    target_class = "console.api.fields.StrictSerializer"
    match_subclasses = True

    def map_serializer(self, auto_schema: Any, direction: Any) -> dict[str, Any]:
        schema: dict[str, Any] = auto_schema._map_serializer(self.target, direction, bypass_extensions=True)
        if direction == "request":
            schema["additionalProperties"] = False
        return schema


ERROR_SCHEMA = {
    "type": "object",
    "description": "DRF's error body: {'detail': message} or {field: [messages]}",
    "additionalProperties": True,
}
ERRORS = {
    "400": "The input is not valid; the body names each field and what is wrong.",
    "401": "No credentials, or a token that did not verify (see WWW-Authenticate).",
    "403": "Authenticated, but without the scope or console rights this needs (or no CSRF token).",
    "404": "No such object.",
}


def error_responses_add(result: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """drf-spectacular postprocessing hook: document the error answers every operation can give."""
    result.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    for path in result.get("paths", {}).values():
        for operation in path.values():
            responses = operation.setdefault("responses", {})
            for status, description in ERRORS.items():
                responses.setdefault(
                    status,
                    {
                        "description": description,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                    },
                )
    return result
