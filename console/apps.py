"""App config for the admin console."""

from __future__ import annotations

from django.apps import AppConfig


class ConsoleConfig(AppConfig):
    name = "console"
    verbose_name = "Console"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from console.api import schema  # noqa: F401  (registers the OpenAPI authentication schemes)
