"""App config for the authorization server."""

from __future__ import annotations

from django.apps import AppConfig


class AuthserverConfig(AppConfig):
    name = "authserver"
    verbose_name = "Authorization server"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from authserver import receivers  # noqa: F401  (connects signal receivers)
