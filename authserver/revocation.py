"""Revocation push: tell every gateway process, at once, which tokens and clients are no longer valid.

With Redis, a revoked ``jti`` is written as a key that lives until the token would have expired, and a
message on one channel tells every subscribed gateway process to drop it now. A disabled client is a key
without expiry. In the embedded default the same happens inside the one process. The gateway reads the
same keys (``revoked_key_jti``/``revoked_key_client``) so a process that missed a message still refuses.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable

import redis
from django.conf import settings

from audit.redisconn import redis_sync

logger = logging.getLogger(__name__)

CHANNEL = "portcullis:revocations"
KEYS_CHANNEL = "portcullis:keys"  # a key was published or activated: gateways refresh their key set
Listener = Callable[[dict[str, object]], None]


def revoked_key_jti(jti: str) -> str:
    """Return the Redis key that marks one access token revoked."""
    return f"portcullis:revoked:jti:{jti}"


def revoked_key_client(client_id: str) -> str:
    """Return the Redis key that marks every token of a client revoked."""
    return f"portcullis:revoked:client:{client_id}"


class LocalRevocations:
    """The in-process store for the embedded default (and the listeners of this process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jtis: dict[str, float] = {}
        self.clients: set[str] = set()
        self.listeners: list[Listener] = []

    def add(self, message: dict[str, object]) -> None:
        now = time.time()
        with self._lock:
            for jti, exp in message.get("jtis", []):  # type: ignore[attr-defined]
                self._jtis[jti] = float(exp)
            for client_id in message.get("clients", []):  # type: ignore[attr-defined]
                self.clients.add(client_id)
            for client_id in message.get("restored_clients", []):  # type: ignore[attr-defined]
                self.clients.discard(client_id)
            self._jtis = {j: e for j, e in self._jtis.items() if e > now}
        for listener in list(self.listeners):
            listener(message)

    def is_revoked(self, jti: str, client_id: str) -> bool:
        return client_id in self.clients or self._jtis.get(jti, 0) > time.time()


local_revocations = LocalRevocations()
key_listeners: list[Callable[[], None]] = []


def keys_changed_publish() -> None:
    """Tell every gateway process that the published key set changed (they refetch it at once)."""
    for listener in list(key_listeners):
        listener()
    if not settings.REDIS_URL:
        return
    try:
        redis_sync(settings.REDIS_URL).publish(KEYS_CHANNEL, json.dumps({"at": time.time()}))
    except redis.RedisError:
        logger.exception("key-set push failed; gateways refetch on an unknown kid or on their timer")


def revocation_publish(
    *,
    jtis: Iterable[tuple[str, int]] = (),
    clients: Iterable[str] = (),
    restored_clients: Iterable[str] = (),
) -> None:
    """Publish revoked token ids (with their expiry), revoked clients and re-enabled clients."""
    now = int(time.time())
    live = [(jti, exp) for jti, exp in jtis if exp > now]
    message: dict[str, object] = {
        "jtis": live,
        "clients": list(clients),
        "restored_clients": list(restored_clients),
        "at": time.time(),
    }
    if not (live or message["clients"] or message["restored_clients"]):
        return
    local_revocations.add(message)
    if not settings.REDIS_URL:
        return
    client = redis_sync(settings.REDIS_URL)
    pipe = client.pipeline(transaction=False)
    for jti, exp in live:
        pipe.set(revoked_key_jti(jti), 1, ex=max(1, exp - now + 60))  # +60 s: the gateway's clock leeway
    for client_id in message["clients"]:  # type: ignore[attr-defined]
        pipe.set(revoked_key_client(client_id), 1)
    for client_id in message["restored_clients"]:  # type: ignore[attr-defined]
        pipe.delete(revoked_key_client(client_id))
    pipe.publish(CHANNEL, json.dumps(message))
    try:
        pipe.execute()
    except redis.RedisError:
        # The database row is already gone and the caller's answer must not turn into a 500. A gateway
        # that cannot reach Redis fails closed on its own; one that can will still see the token live
        # until it expires (at most the access-token lifetime). Logged without token ids.
        logger.exception("revocation push to Redis failed for %d token ids", len(live))
