"""A lock between processes that lasts until the current transaction ends."""

from __future__ import annotations

from django.db import connection


def advisory_xact_lock(lock_id: int) -> None:
    """Wait for, and hold until the transaction ends, PostgreSQL's advisory lock ``lock_id``. Elsewhere
    nothing: SQLite, the embedded default, is one process whose transactions take the database's write
    lock as they begin (``transaction_mode`` IMMEDIATE)."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [lock_id])
