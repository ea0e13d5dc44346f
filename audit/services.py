"""The one way to write to the audit log.

Callers name the event; the request context (request id, true client IP) is taken from the current
request unless given. Data keys that could hold a credential are dropped, never stored.
"""

from __future__ import annotations

import logging
import re
import uuid
from datetime import datetime
from typing import Any

from django.utils import timezone

from audit.chain import event_append, normalise_ip
from audit.context import client_ip_var, request_id_var
from audit.models import AuditEvent

logger = logging.getLogger(__name__)

# Keys whose values must never reach the log: tokens, secrets, codes, verifiers, passwords, prompts.
_FORBIDDEN_KEY = re.compile(r"token|secret|password|verifier|code$|^code|prompt|messages|authorization", re.I)
_ALLOWED_KEYS = {"token_type_hint", "token_family", "tokens_revoked", "jti_count", "error_code"}


def _scrub(data: dict[str, Any]) -> dict[str, Any]:
    clean: dict[str, Any] = {}
    for key, value in data.items():
        if _FORBIDDEN_KEY.search(key) and key not in _ALLOWED_KEYS:
            logger.warning("audit: dropped field %s that may hold a credential", key)
            continue
        clean[key] = value
    return clean


def audit_record(
    *,
    kind: str,
    outcome: str = AuditEvent.Outcome.SUCCESS,
    actor: str = "",
    client_id: str = "",
    ip: str | None = None,
    request_id: str | None = None,
    data: dict[str, Any] | None = None,
    occurred_at: datetime | None = None,
    event_id: uuid.UUID | str | None = None,
) -> AuditEvent:
    """Record one audit event (an ``event_id`` makes a retried record idempotent)."""
    rid = request_id or request_id_var.get()
    if event_id is not None:
        existing = AuditEvent.objects.filter(event_id=event_id).first()
        if existing is not None:
            return existing
    event = AuditEvent(
        event_id=event_id,
        occurred_at=occurred_at or timezone.now(),
        kind=kind,
        outcome=outcome,
        actor=actor[:200],
        client_id=client_id[:100],
        ip=normalise_ip(ip if ip is not None else client_ip_var.get()),
        request_id="" if rid == "-" else rid,
        data=_scrub(data or {}),
    )
    return event_append(event)


def actor_for_user(user: Any) -> str:
    """Return the actor label for a Django user (or ``anonymous``)."""
    if user is None or not getattr(user, "is_authenticated", False):
        return "anonymous"
    return f"user:{user.get_username()}"
