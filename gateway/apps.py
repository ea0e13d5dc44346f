"""App config for the gateway."""

from __future__ import annotations

from django.apps import AppConfig


class GatewayConfig(AppConfig):
    name = "gateway"
    verbose_name = "Gateway"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from authserver.registry import consent_detail_provider_register
        from gateway.selectors import consent_details

        consent_detail_provider_register(consent_details)

        from audit.anomaly import anomaly_handler_register
        from gateway.services import anomaly_quarantine

        anomaly_handler_register(anomaly_quarantine)

        from django.db.models.signals import post_delete, post_save

        from authserver.models import Client
        from gateway.receivers import client_changed

        post_save.connect(client_changed, sender=Client, dispatch_uid="gateway.client_changed")
        post_delete.connect(client_changed, sender=Client, dispatch_uid="gateway.client_deleted")
