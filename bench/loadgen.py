"""A closed-loop HTTP/1.1 load generator on raw asyncio streams, cheap enough to share a core.

One keep-alive connection per simulated client; each client sends its next request as soon as the
previous answer is complete. Requests are prebuilt bytes; answers are parsed just enough to frame them
(status line, ``Content-Length`` or ``chunked``) and, for server-sent-event streams, to time the first
data chunk and every content token. A warm-up is discarded, then a bounded window is measured; every
loop is bounded in time, and every request by a timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from bench.stats import ms, percentile

TOKEN_MARK = b'"delta":{"content":"tok'  # one per content token event in fakevllm's chat stream
DONE_MARK = b"data: [DONE]"
MAX_TRAILER_LINES = 32
CONNECT_TIMEOUT_S = 10.0
RECONNECTS_PER_CLIENT = 3  # a client whose connection keeps failing gives up rather than spin


class ProtocolError(Exception):
    """The server's answer is not HTTP/1.1 as we frame it."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where a load goes: a loopback host and port."""

    host: str
    port: int


def build_request(target: Target, method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
    """Return the bytes of one HTTP/1.1 keep-alive request."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {target.host}:{target.port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass(slots=True)
class Answer:
    """What the load generator keeps of one response."""

    status: int = 0
    body_bytes: int = 0
    first_chunk_at: float | None = None
    token_times: list[float] = field(default_factory=list)
    done: bool = False
    keep_alive: bool = True


def parse_head(head: bytes, answer: Answer) -> tuple[int | None, bool]:
    """Fill the status of answer from a response head; return (content length, chunked)."""
    lines = head.split(b"\r\n")
    status_line = lines[0].split(b" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1.") or not status_line[1].isdigit():
        raise ProtocolError(f"bad status line {lines[0][:80]!r}")
    answer.status = int(status_line[1])
    length: int | None = None
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            answer.keep_alive = b"close" not in value.lower()
    if length is None and not chunked:
        raise ProtocolError("an answer with neither Content-Length nor chunked framing")
    return length, chunked


async def read_answer(reader: asyncio.StreamReader, *, stream: bool) -> Answer:
    """Read one whole response: headers, then a body framed by length or chunked."""
    answer = Answer()
    length, chunked = parse_head(await reader.readuntil(b"\r\n\r\n"), answer)
    if chunked:
        await _read_chunked(reader, answer, stream=stream)
    elif length:
        await reader.readexactly(length)
        answer.first_chunk_at = time.perf_counter()
        answer.body_bytes = length
    return answer


async def _read_chunked(reader: asyncio.StreamReader, answer: Answer, *, stream: bool) -> None:
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
        if size == 0:
            for _ in range(MAX_TRAILER_LINES):
                if await reader.readuntil(b"\r\n") == b"\r\n":
                    return
            raise ProtocolError("too many trailer lines")
        data = await reader.readexactly(size + 2)
        now = time.perf_counter()
        if data[-2:] != b"\r\n":
            raise ProtocolError("a chunk without its CRLF")
        if answer.first_chunk_at is None:
            answer.first_chunk_at = now
        answer.body_bytes += size
        if stream:
            tokens = data.count(TOKEN_MARK)
            if tokens:
                answer.token_times.extend([now] * tokens)
            if DONE_MARK in data:
                answer.done = True


@dataclass(frozen=True)
class LoadSpec:
    """One closed-loop measurement."""

    target: Target
    request: bytes
    clients: int
    warmup_s: float
    duration_s: float
    stream: bool = False
    expected_tokens: int | None = None  # a stream is whole with this many tokens and its [DONE]
    request_timeout_s: float = 30.0
    drain_timeout_s: float = 30.0
    stagger_s: float = 0.0  # spread the clients' first requests evenly over this much of the warm-up


@dataclass(frozen=True)
class Window:
    """The clock of one measurement (time.perf_counter seconds)."""

    start: float
    measure_from: float
    end: float


@dataclass
class Tally:
    """Counts and samples of one measurement; only answers completed inside the window are sampled."""

    window: Window
    started: int = 0
    succeeded: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    in_flight_peak: int = 0
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)

    def fail(self, reason: str) -> None:
        """Count one failed request."""
        self.failed[reason] = self.failed.get(reason, 0) + 1

    def sample(self, sent_at: float, answer: Answer, *, stream: bool) -> None:
        """Keep the timings of one successful answer if it completed inside the window."""
        done_at = time.perf_counter()
        window = self.window
        if not window.measure_from <= done_at <= window.end:
            return
        self.latencies.append(done_at - sent_at)
        if not stream:
            return
        if answer.first_chunk_at is not None:
            self.ttfts.append(answer.first_chunk_at - sent_at)
        times = answer.token_times
        self.gaps.extend(later - earlier for earlier, later in zip(times, times[1:], strict=False))


def _verdict(spec: LoadSpec, answer: Answer) -> str | None:
    """Return why an answer counts as failed, or None when it is whole."""
    if answer.status != 200:
        return f"http_{answer.status}"
    if spec.stream and (
        not answer.done
        or (spec.expected_tokens is not None and len(answer.token_times) != spec.expected_tokens)
    ):
        return "incomplete_stream"
    return None


async def _exchange(
    spec: LoadSpec, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tally: Tally
) -> bool:
    """Send one request and read its answer; return whether the connection can be reused."""
    tally.started += 1
    tally.in_flight += 1
    tally.in_flight_peak = max(tally.in_flight_peak, tally.in_flight)
    sent_at = time.perf_counter()
    try:
        async with asyncio.timeout(spec.request_timeout_s):
            writer.write(spec.request)
            await writer.drain()
            answer = await read_answer(reader, stream=spec.stream)
    except (
        TimeoutError,
        OSError,
        asyncio.IncompleteReadError,
        asyncio.LimitOverrunError,
        ProtocolError,
    ) as exc:
        tally.fail(type(exc).__name__)
        return False
    finally:
        tally.in_flight -= 1
    reason = _verdict(spec, answer)
    if reason is None:
        tally.succeeded += 1
        tally.sample(sent_at, answer, stream=spec.stream)
    else:
        tally.fail(reason)
    return answer.keep_alive


async def _open(target: Target) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    async with asyncio.timeout(CONNECT_TIMEOUT_S):
        return await asyncio.open_connection(target.host, target.port)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        async with asyncio.timeout(1.0):
            await writer.wait_closed()
    except (TimeoutError, OSError):
        pass


async def _client(
    spec: LoadSpec,
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None,
    tally: Tally,
    delay_s: float = 0.0,
) -> None:
    """Send requests back to back until the window ends, reconnecting a few times at most."""
    if delay_s:
        await asyncio.sleep(delay_s)
    reconnects = 0
    while time.perf_counter() < tally.window.end:
        if conn is None:
            if reconnects >= RECONNECTS_PER_CLIENT:
                tally.fail("gave_up")
                return
            reconnects += 1
            try:
                conn = await _open(spec.target)
            except (TimeoutError, OSError) as exc:
                tally.fail(f"connect_{type(exc).__name__}")
                continue
        if not await _exchange(spec, conn[0], conn[1], tally):
            await _close(conn[1])
            conn = None
    if conn is not None:
        await _close(conn[1])


Observer = Callable[[Window], Awaitable[Any]]


async def run_closed_loop(spec: LoadSpec, observe: Observer | None = None) -> tuple[Tally, Any]:
    """Open one connection per client, run the closed loop, and return the tally and the observation."""
    opened = await asyncio.gather(*(_open(spec.target) for _ in range(spec.clients)), return_exceptions=True)
    conns = [c if isinstance(c, tuple) else None for c in opened]
    now = time.perf_counter()
    window = Window(now, now + spec.warmup_s, now + spec.warmup_s + spec.duration_s)
    tally = Tally(window)
    for _ in range(conns.count(None)):
        tally.fail("connect")
    observation = asyncio.ensure_future(observe(window)) if observe is not None else None
    live = [conn for conn in conns if conn is not None]
    stagger = min(spec.stagger_s, spec.warmup_s)
    clients = [
        asyncio.ensure_future(_client(spec, conn, tally, stagger * i / len(live)))
        for i, conn in enumerate(live)
    ]
    budget = spec.warmup_s + spec.duration_s + spec.request_timeout_s + spec.drain_timeout_s
    if clients:
        _done, pending = await asyncio.wait(clients, timeout=budget)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    result = await observation if observation is not None else None
    return tally, result


def tally_summary(tally: Tally) -> dict[str, Any]:
    """Return the numbers of one measurement: rates, latency and stream percentiles in milliseconds."""
    window_s = tally.window.end - tally.window.measure_from
    latencies, ttfts, gaps = sorted(tally.latencies), sorted(tally.ttfts), sorted(tally.gaps)
    failed = sum(tally.failed.values())
    never_sent = sum(
        n for reason, n in tally.failed.items() if reason.startswith("connect") or reason == "gave_up"
    )
    return {
        "window_s": round(window_s, 3),
        "in_window": len(latencies),
        "rps": round(len(latencies) / window_s, 1) if window_s > 0 else None,
        "p50_ms": ms(percentile(latencies, 50)),
        "p99_ms": ms(percentile(latencies, 99)),
        "ttft_p50_ms": ms(percentile(ttfts, 50)),
        "ttft_p99_ms": ms(percentile(ttfts, 99)),
        "gap_p50_ms": ms(percentile(gaps, 50)),
        "gap_p99_ms": ms(percentile(gaps, 99)),
        "started": tally.started,
        "succeeded": tally.succeeded,
        "failed": failed,
        "failures": dict(tally.failed),
        "dropped": tally.started - tally.succeeded + never_sent,  # failed, cut off, or never sent
        "in_flight_peak": tally.in_flight_peak,
    }
