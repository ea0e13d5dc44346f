"""The process's synchronous Redis client, one per URL and with it one connection pool, for everything that
is not the gateway's event loop: revocation, key and policy pushes made from requests and jobs, the audit
ingest, the metrics scrape. (The gateway's own async pool is ``gateway.runtime.redis_pool_open``.)"""

from __future__ import annotations

from functools import cache

import redis

TIMEOUT_S = 2.0  # a command (or a connection) that takes longer fails as Redis down


@cache
def redis_sync(url: str) -> redis.Redis:
    """The client (and its pool) for a URL (the ingest's blocking reads wait 0.2 s, within the timeout)."""
    return redis.Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
