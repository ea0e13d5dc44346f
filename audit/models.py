"""Audit data: one row per security-relevant event.

Rows are written only through :func:`audit.services.audit_record`. They carry who, which client, from
where, what happened and how it ended, and never a token, secret, code, verifier, password or prompt.
"""

from __future__ import annotations

from django.db import models


class AuditEvent(models.Model):
    class Outcome(models.TextChoices):
        SUCCESS = "success"
        FAILURE = "failure"
        DENIED = "denied"

    occurred_at = models.DateTimeField(db_index=True)
    kind = models.CharField(max_length=64, db_index=True)
    outcome = models.CharField(max_length=10, choices=Outcome.choices)
    actor = models.CharField(max_length=200, blank=True, help_text="user:<username>, client:<id> or system")
    client_id = models.CharField(max_length=100, blank=True, db_index=True)
    ip = models.GenericIPAddressField(null=True, blank=True)
    request_id = models.CharField(max_length=64, blank=True)
    data = models.JSONField(default=dict, blank=True)
    event_id = models.UUIDField(
        null=True, blank=True, unique=True, help_text="Set by producers that may retry"
    )

    class Meta:
        ordering = ["-occurred_at", "-id"]
        indexes = [models.Index(fields=["client_id", "occurred_at"])]

    def __str__(self) -> str:
        return f"{self.occurred_at:%Y-%m-%d %H:%M:%S} {self.kind} {self.outcome}"


class UsageRecord(models.Model):
    """One gateway request: who, which model, how many tokens, how it ended and how long it took."""

    request_id = models.CharField(max_length=64, unique=True)  # unique: a replayed hand-off is not doubled
    occurred_at = models.DateTimeField(db_index=True)
    client_id = models.CharField(max_length=100, db_index=True)
    user = models.CharField(max_length=150, blank=True)
    endpoint = models.CharField(max_length=40)
    model = models.CharField(max_length=200, blank=True)
    stream = models.BooleanField(default=False)
    status = models.PositiveSmallIntegerField()
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    gateway_ms = models.FloatField(default=0)
    upstream_ms = models.FloatField(default=0)
    upstream = models.CharField(max_length=200, blank=True)
    client_ip = models.GenericIPAddressField(null=True, blank=True)
    outcome = models.CharField(
        max_length=40, blank=True, help_text="completed, denied:<reason>, cut:<reason>"
    )

    class Meta:
        ordering = ["-occurred_at"]
        indexes = [models.Index(fields=["client_id", "occurred_at"])]
