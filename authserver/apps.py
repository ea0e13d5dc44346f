"""App config for the authorization server."""

from __future__ import annotations

from django.apps import AppConfig


class AuthserverConfig(AppConfig):
    name = "authserver"
    verbose_name = "Authorization server"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from audit.chain import checkpoint_keys_register
        from authserver import receivers  # noqa: F401  (connects signal receivers)
        from authserver.checkpoints import checkpoint_signature, checkpoint_verify

        checkpoint_keys_register(signer=checkpoint_signature, verifier=checkpoint_verify)

        from audit.metrics import scrape_gauge_register
        from authserver.selectors import active_key_age_s

        scrape_gauge_register(
            "portcullis_signing_key_age_seconds",
            "Age of the oldest active signing key (one per algorithm)",
            active_key_age_s,
        )
