"""Gateway data: the per-client policy (models, limits, quota, caps, IP allowlist).

The gateway never reads these rows on its hot path: each process keeps a snapshot that is loaded at start
and updated by a push whenever a policy changes (``gateway.services.policy_set``).
"""

from __future__ import annotations

from django.conf import settings
from django.db import models


class ClientPolicy(models.Model):
    """What one client may do through the gateway; the row with no client is the default policy."""

    client = models.OneToOneField(
        settings.OAUTH2_PROVIDER_APPLICATION_MODEL,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="policy",
    )
    allowed_models = models.JSONField(
        default=list, blank=True, help_text="Model ids this client may use; empty: none"
    )
    rpm = models.PositiveIntegerField(
        null=True, blank=True, help_text="Requests per minute (empty: no limit)"
    )
    tpm = models.PositiveIntegerField(null=True, blank=True, help_text="LLM tokens per minute")
    concurrency = models.PositiveIntegerField(null=True, blank=True, help_text="Requests in flight at once")
    daily_tokens = models.PositiveBigIntegerField(null=True, blank=True, help_text="Tokens per UTC day")
    max_tokens = models.PositiveIntegerField(
        null=True, blank=True, help_text="Largest max_tokens per request"
    )
    user_rpm = models.PositiveIntegerField(null=True, blank=True, help_text="Per user, for delegated tokens")
    user_tpm = models.PositiveIntegerField(null=True, blank=True, help_text="Per user, for delegated tokens")
    allow_ips = models.JSONField(default=list, blank=True, help_text="CIDRs allowed to call; empty: any")
    quarantine_on_anomaly = models.BooleanField(
        default=False,
        help_text="On an anomaly: revoke the tokens of the one user it is about, else disable the client",
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["client"], condition=models.Q(client__isnull=True), name="one_default_policy"
            )
        ]
        verbose_name_plural = "client policies"

    def __str__(self) -> str:
        return f"policy for {self.client or 'every other client'}"
