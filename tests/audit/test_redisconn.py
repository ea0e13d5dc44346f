"""Outside the gateway's event loop, a process has one Redis client (and one connection pool) per URL."""

from __future__ import annotations

import audit.metrics
import audit.tasks
import authserver.revocation
import gateway.services
from audit.redisconn import TIMEOUT_S, redis_sync


def test_every_synchronous_user_of_redis_shares_one_client_per_url():
    url = "redis://127.0.0.1:1/0"  # never connected to: a client connects on its first command
    client = redis_sync(url)
    assert redis_sync(url) is client
    assert redis_sync("redis://127.0.0.1:1/1") is not client
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == TIMEOUT_S
    for module in (audit.metrics, audit.tasks, authserver.revocation, gateway.services):
        assert module.redis_sync is redis_sync, module.__name__
