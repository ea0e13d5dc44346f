"""What this gateway process knows about revoked tokens and clients, and the streams to cut.

Revocations arrive as pushes (Redis pub/sub, or in-process listeners in the embedded default). The hot
path also asks Redis in its one round trip, so a process that missed a push still refuses. Pushes reach only
the processes running at the time, and Redis may restart empty, so the process also catches up with the
database's record at start and every ``REVOCATION_RELOAD_S`` (off the hot path, as the policies). A stream,
or a call waiting for vLLM's whole answer, registers the token it runs under; a push for that token (or its
client) ends it at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
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
        # What runs under a token: each request or stream waiting on vLLM, by the callable that cuts it, and
        # how many run under each token. Flat dicts, not an index of sets by token and by client (~3 µs a
        # request to register and forget): a push looks through what is running only when it names a token
        # in use (every refresh pushes the token it replaced, seldom one in use) or a client (rare).
        self._watching: dict[Callable[[], None], Principal] = {}
        self._watched_jtis: dict[str, int] = {}
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
        if not self._watching:
            return
        watched = self._watched_jtis
        jtis = {str(jti) for jti, _exp in message.get("jtis", []) if str(jti) in watched}
        clients = {str(client_id) for client_id in message.get("clients", [])}
        if not jtis and not clients:
            return
        for cut, principal in list(self._watching.items()):
            if principal.jti in jtis or principal.client_id in clients:
                cut()

    def is_revoked(self, principal: Principal) -> bool:
        """Return whether a push (or the database's record) already revoked this token or its client."""
        return principal.client_id in self._clients or principal.jti in self._jtis

    def watch(self, principal: Principal, cut: Callable[[], None]) -> Watch:
        """``with watcher.watch(principal, cut):`` call ``cut`` if the token (or its client) is revoked while
        the block runs (or already was)."""
        return Watch(self, principal, cut)


class Watch:
    """``RevocationWatcher.watch``'s block: a class, not ``contextmanager``, as it runs on every request
    (``DisconnectWatch``'s note in gateway/streaming.py: some 7,000 instructions a request less)."""

    __slots__ = ("_cut", "_principal", "_watcher")

    def __init__(self, watcher: RevocationWatcher, principal: Principal, cut: Callable[[], None]) -> None:
        self._watcher, self._principal, self._cut = watcher, principal, cut

    def __enter__(self) -> None:
        watcher, principal, cut = self._watcher, self._principal, self._cut
        watcher._watching[cut] = principal
        jtis = watcher._watched_jtis
        jtis[principal.jti] = jtis.get(principal.jti, 0) + 1
        if watcher.is_revoked(principal):
            try:
                cut()
            except BaseException:
                self.__exit__()
                raise

    def __exit__(self, *exc_info: object) -> None:
        watcher, jti = self._watcher, self._principal.jti
        if watcher._watching.pop(self._cut, None) is None:
            return  # left already
        running = watcher._watched_jtis[jti] - 1
        if running:
            watcher._watched_jtis[jti] = running
        else:
            del watcher._watched_jtis[jti]
