"""The benchmark's data: the PostgreSQL database the harness creates empty and drops again, and what the
gateway and the worker leave there and in Redis (the audit stream, its consumer group, the usage records).
Read without importing Django.
"""

from __future__ import annotations

from typing import Any

import psycopg
import redis
from psycopg import sql

from bench.spawn import StackError

AUDIT_STREAM = "portcullis:audit"  # audit.sink.STREAM


def redis_connect(url: str) -> redis.Redis:
    """Return a client of the Redis database at ``url`` (close it when done)."""
    return redis.Redis.from_url(url, socket_timeout=5)


def _admin(pg_url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(f"{pg_url}/postgres", autocommit=True, connect_timeout=5)


def database_create(pg_url: str, name: str) -> None:
    """Create the database empty, dropping one left by an earlier run; refuse one that is in use (another
    run's: dropping it would end that run's connections)."""
    identifier = sql.Identifier(name)
    with _admin(pg_url) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (name,)).fetchone()
        if row is not None and row[0]:
            raise StackError(
                f"the database {name} is in use ({row[0]} connections): another "
                "benchmark running? Give this one its own with --db-name"
            )
        try:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(identifier))
        except psycopg.errors.ObjectInUse as exc:  # someone connected since the check
            raise StackError(f"the database {name} is in use: {exc}") from exc
        conn.execute(sql.SQL("CREATE DATABASE {}").format(identifier))


def database_drop(pg_url: str, name: str) -> None:
    """Drop the database, ending whatever connections it still has."""
    with _admin(pg_url) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def usage_rows_count(pg_url: str, name: str) -> int:
    """Return how many usage records the worker has stored."""
    with psycopg.connect(f"{pg_url}/{name}", connect_timeout=5) as conn:
        row = conn.execute("SELECT count(*) FROM audit_usagerecord").fetchone()
    return int(row[0]) if row else 0


def audit_stream_state(redis_url: str) -> dict[str, int]:
    """Return the audit stream's backlog (XLEN) and how many entries were ever appended."""
    client = redis_connect(redis_url)
    try:
        info: dict[str, Any] = client.xinfo_stream(AUDIT_STREAM)
    except redis.ResponseError:  # no stream yet
        return {"backlog": 0, "appended": 0}
    finally:
        client.close()
    return {"backlog": int(info.get("length", 0)), "appended": int(info.get("entries-added", 0))}


def ingest_group_exists(redis_url: str) -> bool:
    """Whether the worker's consumer group of the audit stream exists (its first ingest creates it)."""
    client = redis_connect(redis_url)
    try:
        return bool(client.xinfo_groups(AUDIT_STREAM))
    except redis.ResponseError:  # no stream yet
        return False
    finally:
        client.close()
