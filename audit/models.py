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
    # The hash chain (audit.chain): each record commits to the one before it.
    seq = models.BigIntegerField(unique=True, null=True, editable=False)
    prev_hash = models.CharField(max_length=64, blank=True, editable=False)
    hash = models.CharField(max_length=64, blank=True, editable=False)

    class Meta:
        ordering = ["-occurred_at", "-id"]
        indexes = [models.Index(fields=["client_id", "occurred_at"])]

    def __str__(self) -> str:
        return f"{self.occurred_at:%Y-%m-%d %H:%M:%S} {self.kind} {self.outcome}"


class UsageRecord(models.Model):
    """One gateway request: who, which model, how many tokens, how it ended and how long it took."""

    # The gateway's own id for the record: unique, so a replayed hand-off is not doubled. The request id may
    # come from the client (X-Request-ID), so it is not unique: a client reusing one is still counted.
    record_id = models.UUIDField(unique=True, null=True)
    request_id = models.CharField(max_length=64)
    occurred_at = models.DateTimeField(db_index=True)
    client_id = models.CharField(max_length=100)
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
    token_id = models.CharField(
        max_length=64, blank=True, help_text="The access token's jti (an id, not a secret)"
    )
    outcome = models.CharField(
        max_length=40, blank=True, help_text="completed, denied:<reason>, cut:<reason>"
    )

    class Meta:
        ordering = ["-occurred_at"]
        # The busiest table: one row per gateway request, and every index is written with each row. Only
        # equality and range lookups read it, so no index is a prefix of another and none is the
        # varchar_pattern_ops copy PostgreSQL gets for ``db_index`` on a CharField (for LIKE 'x%'): the
        # composite serves lookups by client alone.
        indexes = [
            models.Index(fields=["client_id", "occurred_at"]),
            models.Index(fields=["request_id"], name="audit_usage_request_id_idx"),
        ]


class AnomalyScan(models.Model):
    """How far anomaly detection has read (one row): the usage records up to ``usage_id`` and the audit
    events up to ``event_seq`` were examined. Records reach the database late (the ingest runs behind the
    gateways, the spool replays after an outage), so a run reads what was stored since the last one, not
    what occurred in the last minute."""

    usage_id = models.BigIntegerField(default=0)
    event_seq = models.BigIntegerField(default=0)
    scanned_at = models.DateTimeField()


class ChainHead(models.Model):
    """The one row holding the chain head; writers lock it, so concurrent writers cannot fork the chain."""

    seq = models.BigIntegerField(default=0)
    hash = models.CharField(max_length=64, default="0" * 64)
    # Where verification starts: genesis, or the last record an archive-and-prune run removed.
    base_seq = models.BigIntegerField(default=0)
    base_hash = models.CharField(max_length=64, default="0" * 64)


class AuditCheckpoint(models.Model):
    """A signed statement of the chain head at one moment (JWS over seq and hash, by the active key)."""

    seq = models.BigIntegerField()
    head_hash = models.CharField(max_length=64)
    kid = models.CharField(max_length=64)
    signature = models.TextField(help_text="Compact JWS whose payload is {seq, hash, at}")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-seq"]


class AuditReport(models.Model):
    """A stored audit report over a period, in one format."""

    class Kind(models.TextChoices):
        DAILY = "daily"
        WEEKLY = "weekly"
        CUSTOM = "custom"

    kind = models.CharField(max_length=10, choices=Kind.choices)
    format = models.CharField(max_length=4, choices=[("html", "HTML"), ("csv", "CSV"), ("json", "JSON")])
    since = models.DateTimeField()
    until = models.DateTimeField()
    chain_head = models.CharField(max_length=64, blank=True)
    chain_seq = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.CharField(max_length=200, blank=True)
    content = models.TextField()

    class Meta:
        ordering = ["-created_at"]

    def filename(self) -> str:
        """Return a download file name."""
        return f"portcullis-audit-{self.kind}-{self.since:%Y%m%d}-{self.until:%Y%m%d}.{self.format}"
