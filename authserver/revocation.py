"""Revocation push: tell every gateway process, at once, which tokens and clients are no longer valid.

With Redis, a revoked ``jti`` is written as a key that lives until the token would have expired, and a
message on one channel tells every subscribed gateway process to drop it now. A disabled client is only
a message: disabling it revokes every token it holds, each a key, and a key of its own, without expiry,
had locked the client out for good when its re-enabling did not reach Redis (Redis down at that moment, or
``disabled`` changed past the services). In the embedded default the same happens inside the one process.
The gateway reads the same keys (``revoked_key_jti``) so a process that missed a message still refuses.

Pushes and Redis keys are not a record: a process that starts later was told nothing, and a Redis restarted
empty has no keys. The database is the record (a ``RevokedAccessToken`` row per revoked token until it
expires, ``Client.disabled``), and every gateway process catches up with it at start and every few seconds
(``revocation_catch_up``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
from django.conf import settings

from audit.redisconn import redis_sync

logger = logging.getLogger(__name__)

CHANNEL = "portcullis:revocations"
KEYS_CHANNEL = "portcullis:keys"  # a key was published or activated: gateways refresh their key set
Listener = Callable[[dict[str, object]], None]
# A gateway accepts a token up to its clock leeway past ``exp`` (GATEWAY["LEEWAY_S"], 30 s): a revocation
# is kept a minute past it, in Redis and in the database.
REVOKED_PAST_EXP_S = 60
# Dropping the expired ids rebuilds the whole dict (tens of thousands of entries under many refreshes): at
# most this often, not on every push. Until then an expired id costs memory only, as ``exp`` still guards.
PRUNE_EVERY_S = 10.0


def revoked_key_jti(jti: str) -> str:
    """Return the Redis key that marks one access token revoked."""
    return f"portcullis:revoked:jti:{jti}"


@dataclass(frozen=True)
class RevocationSnapshot:
    """What the database says is revoked and still matters, read after ``read_at`` (``time.time()``): every
    revoked token, or only those revoked since a time (``selectors.revocations_live``), and every disabled
    client."""

    jtis: tuple[tuple[str, int], ...]  # revoked access tokens not yet expired: (jti, exp)
    clients: frozenset[str]  # disabled clients
    read_at: float
    revoked_through: datetime | None = None  # the newest ``revoked_at`` among ``jtis``: a high-water mark


def revocation_catch_up(
    snapshot: RevocationSnapshot,
    *,
    jtis: Mapping[str, float],
    clients: set[str],
    changed_at: Mapping[str, float],
) -> dict[str, object]:
    """Return the push that brings a store (its token ids, its clients) up to the database's record: the
    revoked tokens it lacks, the disabled clients it lacks and the re-enabled clients it still holds. A
    client that a push changed after the read began is left as the push left it: the push is newer."""
    newer = {client_id for client_id, at in changed_at.items() if at >= snapshot.read_at}
    return {
        "jtis": [(jti, exp) for jti, exp in snapshot.jtis if jti not in jtis],
        "clients": sorted(snapshot.clients - clients - newer),
        "restored_clients": sorted(clients - snapshot.clients - newer),
    }


class RevokedSet:
    """Revoked token ids (with their ``exp``) and disabled clients, as pushes and the database's record
    leave them: this process's store (``LocalRevocations``) and each gateway's watcher hold one each."""

    def __init__(self) -> None:
        self._jtis: dict[str, float] = {}
        self._clients: set[str] = set()
        self._changed_at: dict[str, float] = {}  # when a push last revoked or restored each client
        self._pruned_at = 0.0

    def _take(self, message: Mapping[str, Any], *, pushed_at: float | None) -> None:
        """Record a push (``pushed_at``: when it came) or a catch-up's message (None)."""
        now = time.time()
        for jti, exp in message.get("jtis", []):
            self._jtis[str(jti)] = float(exp)
        for client_id in message.get("clients", []):
            self._clients.add(str(client_id))
        for client_id in message.get("restored_clients", []):
            self._clients.discard(str(client_id))
        if pushed_at is not None:
            for client_id in (*message.get("clients", []), *message.get("restored_clients", [])):
                self._changed_at[str(client_id)] = pushed_at
        if now - self._pruned_at >= PRUNE_EVERY_S:  # by time: rebuilding on every push cost a core
            self._jtis = {j: e for j, e in self._jtis.items() if e + REVOKED_PAST_EXP_S > now}
            self._pruned_at = now

    def _catch_up_message(self, snapshot: RevocationSnapshot) -> dict[str, object]:
        """The push that brings this set up to the database's record (``revocation_catch_up``)."""
        return revocation_catch_up(
            snapshot, jtis=self._jtis, clients=self._clients, changed_at=self._changed_at
        )


class LocalRevocations(RevokedSet):
    """The in-process store for the embedded default (and the listeners of this process)."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self.listeners: list[Listener] = []

    def add(self, message: dict[str, object]) -> None:
        with self._lock:
            self._take(message, pushed_at=time.time())
        for listener in list(self.listeners):
            listener(message)

    def catch_up(self, snapshot: RevocationSnapshot) -> dict[str, object]:
        """Take in what the database records and this store was not told; return what changed."""
        with self._lock:
            message = self._catch_up_message(snapshot)
            self._take(message, pushed_at=None)
        return message

    def is_revoked(self, jti: str, client_id: str) -> bool:
        exp = self._jtis.get(jti)
        return client_id in self._clients or (exp is not None and exp + REVOKED_PAST_EXP_S > time.time())


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
        pipe.set(revoked_key_jti(jti), 1, ex=max(1, exp - now + REVOKED_PAST_EXP_S))
    pipe.publish(CHANNEL, json.dumps(message))
    try:
        pipe.execute()
    except redis.RedisError:
        # The database row is already gone and the caller's answer must not turn into a 500. A gateway
        # that cannot reach Redis fails closed on its own; one that can learns the revocation from the
        # database's record at its next catch-up (gateway.revocation, seconds). Logged without token ids.
        logger.exception("revocation push to Redis failed for %d token ids", len(live))
