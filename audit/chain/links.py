"""The links of the audit chain: the exact bytes a record's hash covers, and values stored so it holds.

A record's hash is ``SHA-256(previous hash + canonical record)``. What goes into the canonical form is
what the database gives back, so an address, a string or a number is normalised before it is hashed and
stored; where PostgreSQL and SQLite give back different text for one address, the canonical form reads
both the same way.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
from decimal import Decimal
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
            "ip": _ip_text(event.ip),
            "request_id": event.request_id,
            "data": event.data,
            "event_id": str(event.event_id) if event.event_id else None,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        default=str,
    ).encode()


def _ip_text(ip: str | None) -> str | None:
    """An address as Python writes it. PostgreSQL's ``inet`` writes an IPv4-compatible address (``::a.b.c.d``,
    RFC 4291 §2.5.5.1) with its last 32 bits dotted where Python, and Django on SQLite, write ``::102:304``:
    the two databases give back different text for the one address, so no form stored holds on both. Only
    PostgreSQL's dotted form has both a colon and a dot (an IPv4-mapped address is stored as its IPv4
    address), so any other address costs two string scans."""
    if ip and "." in ip and ":" in ip:
        return str(ipaddress.IPv6Address(ip))
    return ip


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
    if not isinstance(ip, str):
        raise TypeError(f"an IP address is text, not {type(ip).__name__}")
    address = ipaddress.ip_address(ip.split("%", 1)[0])
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return str(mapped or address)


def unicode_valid(value: str) -> bool:
    """Whether text holds no lone surrogate: what a byte that was not UTF-8 becomes when Python decodes it
    with ``surrogateescape`` (a command line), or JSON's ``\ud800`` escapes. No database or page takes one."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def storable(value: Any) -> Any:
    """The value with what PostgreSQL cannot store in text or JSON (NUL, lone surrogates) replaced, and
    numbers as its ``jsonb`` gives them back.

    Attacker input reaches events (a grant type, a username, a client id): it must be recorded, not
    turn the write into an error. A number in ``jsonb`` is a decimal: a float Python writes with an
    exponent (``1e+16``: any from 10**16 up) comes back as an integer (10000000000000000), and -0.0 as 0.0,
    so a record hashed with the float failed verification. Such a float is stored as what comes back, on
    SQLite too (whose JSON is text and would keep it), so the hash of a record does not depend on the
    database. NaN and the infinities are left for PostgreSQL to refuse."""
    if isinstance(value, str):
        if "\x00" in value:
            value = value.replace("\x00", "\ufffd")
        if not unicode_valid(value):
            value = value.encode(errors="replace").decode()
        return value
    if isinstance(value, float):
        return _jsonb_number(value)
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [storable(v) for v in value]
    return value


def _jsonb_number(value: float) -> float | int:
    if value == 0:
        return 0.0  # no negative zero in a decimal
    if abs(value) >= 1e16 and math.isfinite(value):  # repr() writes it with an exponent
        return int(Decimal(repr(value)))  # the decimal repr() writes, not the binary value int() would give
    return value
