"""What this gateway process knows about revoked tokens and clients, and the streams to cut.

Revocations arrive as pushes (Redis pub/sub, or in-process listeners in the embedded default). The hot
path also asks Redis in its one round trip, so a process that missed a push still refuses. Pushes reach only
the processes running at the time, and Redis may restart empty, so the process also catches up with the
database's record at start and every ``REVOCATION_RELOAD_S`` (off the hot path, as the policies). A stream
registers the token it runs under; a push for that token (or its client) ends it at once.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from authserver.revocation import RevocationSnapshot, RevokedSet
from gateway.auth import Principal

# How late a process learns from the database what no push told it (a revocation from another process of
# the embedded default, a push missed while Redis was away): one indexed read of the revocations recorded
# since the last read. Until the first read has succeeded (the database was down at start) it is retried
# every REVOCATION_RETRY_S: until then the process knows nothing revoked before it started.
REVOCATION_RELOAD_S = 10.0
REVOCATION_RETRY_S = 1.0
# A reload reads the rows revoked since the newest it saw, less this margin: a row's ``revoked_at`` is taken
# (on the writer's clock) before its transaction commits, so a row can become visible after newer ones were
# read. It is missed only if its transaction commits more than REVOCATION_LATE_S, less twice the writers'
# clock skew, after the row was written. Revoking transactions commit within milliseconds (a refresh) or
# seconds (a client's 50k tokens, inserted at the end of the transaction); anything slower is caught by the
# full read every REVOCATION_FULL_RELOAD_S, and was pushed at commit anyway.
REVOCATION_LATE_S = 60.0
REVOCATION_FULL_RELOAD_S = 600.0


class RevocationWatcher(RevokedSet):
    def __init__(self) -> None:
        super().__init__()
        self._by_jti: dict[str, set[Callable[[], None]]] = defaultdict(set)
        self._by_client: dict[str, set[Callable[[], None]]] = defaultdict(set)
        self.last_push_at: float | None = None

    def apply(self, message: dict[str, Any]) -> None:
        """Record a revocation push and cut the streams it concerns."""
        self.last_push_at = time.time()
        self._take(message, pushed_at=self.last_push_at)
        self._cut(message)

    def catch_up(self, snapshot: RevocationSnapshot) -> dict[str, Any]:
        """Take in what the database records and no push told this process; cut the streams it concerns.
        Return what changed."""
        message = self._catch_up_message(snapshot)
        self._take(message, pushed_at=None)
        self._cut(message)
        return message

    def _cut(self, message: dict[str, Any]) -> None:
        for jti, _exp in message.get("jtis", []):
            for cut in list(self._by_jti.get(str(jti), ())):
                cut()
        for client_id in message.get("clients", []):
            for cut in list(self._by_client.get(str(client_id), ())):
                cut()

    def is_revoked(self, principal: Principal) -> bool:
        """Return whether a push (or the database's record) already revoked this token or its client."""
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
