"""The per-process policy snapshot: loaded at start, replaced on a push, refreshed every 30 s.

The hot path reads a dict; it never touches the database. The clients' allowed web origins (CORS) are
read with the policies, in the same reload, and pushed by the same channel when a client changes. A missed
push is healed by the periodic reload.
Reloads may overlap (the timer's, a push's): the one begun last wins, whichever ends last. Applied in the
order they ended, a read begun before an admin's change but slow to return undid the push's, until the
next reload 30 s later.
"""

from __future__ import annotations

import logging

from gateway.dbread import db_read
from gateway.selectors import DEFAULT, NO_ACCESS, Policy, origins_snapshot, policies_snapshot

logger = logging.getLogger(__name__)

FULL_RELOAD_S = 30.0


class PolicyCache:
    def __init__(self) -> None:
        self._snapshot: dict[str, Policy] = {}
        self._origins: dict[str, frozenset[bytes]] = {}  # by client id
        self._any_origin: frozenset[bytes] = frozenset()  # every client's, for a preflight (no token yet)
        self.loaded = False
        self._begun = 0  # reloads begun, numbered
        self._applied = 0  # the number of the reload whose snapshot is served

    def get(self, client_id: str) -> Policy:
        """Return the client's policy, else the default policy, else no access."""
        snapshot = self._snapshot
        return snapshot.get(client_id) or snapshot.get(DEFAULT) or NO_ACCESS

    def origin_listed(self, origin: bytes) -> bool:
        """Whether some client lists this web origin: a preflight, which carries no token, is answered for
        it; other pages get no CORS headers, so a browser keeps them from reading any answer."""
        return origin in self._any_origin

    def origin_allowed(self, client_id: str, origin: bytes) -> bool:
        """Whether this client lists this web origin: a page elsewhere may not call with its tokens."""
        return origin in self._origins.get(client_id, ())

    def replace(
        self, snapshot: dict[str, Policy], origins: dict[str, frozenset[bytes]] | None = None
    ) -> None:
        self._snapshot = snapshot
        if origins is not None:
            self._origins = origins
            self._any_origin = frozenset().union(*origins.values())
        self.loaded = True

    async def reload(self) -> bool:
        """Reload every policy from the database (off the hot path); keep the old snapshot on failure, and
        drop one older than the snapshot served."""
        self._begun += 1
        ticket = self._begun
        try:
            snapshot, origins = await db_read(_snapshots)
        except Exception:  # database down: keep serving the last snapshot; the reason is logged
            logger.exception("policy reload failed; serving the last snapshot")
            return False
        if ticket > self._applied:
            self._applied = ticket
            self.replace(snapshot, origins)
        return True


def _snapshots() -> tuple[dict[str, Policy], dict[str, frozenset[bytes]]]:
    return policies_snapshot(), origins_snapshot()
