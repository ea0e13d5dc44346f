"""Auto-pipelining of the gateway's Redis traffic: one write and one read carry many requests' commands.

A request's reservation (one EVALSHA) is queued and awaited. Everything queued while the event loop was
busy goes out together on one connection, and the replies are matched to their callers in order, so under
load a request pays a share of one round trip instead of one each. When Redis is quiet (no batch in
flight) the caller sends its batch itself and reads the reply on its own task, which spares it the two
turns of the event loop that handing over to a link and back would cost, and it waits for that reply
briefly without yielding the loop (``_reply_wait``), which spares it the third. Work that nobody waits for
(settlements, usage records: the "riders") goes first in the next batch; with no traffic it goes on its
own after a short linger. When a batch fails, every caller queued behind it fails at once too (they fall
back to per-process limits rather than wait on a dead Redis), and each rider gets back exactly the
commands that got no reply, to retry. hiredis packs the commands and parses the replies, redis-py owns the
connection; this module only decides what travels together, and bounds each batch with one timeout rather
than one per reply. Measured on the project's 2-core machine, a lone EVALSHA through redis-py costs ~75 µs
of the gateway's CPU, one of eight in a pipeline ~30 µs, and redis-py's pure-Python packing alone ~14 µs
per command against hiredis's ~2 µs (bench/README.md). A link the other end closed while idle is made
again before the next batch goes on it (``_closed_by_peer``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

import hiredis
from redis import exceptions as redis_exceptions
from redis.asyncio import Connection, SSLConnection

logger = logging.getLogger(__name__)

STOP_BUDGET_S = 10.0  # at shutdown, batches go on while Redis takes them, for at most this long
BATCH_TIMEOUT_S = 2.0  # a batch not answered in this time fails as "Redis down"
RIDER_RETRY_S = 1.0  # a rider whose commands failed sends them again after this long
LINKS = 4  # batches in flight at once; each link is one connection
MAX_CALLS = 512  # awaited commands per batch; the rest wait for the next one
CARRY_AFTER_QUIET_S = 0.001  # a caller sends its own batch only after Redis has been quiet this long
REPLY_WAIT_S = 0.0005  # a carried batch's reply is waited for this long without yielding the event loop
REPLY_WAIT_PAUSE_S = 0.1  # after a wait in vain, carried batches do not wait for this long
REPLY_WAIT_BUDGET_S = 0.1  # waits hold the event loop (and, polling, its core) at most this long each second
REPLY_READ_BYTES = 65536  # read at most this much during the wait; the rest comes the usual way
Command = tuple[Any, ...]
Reply = Any  # a decoded reply, or the redis ResponseError that the command got


class Packed(bytes):
    """A command already in Redis's protocol (RESP), sent as it is: ``call(Packed(...))``."""


class Rider(Protocol):
    """A component whose commands ride along with the next batch."""

    def take(self) -> list[Command]:
        """Return the commands to send now (possibly none); they are the rider's until ``done``."""

    def done(self, sent: list[Command], replies: list[Reply], error: BaseException | None) -> None:
        """Hand back the outcome: a reply per command, in order (a redis ResponseError for a command that
        failed). With ``error`` set the batch broke after ``len(replies)`` replies: the commands after
        those got none and may or may not have run."""


class RedisStopped(redis_exceptions.ConnectionError):
    """The batcher is stopping (the process is shutting down): callers take their Redis-down path."""


class RedisUnanswered(redis_exceptions.ConnectionError, redis_exceptions.TimeoutError):
    """A call went out on a live connection and its reply never came (the connection broke, or the batch
    timed out): Redis may have run it. A call that never left (Redis refused the connection) gets the
    plain error instead."""


def _read_within(fd: int, timeout_s: float) -> bytes:
    """Read what arrives on the non-blocking ``fd`` within ``timeout_s`` (b"" if nothing, or at its end).

    It polls the descriptor rather than sleeping on it. A sleeping thread lets its core halt, and the reply
    must then wake it: on the project's 2-core VM a Redis round trip from a quiet gateway took 163-214 µs at
    the median that way and 134-181 µs polling (bench/README.md, session 19). It does not yield the core
    between polls: with another busy process on the core, each ``sched_yield()`` handed that process a
    whole time slice (2.9 ms a round trip at the median). A Redis on the same core runs when the scheduler
    preempts the wait, or after it, and a wait in vain pauses the waits (``REPLY_WAIT_PAUSE_S``). A
    descriptor that blocks is not read at all (b""): a read there could hold the event loop until Redis
    answers.
    """
    if os.get_blocking(fd):
        return b""
    deadline = time.perf_counter() + timeout_s
    while True:
        try:
            return os.read(fd, REPLY_READ_BYTES)
        except BlockingIOError:
            if time.perf_counter() >= deadline:
                return b""


def _closed_by_peer(connection: Connection) -> bool:
    """Whether the other end closed (or reset) a link's connection while it was idle: Redis's ``timeout``,
    or a proxy's or load balancer's idle limit.

    The next batch then fails on its first read, as if Redis were down (the fallback, a 503 for a token not
    cleared in the last minute, an outage audited), although Redis is up. Checked before the batch is written,
    the link is simply made again: the old connection took nothing of the batch, so nothing can run twice.
    Resending after a failure could not tell a close that came before the write from one after Redis ran it (a
    close that reaches the event loop only after the write still fails its batch as unanswered, as before).
    redis-py's ``health_check_interval`` would PING (a round trip) before the first batch after each interval,
    which must be shorter than a timeout the gateway does not know. The check costs ~0.2 µs a batch (a call,
    two method calls; one batch a request when traffic is light) against the ~75 µs a lone EVALSHA costs. TCP
    keepalive (redis-py's default, probes after 30 s idle) keeps a NAT's or a load balancer's state alive, and
    shows a peer gone silently as a reset here.
    """
    reader = connection._reader
    return reader is not None and (reader.at_eof() or reader.exception() is not None)


class RedisBatcher:
    def __init__(
        self,
        redis: Any,
        links: int = LINKS,
        *,
        reply_wait_s: float = REPLY_WAIT_S,
        waited: Callable[[bool], None] | None = None,
    ) -> None:
        self.redis = redis
        self.reply_wait_s = reply_wait_s
        self._waited = waited  # told of every wait: whether the reply came within it
        self._wait_paused_until = 0.0
        self._budget_since = 0.0  # the loop's time when the current second of waiting began
        self._blocked_s = 0.0  # how long waits have blocked the loop in that second
        self._calls: list[tuple[Command, asyncio.Future[Reply]]] = []
        self._barriers: list[asyncio.Future[bool]] = []
        self._riders: list[Rider] = []
        self._idle: list[tuple[int, asyncio.Future[None]]] = []  # parked links; the last parked goes first
        self._signalled = False  # work arrived while no link was parked: the next free link takes it
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._links: list[Connection | None] = [None] * links
        self._inflight = 0
        self._quiet = asyncio.Event()  # no batch in flight
        self._quiet.set()
        self._quiet_since = 0.0  # the loop's time when the last batch in flight was answered
        self._stopping = False
        self._sent = False  # whether the last batch carried anything

    def rider_add(self, rider: Rider) -> None:
        self._riders.append(rider)

    async def call(self, *command: Any) -> Reply:
        """Send one command with the next batch and return its reply (a ResponseError is raised)."""
        if self._stopping:
            raise RedisStopped("the gateway is stopping")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        self._calls.append((command, future))
        try:
            carried = (
                not self._inflight
                and len(self._calls) == 1
                and loop.time() - self._quiet_since >= CARRY_AFTER_QUIET_S
                and await self._carry()
            )
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                future.exception()  # the batch failed this call too; its caller has gone, so that is all
            raise
        if not carried:
            self._signal()
            if not self._tasks:
                self.start()
        reply = await future
        if isinstance(reply, redis_exceptions.ResponseError):
            raise reply
        return reply

    def nudge(self, within_s: float) -> None:
        """A rider has work: make sure a batch goes within ``within_s`` even if no request comes."""
        if self._stopping:
            return  # stop() sends what is left
        if self._timer is None and not self._signalled:
            self._timer = asyncio.get_running_loop().call_later(within_s, self._signal)

    def _signal(self) -> None:
        """Wake one parked link (not all of them: the others would find nothing to send)."""
        taken = self._parked_take()
        if taken is None:
            self._signalled = True
        else:
            taken[1].set_result(None)

    def _parked_take(self) -> tuple[int, asyncio.Future[None]] | None:
        """Take the link parked last (a cancelled link's wait is skipped), or None when none is parked."""
        while self._idle:
            link, parked = self._idle.pop()
            if not parked.done():
                return link, parked
        return None

    async def _carry(self) -> bool:
        """Redis is quiet (no batch in flight for a while, no other call queued): send the batch on the
        caller's task, on a parked link's connection, and read its replies there; return False when no
        link is parked.

        Handing the call to a link's task and its reply back costs two turns of the event loop, and on a
        busy loop a turn is what a lone request waits for most (bench/README.md). Under load batches
        follow each other closely, and calls are queued for the links as before: carried one by one,
        they would each pay a round trip's CPU instead of a share of one. Should the caller be cancelled
        while it waits, the batch breaks as a broken connection does: the link's connection is dropped
        and the riders take back the commands that got no reply.
        """
        taken = self._parked_take()
        if taken is None:
            return False
        link, parked = taken
        self._timer_cancel()
        try:
            await self._batch(link, wait=True)
        finally:
            if parked.done():
                pass  # its task was cancelled (the batcher stopped)
            elif self._signalled or self._stopping:
                parked.set_result(None)  # its task takes what arrived meanwhile, or stops
            else:
                self._idle.append((link, parked))
        return True

    def _timer_cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def flush(self) -> bool:
        """Send what the riders hold now and wait until it and every batch in flight are answered."""
        if not self._tasks:
            return await self._batch(0)
        barrier: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._barriers.append(barrier)
        self._signal()
        ok = await barrier
        await self._quiet.wait()
        return ok

    def start(self) -> None:
        if self._stopping:
            return
        self._tasks = [
            asyncio.create_task(self._work(link), name=f"redis-batcher-{link}")
            for link in range(len(self._links))
        ]

    async def stop(self) -> None:
        """Let the links finish the batch they carry, then send what the riders still hold, on one link."""
        self._stopping = True
        self._timer_cancel()
        for _link, parked in self._idle:
            if not parked.done():
                parked.set_result(None)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=BATCH_TIMEOUT_S + 1.0)
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks = []
        deadline = asyncio.get_running_loop().time() + STOP_BUDGET_S
        while asyncio.get_running_loop().time() < deadline:  # a backlog takes batches; a dead Redis gives up
            if not await self._batch(0) or not self._sent:
                break
        for link in range(len(self._links)):
            await self._drop(link)

    async def _work(self, link: int) -> None:
        while not self._stopping:
            if not self._signalled:
                parked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._idle.append((link, parked))
                await parked
                if self._stopping:
                    return
            self._signalled = False
            self._timer_cancel()
            if not await self._batch(link):
                await asyncio.sleep(0.05)  # Redis is failing: callers already got the error; do not spin

    async def _batch(self, link: int, *, wait: bool = False) -> bool:
        calls, self._calls = self._calls[:MAX_CALLS], self._calls[MAX_CALLS:]
        if self._calls:
            self._signal()
        barriers, self._barriers = self._barriers, []
        rides: list[tuple[Rider, list[Command]]] = []
        for rider in self._riders:
            try:
                sent = rider.take()
            except Exception:  # a rider's bug must not stop the link that carries everyone's commands
                logger.exception("a Redis batch rider failed to hand over its commands")
                continue
            if sent:
                rides.append((rider, sent))
        self._sent = bool(calls or rides)
        ok = True
        self._inflight += 1
        self._quiet.clear()
        try:
            if self._sent:
                ok = await self._send(link, calls, rides, wait=wait)
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._quiet.set()
                self._quiet_since = asyncio.get_running_loop().time()
            for barrier in barriers:
                if not barrier.done():
                    barrier.set_result(ok)
        return ok

    async def _send(
        self,
        link: int,
        calls: list[tuple[Command, asyncio.Future[Reply]]],
        rides: list[tuple[Rider, list[Command]]],
        *,
        wait: bool = False,
    ) -> bool:
        """Send the riders' commands, then the calls; settlements then land before later reservations."""
        commands = [c for _rider, sent in rides for c in sent] + [command for command, _future in calls]
        first_call = len(commands) - len(calls)
        replies: list[Reply] = []
        error: BaseException | None = None
        reached = False  # whether the commands may have reached Redis
        try:
            async with asyncio.timeout(BATCH_TIMEOUT_S):
                connection = self._connect(link)
                reached = connection.is_connected
                if reached and _closed_by_peer(connection):  # while idle: nothing of this batch was sent
                    await self._drop(link)
                    connection, reached = self._connect(link), False
                packed = [c[0] if type(c[0]) is Packed else hiredis.pack_command(c) for c in commands]
                await connection.send_packed_command(b"".join(packed), check_health=False)
                reached = True
                if wait:
                    self._reply_wait(connection)
                for _ in commands:
                    try:
                        replies.append(await connection.read_response())
                    except redis_exceptions.ResponseError as exc:  # this command failed; the batch goes on
                        replies.append(exc)
                    if len(replies) > first_call:  # answer a waiting request as soon as its reply is read
                        future = calls[len(replies) - 1 - first_call][1]
                        if not future.done():
                            future.set_result(replies[-1])
        except TimeoutError:
            error = redis_exceptions.TimeoutError("Redis did not answer")
        except BaseException as exc:
            error = exc
        if error is not None:
            await self._drop(link)
            self._fail_calls(calls[max(0, len(replies) - first_call) :], error, reached=reached)
        offset = 0
        for rider, sent in rides:
            got = replies[offset : offset + len(sent)]
            offset += len(sent)
            try:
                rider.done(sent, got, error if len(got) < len(sent) else None)
            except Exception:
                logger.exception("a Redis batch rider failed to take back its replies")
        if error is not None and not isinstance(error, Exception):
            raise error  # cancelled: the riders have what got no reply back
        return error is None

    def _reply_wait(self, connection: Connection) -> None:
        """Wait up to ``reply_wait_s`` for the reply of a batch the caller carries, blocking the event loop,
        and hand what arrived to the connection's reader, where the reads that follow find it at once.

        A quiet Redis nearby answers within a fraction of that (~0.2 ms on the project's 2-core VM, most of
        it waking idle cores). Awaited, the reply also waits for whatever else the loop has ready: on a
        loop relaying 32 streams, 0.45 ms at the median and 2.0 ms at p99 from the batch's write to its
        reply being read, against 0.30 and 0.77 ms waiting (bench/README.md, session 11). A carried batch
        is the request's next step and nothing else of Redis's is in flight, so the loop pauses for the
        reply rather than for every other step it has ready.

        The other steps wait meanwhile, and the wait polls (``_read_within``), so the waits are bounded twice:
        they hold the loop, and its core, for at most ``REPLY_WAIT_BUDGET_S`` of each second (then the rest of
        the second's batches are read the usual way), and a wait in vain (a Redis further away than the wait,
        or busy; its reply is then read the usual way) stops waiting for ``REPLY_WAIT_PAUSE_S``. TLS
        connections never wait (their bytes are the TLS layer's to read).
        """
        loop = asyncio.get_running_loop()
        if self.reply_wait_s <= 0 or loop.time() < self._wait_paused_until:
            return
        reader, writer = getattr(connection, "_reader", None), getattr(connection, "_writer", None)
        if (
            reader is None
            or writer is None
            or isinstance(connection, SSLConnection)
            or writer.get_extra_info("sslcontext") is not None
        ):
            return
        sock = writer.get_extra_info("socket")
        fd = sock.fileno() if sock is not None else -1
        if fd < 0:  # closed under us: the read that follows reports it
            return
        now = loop.time()
        if now - self._budget_since >= 1.0:
            self._budget_since, self._blocked_s = now, 0.0
        elif self._blocked_s >= REPLY_WAIT_BUDGET_S:
            return
        started = time.perf_counter()
        try:
            data = _read_within(fd, self.reply_wait_s)
        except OSError:
            data = b""  # the connection broke: the read that follows reports it
        finally:
            self._blocked_s += time.perf_counter() - started
        if data:
            reader.feed_data(data)
        else:
            self._wait_paused_until = loop.time() + REPLY_WAIT_PAUSE_S
        if self._waited is not None:
            try:
                self._waited(bool(data))
            except Exception:
                logger.exception("counting a Redis reply wait failed")

    def _fail_calls(
        self, calls: list[tuple[Command, asyncio.Future[Reply]]], error: BaseException, *, reached: bool
    ) -> None:
        """The batch broke: its waiting callers, and every caller queued behind it, get the error now
        (``RedisUnanswered`` for the batch's own callers when their commands may have reached Redis)."""
        queued, self._calls = self._calls, []
        failure = error if isinstance(error, Exception) else redis_exceptions.ConnectionError("cancelled")
        unanswered = RedisUnanswered(f"no reply from Redis: {failure}") if reached else failure
        for _command, future in calls:
            if not future.done():
                future.set_exception(unanswered)
        for _command, future in queued:
            if not future.done():
                future.set_exception(failure)

    def _connect(self, link: int) -> Connection:
        """A link's own connection, made with the pool's settings but no per-read timeout."""
        connection = self._links[link]
        if connection is None:
            kwargs = dict(self.redis.connection_pool.connection_kwargs)
            kwargs.update(socket_timeout=None)  # each batch is bounded by BATCH_TIMEOUT_S instead
            connection = self._links[link] = self.redis.connection_pool.connection_class(**kwargs)
        return connection

    async def _drop(self, link: int) -> None:
        connection, self._links[link] = self._links[link], None
        if connection is not None:
            await connection.disconnect(nowait=True)
