"""Deadlines for many waits at once, checked by one sweeping task per process.

Not a timer per wait: ``asyncio.timeout`` (or ``call_later`` and its cancel) cost 4 to 9 µs of CPU per
request on the benchmark's VM, where registering here costs a few hundred nanoseconds. The gateway's body
reads use it (``gateway.consumers``), and so do the server's header and Django body reads
(``config.protocol``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Hashable
from typing import Generic, Protocol, TypeVar

logger = logging.getLogger(__name__)


class Late(Hashable, Protocol):
    def late(self) -> None:
        """The deadline passed: cut what was waited for."""


T = TypeVar("T", bound=Late)


class Deadlines(Generic[T]):
    def __init__(self, sweep_s: float, idle_s: float = 30.0) -> None:
        self.sweep_s = sweep_s  # a wait is cut at most this long after its deadline
        self.idle_s = idle_s  # the sweeper ends after this long with nothing to watch (add restarts it)
        self.pending: dict[T, float] = {}
        self.sweeper: asyncio.Task[None] | None = None

    def add(self, item: T, deadline: float) -> None:
        self.pending[item] = deadline
        if self.sweeper is None:  # one event loop per process (uvicorn); the sweeper clears this on exit
            self.sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def remove(self, item: T) -> None:
        self.pending.pop(item, None)

    async def _sweep(self) -> None:
        idle = 0.0
        try:
            while idle < self.idle_s:
                await asyncio.sleep(self.sweep_s)
                idle = 0.0 if self.pending else idle + self.sweep_s
                now = time.monotonic()
                for item, deadline in list(self.pending.items()):
                    if deadline <= now:
                        del self.pending[item]
                        try:
                            item.late()
                        except Exception:  # one item's failure must not stop the sweep of the others
                            logger.exception("cutting a wait past its deadline failed")
        finally:
            if self.sweeper is asyncio.current_task():
                self.sweeper = None
