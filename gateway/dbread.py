"""The gateway's few database reads (policies, and the key set when no JWKS URL is configured), made off
the event loop and off the hot path, as a request's would be.

They run in the loop's thread pool, outside any request, so nothing closed their connections: each pool
thread kept one pooled connection for the life of the process, and one broken by a PostgreSQL restart or a
failover was used again and again (Django reconnects only when no connection is held), so policy reloads
and key refreshes failed until the process restarted. Each read now starts by dropping a connection that
is broken or obsolete and ends by giving its own back to the pool, as Django does around a request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from asgiref.sync import sync_to_async
from django.db import close_old_connections

T = TypeVar("T")


def fresh(read: Callable[[], T]) -> T:
    """Run ``read`` on a usable connection, and give the connection back after."""
    close_old_connections()
    try:
        return read()
    finally:
        close_old_connections()


async def db_read(read: Callable[[], T]) -> T:
    """Run a database read in the loop's thread pool (``fresh``), never on the event loop."""
    return await sync_to_async(fresh, thread_sensitive=False)(read)
