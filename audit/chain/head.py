"""The chain head: the one row that says where the chain ends (seq, hash) and where it starts (its base).

Writers lock the row (and, on SQLite, which has no row locks, a process lock), so concurrent writers
cannot fork the chain. The row is not append-only, so what it says about the base is trusted only when
the chain itself vouches for it (see ``audit.chain.verify``).
"""

from __future__ import annotations

import threading

from django.db import connection, transaction

from audit.chain.links import GENESIS
from audit.locks import advisory_xact_lock
from audit.models import AuditEvent, ChainHead

HEAD_CREATE_LOCK = 0x61756469  # PostgreSQL advisory lock id ("audi") taken only to create the head
process_lock = threading.Lock()  # SQLite has no row locks; the embedded default is one process


def chain_head_create() -> ChainHead:
    """Create the chain head of a fresh install, once, even when its first writers race."""
    if connection.vendor == "postgresql":
        advisory_xact_lock(HEAD_CREATE_LOCK)  # held until the transaction ends, so the loser sees the head
        existing = ChainHead.objects.select_for_update().order_by("pk").first()
        if existing is not None:
            return existing
    head = ChainHead.objects.create()
    return ChainHead.objects.select_for_update().get(pk=head.pk)


def chain_head() -> tuple[int, str]:
    """Return the current (seq, hash) of the chain."""
    head = ChainHead.objects.order_by("pk").first()
    return (head.seq, head.hash) if head is not None else (0, GENESIS)


def chain_prune(*, before_seq: int) -> tuple[int, str]:
    """Move the chain's base past the records an archive-and-prune run removes (the caller deletes)."""
    with process_lock, transaction.atomic():
        head = ChainHead.objects.select_for_update().order_by("pk").first()
        last = AuditEvent.objects.filter(seq__lt=before_seq).order_by("-seq").first()
        if head is None or last is None or last.seq is None:
            return (head.base_seq, head.base_hash) if head is not None else (0, GENESIS)
        head.base_seq, head.base_hash = last.seq, last.hash
        head.save(update_fields=["base_seq", "base_hash"])
        return head.base_seq, head.base_hash
