"""What this gateway process knows about revoked tokens and clients, and the streams to cut.

Revocations arrive as pushes (Redis pub/sub, or in-process listeners in the embedded default). The hot
path also asks Redis in its one round trip, so a process that missed a push still refuses. A stream
registers the token it runs under; a push for that token (or its client) ends it at once.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from gateway.auth import Principal


class RevocationWatcher:
    def __init__(self) -> None:
        self._jtis: dict[str, float] = {}
        self._clients: set[str] = set()
        self._by_jti: dict[str, set[Callable[[], None]]] = defaultdict(set)
        self._by_client: dict[str, set[Callable[[], None]]] = defaultdict(set)
        self.last_push_at: float | None = None

    def apply(self, message: dict[str, Any]) -> None:
        """Record a revocation push and cut the streams it concerns."""
        now = time.time()
        self.last_push_at = now
        for jti, exp in message.get("jtis", []):
            self._jtis[str(jti)] = float(exp)
            for cut in list(self._by_jti.get(str(jti), ())):
                cut()
        for client_id in message.get("clients", []):
            self._clients.add(str(client_id))
            for cut in list(self._by_client.get(str(client_id), ())):
                cut()
        for client_id in message.get("restored_clients", []):
            self._clients.discard(str(client_id))
        if len(self._jtis) > 10_000:
            self._jtis = {j: e for j, e in self._jtis.items() if e > now}

    def is_revoked(self, principal: Principal) -> bool:
        """Return whether a push already revoked this token or its client."""
        return principal.client_id in self._clients or principal.jti in self._jtis

    @contextmanager
    def watch(self, principal: Principal, cut: Callable[[], None]) -> Iterator[None]:
        """Call ``cut`` if the token (or its client) is revoked while the block runs (or already was)."""
        self._by_jti[principal.jti].add(cut)
        self._by_client[principal.client_id].add(cut)
        try:
            if self.is_revoked(principal):
                cut()
            yield
        finally:
            self._discard(self._by_jti, principal.jti, cut)
            self._discard(self._by_client, principal.client_id, cut)

    @staticmethod
    def _discard(index: dict[str, set[Callable[[], None]]], key: str, cut: Callable[[], None]) -> None:
        cuts = index.get(key)
        if cuts is not None:
            cuts.discard(cut)
            if not cuts:
                del index[key]
