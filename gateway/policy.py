"""The per-process policy snapshot: loaded at start, replaced on a push, refreshed every 30 s.

The hot path reads a dict; it never touches the database. A missed push is healed by the periodic reload.
"""

from __future__ import annotations

import logging

from gateway.dbread import db_read
from gateway.selectors import DEFAULT, NO_ACCESS, Policy, policies_snapshot

logger = logging.getLogger(__name__)

FULL_RELOAD_S = 30.0


class PolicyCache:
    def __init__(self) -> None:
        self._snapshot: dict[str, Policy] = {}
        self.loaded = False

    def get(self, client_id: str) -> Policy:
        """Return the client's policy, else the default policy, else no access."""
        snapshot = self._snapshot
        return snapshot.get(client_id) or snapshot.get(DEFAULT) or NO_ACCESS

    def replace(self, snapshot: dict[str, Policy]) -> None:
        self._snapshot = snapshot
        self.loaded = True

    async def reload(self) -> bool:
        """Reload every policy from the database (off the hot path); keep the old snapshot on failure."""
        try:
            snapshot = await db_read(policies_snapshot)
        except Exception:  # database down: keep serving the last snapshot; the reason is logged
            logger.exception("policy reload failed; serving the last snapshot")
            return False
        self.replace(snapshot)
        return True
