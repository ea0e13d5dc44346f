"""Locks between processes: one that lasts until the current transaction ends, and one tried, not waited
for, that lasts for a block."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from django.db import connection

_local_locks: dict[int, threading.Lock] = {}
_local_locks_guard = threading.Lock()


def advisory_xact_lock(lock_id: int) -> None:
    """Wait for, and hold until the transaction ends, PostgreSQL's advisory lock ``lock_id``. Elsewhere
    nothing: SQLite, the embedded default, is one process whose transactions take the database's write
    lock as they begin (``transaction_mode`` IMMEDIATE)."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [lock_id])


@contextmanager
def advisory_lock_tried(lock_id: int) -> Iterator[bool]:
    """Take the lock ``lock_id`` if no one holds it, for the block; give whether it was taken (never wait).

    On PostgreSQL, its session advisory lock, so across processes and threads (each thread has its own
    session; one session may take it again: PostgreSQL's are re-entrant), released at the block's end
    whatever the block's transactions did; elsewhere (SQLite, the embedded default: one process) a lock of
    this process."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_lock(%s)", [lock_id])
            taken = bool(cursor.fetchone()[0])
        try:
            yield taken
        finally:
            if taken:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_advisory_unlock(%s)", [lock_id])
        return
    with _local_locks_guard:
        lock = _local_locks.setdefault(lock_id, threading.Lock())
    taken = lock.acquire(blocking=False)
    try:
        yield taken
    finally:
        if taken:
            lock.release()
