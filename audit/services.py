"""The one way to write to the audit log.

Callers name the event; the request context (request id, true client IP) is taken from the current
request unless given. Data keys that could hold a credential are dropped, never stored. A text field that
is not text, or data that is not a dict, is refused (a TypeError): a text column stores ``5`` as "5" while
the chain hashed the number, and the record then failed verification.
"""

from __future__ import annotations

import logging
import re
import uuid
from datetime import UTC, datetime
from typing import Any

from django.utils import timezone

from audit.chain import event_append, normalise_ip
from audit.context import VIA_CLIENT_ATTR, client_ip_var, request_id_var, request_var
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
    """Record one audit event (an ``event_id`` makes a retried record idempotent). Made while serving a
    request that a user's delegated token authorized, it names the app that held the token as
    ``via_client`` (the actor is the user): "alice changed this client" left out which of her apps did."""
    rid = request_id or request_id_var.get()
    via = getattr(request_var.get(), VIA_CLIENT_ATTR, "")
    if via and "via_client" not in (data or {}):
        data = {**(data or {}), "via_client": via}
    audit_fields_check(
        kind=kind, outcome=outcome, actor=actor, client_id=client_id, request_id=rid, data=data
    )
    if isinstance(event_id, str):
        event_id = uuid.UUID(event_id)  # hashed as the database gives it back: lower case, with hyphens
    elif event_id is not None and not isinstance(event_id, uuid.UUID):
        raise TypeError(f"an event id is a UUID, not {type(event_id).__name__}")
    if event_id is not None:
        existing = AuditEvent.objects.filter(event_id=event_id).first()
        if existing is not None:
            return existing
    if occurred_at is not None and occurred_at.tzinfo is not None:
        occurred_at = occurred_at.astimezone(UTC)  # as the database gives it back: hashed so, it verifies
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


def audit_fields_check(*, data: Any = None, **text: Any) -> None:
    """Raise TypeError for a field stored as text that is not text, or data that is not a dict: a text
    column stores ``5`` as "5" while the chain hashed the number. ``audit_record`` asks, and the ingest asks
    first of a gateway's event, so that one of the wrong types is set aside before its batch is written."""
    for name, value in text.items():
        if not isinstance(value, str):
            raise TypeError(f"audit field {name} is text, not {type(value).__name__}")
    if data is not None and not isinstance(data, dict):
        raise TypeError(f"audit data is a dict, not {type(data).__name__}")


def actor_for_user(user: Any) -> str:
    """Return the actor label for a Django user (or ``anonymous``)."""
    if user is None or not getattr(user, "is_authenticated", False):
        return "anonymous"
    return f"user:{user.get_username()}"


def request_actor(default: str = "system") -> str:
    """Who acts in a change that a receiver, not a service, sees (a save in the Django admin): the signed-in
    user of the request being served, else ``default`` (a shell, a command, a task)."""
    actor = actor_for_user(getattr(request_var.get(), "user", None))
    return default if actor == "anonymous" else actor
