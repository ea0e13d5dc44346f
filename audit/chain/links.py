"""The links of the audit chain: the exact bytes a record's hash covers, and values stored so it holds.

A record's hash is ``SHA-256(previous hash + canonical record)``. What goes into the canonical form is
what the database gives back, so an address or a string is normalised before it is hashed and stored.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from functools import lru_cache
from typing import Any

from audit.models import AuditEvent

GENESIS = "0" * 64


def canonical(event: AuditEvent) -> bytes:
    """The exact bytes an event's hash covers."""
    return json.dumps(
        {
            "seq": event.seq,
            "occurred_at": event.occurred_at.isoformat(),
            "kind": event.kind,
            "outcome": event.outcome,
            "actor": event.actor,
            "client_id": event.client_id,
            "ip": event.ip,
            "request_id": event.request_id,
            "data": event.data,
            "event_id": str(event.event_id) if event.event_id else None,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        default=str,
    ).encode()


def link_hash(prev_hash: str, event: AuditEvent) -> str:
    """Return the chain hash of an event that follows ``prev_hash``."""
    return hashlib.sha256(prev_hash.encode() + canonical(event)).hexdigest()


@lru_cache(maxsize=4096)  # the same few addresses write most events; parsing one costs ~10 us
def normalise_ip(ip: str | None) -> str | None:
    """Store IPs the way the database returns them, so the hash survives a round trip: an IPv6 zone, which
    ``inet`` does not keep, is dropped, and an IPv4-mapped address (a dual-stack listener's) is its IPv4
    address (Python wrote ``::ffff:c000:207`` where the database gives back ``::ffff:192.0.2.7``, and the
    record then failed verification)."""
    if not ip:
        return None
    address = ipaddress.ip_address(ip.split("%", 1)[0])
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return str(mapped or address)


def storable(value: Any) -> Any:
    """The value with what PostgreSQL cannot store in text or JSON (NUL, lone surrogates) replaced.

    Attacker input reaches events (a grant type, a username, a client id): it must be recorded, not
    turn the write into an error."""
    if isinstance(value, str):
        if "\x00" in value:
            value = value.replace("\x00", "\ufffd")
        try:
            value.encode()
        except UnicodeEncodeError:
            value = value.encode(errors="replace").decode()
        return value
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [storable(v) for v in value]
    return value
