"""Hand-off of usage records and audit events from the gateway's hot path, which never writes to SQL.

With Redis, records are appended to one stream (``portcullis:audit``) in batches — one pipeline every few
milliseconds, not one round trip per record — and a Celery worker inserts them (``audit.ingest``). In the
embedded default they go to an in-process queue that a background thread writes to the database. Each
record carries an id (the request id for usage, a UUID for events), so a replayed batch is not doubled.

Nothing handed off is ever dropped: the stream is not trimmed (the ingest deletes what it stored, so its
length is what waits), and what Redis does not take stays in the process. Both are bounded instead by
``full``: once the stream holds ``backlog_limit`` entries (its length rides along with a batch at most once
a second) or the process holds ``buffer_limit`` records, the gateway refuses new requests
(``gateway.runtime``) until both are below ``RESUME_BELOW`` of their limits, rather than serve requests it
cannot record. What a process still holds when it stops goes to a spool file, which the next process to
start adopts and hands off first (``audit.spool``).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

from audit.compact_json import json_compact_dump
from audit.spool import Adopted, spool_release, spool_write

logger = logging.getLogger(__name__)

STREAM = "portcullis:audit"
BACKLOG_LIMIT = 1_000_000  # entries waiting in the stream before the gateways refuse new requests
BUFFER_LIMIT = 100_000  # records one process holds, Redis not taking them, before it refuses new requests
BACKLOG_CHECK_S = 1.0  # the stream's length is read (riding with a batch) at most this often
RESUME_BELOW = 0.9  # once full, a sink is full until what waits is below this share of each limit
FLUSH_INTERVAL_S = 0.02
RETRY_S = 1.0  # after a failed hand-off
MAX_BATCH = 500


def usage_entry(record: dict[str, Any]) -> dict[str, str]:
    """Return the stream fields for a usage record."""
    return {"t": "usage", "v": json_compact_dump(record).decode()}


def event_entry(event: dict[str, Any]) -> dict[str, str]:
    """Return the stream fields for an audit event (an event id is added so a replay is idempotent)."""
    event = dict(event)
    event.setdefault("event_id", str(uuid.uuid4()))
    event.setdefault("occurred_at", time.time())
    return {"t": "event", "v": json_compact_dump(event).decode()}


class AuditSink(Protocol):
    @property
    def backlog(self) -> int: ...
    @property
    def stream_backlog(self) -> int: ...
    @property
    def full(self) -> bool: ...
    def usage(self, record: dict[str, Any]) -> None: ...
    def event(self, event: dict[str, Any]) -> None: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


class BatchHost(Protocol):
    """Something that sends a rider's commands with its own Redis batches (``gateway.redisbatch``)."""

    def rider_add(self, rider: Any) -> None: ...
    def nudge(self, within_s: float) -> None: ...


def xadd_command(fields: dict[str, str]) -> tuple[Any, ...]:
    """Append one record; never with MAXLEN, which trims the oldest entries, stored or not."""
    return ("XADD", STREAM, "*", "t", fields["t"], "v", fields["v"])


XLEN = ("XLEN", STREAM)


class RedisStreamSink:
    """Buffer entries and append them to the Redis stream in batches.

    On its own it flushes one pipeline every ``FLUSH_INTERVAL_S``. Given a ``host`` (the gateway's
    Redis batcher) it rides along instead: its appends go out with the next batch of the hot path's
    commands, or within ``FLUSH_INTERVAL_S`` when there is none, so they cost no round trip of their own.
    """

    def __init__(
        self,
        redis: Any,
        host: BatchHost | None = None,
        *,
        backlog_limit: int = BACKLOG_LIMIT,
        buffer_limit: int = BUFFER_LIMIT,
    ) -> None:
        self._redis = redis
        self._host = host
        self._pending: list[dict[str, str]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.failures = 0
        self.backlog_limit = backlog_limit
        self.buffer_limit = buffer_limit
        self.stream_backlog = 0  # the stream's length when last read: entries handed off, not yet stored
        self._full = False
        self._next_check = 0.0  # monotonic time from which the next batch reads the stream's length
        self._check_timer: asyncio.TimerHandle | None = None
        self._adopted: list[Adopted] = []
        self._adopted_left: dict[int, str] = {}  # the adopted records not handed off yet, by their value's id
        if host is not None:
            host.rider_add(self)

    # --- the spool: what a stopping process could not hand off ---------------------------------------

    def adopt(self, adopted: list[Adopted]) -> int:
        """Take up spool files this process has locked and read (``spool_adopt``): their records go first,
        and each file is deleted once Redis has taken all of its records. Return how many were adopted."""
        records = [record for spooled in adopted for record in spooled.records]
        self._adopted += adopted
        self._adopted_left.update((id(record["v"]), record["v"]) for record in records)
        self._pending[:0] = records
        self._handed_off([])  # files that held no record
        return len(records)

    def spool(self, directory: Path) -> int:
        """At stop: write what is still held to a spool file for the next process, and let go of the
        adopted files (their records not handed off are in the new file). Return how many were spooled;
        if the file cannot be written, the adopted files stay for the next start and the rest is lost."""
        records = self._pending
        if records:
            spool_write(directory, records)
        self._pending = []
        self._adopted_left.clear()
        self._handed_off([])
        return len(records)

    def _handed_off(self, values: list[str]) -> None:
        """Note records Redis has taken (by their ``v``); delete adopted files that have nothing left."""
        if not self._adopted:
            return
        for value in values:
            self._adopted_left.pop(id(value), None)
        if not self._adopted_left:
            released, self._adopted = self._adopted, []
            for spooled in released:
                spool_release(spooled)

    def usage(self, record: dict[str, Any]) -> None:
        self._pending.append(usage_entry(record))
        self._signal()

    def event(self, event: dict[str, Any]) -> None:
        self._pending.append(event_entry(event))
        self._signal()

    def _signal(self) -> None:
        if self._host is not None:
            self._host.nudge(FLUSH_INTERVAL_S)
        else:
            self._wake.set()

    @property
    def full(self) -> bool:
        """Whether the records waiting (in the stream, or here for Redis) have reached their limit; once
        they have, until both are below ``RESUME_BELOW`` of it (no flapping at the limit's edge)."""
        share = RESUME_BELOW if self._full else 1
        self._full = (
            self.stream_backlog >= self.backlog_limit * share
            or len(self._pending) >= self.buffer_limit * share
        )
        return self._full

    def _check_soon(self) -> None:
        """Read the stream's length once ``BACKLOG_CHECK_S`` has passed since the last read, with nothing more
        to hand off: after appends (traffic that stops must still leave the length known), and after each
        read while full (a gateway refusing every request appends nothing, and must still see the drain)."""
        if self._check_timer is None:  # its own timer: a nudge for later would hold back everyone's sooner
            delay = max(self._next_check - time.monotonic(), 0.0)
            self._check_timer = asyncio.get_running_loop().call_later(delay, self._check_now)

    def _check_now(self) -> None:
        self._check_timer = None
        # The timer was due at _next_check; an event loop whose clock ticks in milliseconds (uvloop) can fire
        # it a little before time.monotonic() gets there, and the batch would then skip the read for good.
        self._next_check = min(self._next_check, time.monotonic())
        if self._host is not None:
            self._host.nudge(0)
        else:
            self._wake.set()

    def _check_due(self) -> bool:
        now = time.monotonic()
        if now < self._next_check:
            return False
        self._next_check = now + BACKLOG_CHECK_S
        return True

    def _checked(self, reply: Any) -> None:
        if isinstance(reply, int):  # an error (Redis refusing) keeps the last length read
            self.stream_backlog = reply
        if self.full:
            self._check_soon()  # while full, read it every second, requests or not: the drain is seen at once

    # --- the host's rider interface ----------------------------------------------------------------

    def take(self) -> list[tuple[Any, ...]]:
        batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
        if self._pending and self._host is not None:
            self._host.nudge(0)  # more than one batch's worth: the next goes at once
        commands = [xadd_command(fields) for fields in batch]
        if self._check_due():
            commands.append(XLEN)  # after the appends: the length with them
        elif commands:
            self._check_soon()  # the length with these too, once a second has passed, traffic or not
        return commands

    def done(self, sent: list[tuple[Any, ...]], replies: list[Any], error: BaseException | None) -> None:
        """Keep what failed or got no reply (the ingest drops a record it already stored), retry later."""
        failed = []
        taken = []
        for i, command in enumerate(sent):
            reply = replies[i] if i < len(replies) else error
            if command is XLEN:
                self._checked(reply)
            elif i >= len(replies) or isinstance(reply, Exception):
                failed.append(command)
            elif self._adopted:
                taken.append(command[6])
        if failed:  # Redis down or refusing: the records stay buffered in memory and are retried
            self.failures += 1
            self._pending[:0] = [{"t": c[4], "v": c[6]} for c in failed]
            if self._host is not None:
                self._host.nudge(RETRY_S)
            logger.warning("audit hand-off to Redis failed; %d records buffered", len(self._pending))
        if taken:
            self._handed_off(taken)

    @property
    def backlog(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        if self._host is None:
            self._task = asyncio.create_task(self._run(), name="audit-sink")

    async def stop(self) -> None:
        """Stop flushing on its own; a host hands off what is left when it stops."""
        if self._check_timer is not None:
            self._check_timer.cancel()
            self._check_timer = None
        if self._task is not None:
            self._task.cancel()
            for _ in range(50):  # shutdown: try hard to hand off what is left
                if not self._pending or not await self.flush():
                    break

    async def flush(self) -> bool:
        """Append up to one batch to the stream (and read its length when due); keep the batch for the next
        try if Redis fails."""
        batch = self._pending[:MAX_BATCH]
        check = self._check_due()
        if not batch and not check:
            return True
        pipe = self._redis.pipeline(transaction=False)
        for fields in batch:
            pipe.xadd(STREAM, fields)
        if check:
            pipe.xlen(STREAM)
        try:
            replies = await pipe.execute()
        except Exception:  # Redis down: records stay buffered in memory and are retried
            self.failures += 1
            logger.warning("audit hand-off to Redis failed; %d records buffered", len(self._pending))
            return False
        if check:
            self._checked(replies[-1])
        del self._pending[: len(batch)]
        if self._adopted:
            self._handed_off([fields["v"] for fields in batch])
        return True

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(FLUSH_INTERVAL_S)  # gather a batch
            if not await self.flush():  # the stream's length too, when due, with nothing pending
                await asyncio.sleep(1.0)
            while self._pending:
                if not await self.flush():
                    await asyncio.sleep(1.0)


class LocalSink:
    """Embedded default: a queue drained into the database by one background thread."""

    def __init__(self, *, buffer_limit: int = BUFFER_LIMIT) -> None:
        self._queue: queue.Queue[dict[str, str] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.buffer_limit = buffer_limit
        self._full = False

    def usage(self, record: dict[str, Any]) -> None:
        self._queue.put(usage_entry(record))

    def event(self, event: dict[str, Any]) -> None:
        self._queue.put(event_entry(event))

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    stream_backlog = 0  # no stream: everything waits in the queue

    @property
    def full(self) -> bool:
        """Whether the records waiting for the database (it is down, or slow) have reached their limit; once
        they have, until they are below ``RESUME_BELOW`` of it."""
        self._full = self._queue.qsize() >= self.buffer_limit * (RESUME_BELOW if self._full else 1)
        return self._full

    async def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audit-local-sink", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._queue.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    def drain(self) -> int:
        """Write everything queued now (used by the thread, and by tests)."""
        from audit.ingest import entries_store

        batch: list[dict[str, str]] = []
        while not self._queue.empty() and len(batch) < MAX_BATCH:
            item = self._queue.get_nowait()
            if item is not None:
                batch.append(item)
        if batch:
            try:
                entries_store(batch)
            except Exception:
                for item in batch:  # nothing is lost: the batch goes back for the next try
                    self._queue.put(item)
                raise
        return len(batch)

    def _run(self) -> None:
        from django.db import close_old_connections

        while True:
            item = self._queue.get()
            if item is None:
                self.drain()
                return
            self._queue.put(item)  # put back and drain in a batch
            time.sleep(FLUSH_INTERVAL_S)
            try:
                self.drain()
            except Exception:
                logger.exception("writing audit records to the database failed; they will be retried")
                time.sleep(1.0)
            finally:
                close_old_connections()
