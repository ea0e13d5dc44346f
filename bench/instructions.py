"""Count the instructions the gateway spends on a request: ``python -m bench.instructions``.

Timings taken on one of this project's VMs cannot compare two versions of the code: the VMs differ from
session to session (by 3× in the bare proxy's CPU per request) and drift within one (bench/README.md,
"Machine caveats"). Instructions do not depend on what else the machine runs. This starts the benchmark's
stack (``bench.stack``) with the gateway and the bare proxy under valgrind's callgrind, counting off, and
for each case sends a fixed number of requests through each, one window of ``--small`` and one of
``--large`` requests, the counters dumped after each. The difference of the two counts over the difference
in requests is the instructions per request, free of what starting and ending a window costs; every window
is measured ``--rounds`` times, so how repeatable a figure is shows beside it.

Cases: a non-streamed chat completion from one client, the same from 32 clients at once (the Redis
batcher's work is shared between them), a 16-chunk stream with no delay (its events arrive a few to a read)
and a 16-chunk stream paced at 10 ms a chunk (one event a read, as vLLM streams).

What is not counted, and why: the wait for a Redis reply that polls (``PORTCULLIS_REDIS_REPLY_WAIT_US``)
is off, because a poll's instructions grow with how long the reply takes. Under valgrind the servers run
tens of times slower, and slower still when the machine is busy, so their timers (the upstream health
checks, the key-set refresh) land more often per request than at full speed: the rate they run at with no
load is counted first (the ``idle`` line) and taken from each window for its time, which makes the figure
steadier (``per_request_net``; the plain difference, ``per_request``, is kept beside it). The counts are of
the whole process, Python's interpreter included: comparable between two versions measured on the same
Python and libraries, not across them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench.loadgen import ProtocolError, Target, build_request, read_answer
from bench.scenarios import CHAT_PATH, chat_body
from bench.spawn import RESULTS_DIR, StackError, harness_start
from bench.stack import Stack, StackOptions

logger = logging.getLogger("bench")

CONTROL_TIMEOUT_S = 120.0
POKE_AFTER_S = 1.0  # a control command not taken within this long wakes the server with requests
STARTUP_TIMEOUT_S = 600.0  # Django and the gateway start under valgrind
REQUEST_TIMEOUT_S = 120.0
TOKENS = 16


@dataclass(frozen=True)
class Case:
    """One kind of request, sent by ``clients`` at once."""

    key: str
    title: str
    model: str
    stream: bool
    clients: int
    scale: float = 1.0  # this share of --small and --large (a paced stream takes 160 ms at least)


CASES = (
    Case("chat_1", "non-streamed chat, 1 client", "m1", stream=False, clients=1),
    Case("chat_32", "non-streamed chat, 32 clients", "m1", stream=False, clients=32),
    Case("stream_1", "16-chunk stream, no delay, 1 client", "m1", stream=True, clients=1),
    Case("paced_1", "16-chunk stream paced at 10 ms, 1 client", "m2", stream=True, clients=1, scale=0.25),
)
TARGETS = ("gateway", "bare")


class CountError(Exception):
    """A count could not be taken (the message says why)."""


def callgrind_prefix(out_dir: Path) -> tuple[str, ...]:
    """The command line that runs a server under callgrind with counting off, a file per process."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise StackError("valgrind is not installed (apt-get install valgrind)")
    return (
        valgrind,
        "--tool=callgrind",
        "--instr-atstart=no",  # counting starts at the first window
        "--collect-jumps=no",
        f"--callgrind-out-file={out_dir}/callgrind.%p.out",
        "--log-file=" + str(out_dir / "valgrind.%p.log"),
    )


def dump_total(path: Path) -> int:
    """Return the instructions a callgrind dump file counted (its ``totals:`` line, else ``summary:``)."""
    summary = None
    with path.open() as lines:
        for line in lines:
            if line.startswith("totals:"):
                return int(line.split()[1])
            if line.startswith("summary:"):
                summary = int(line.split()[1])
    if summary is None:
        raise CountError(f"{path.name} holds no totals")
    return summary


def per_request(small: float, large: float, small_n: int, large_n: int) -> float:
    """Instructions per request from a window of ``small_n`` requests and one of ``large_n``."""
    if large_n <= small_n:
        raise ValueError("the large window must hold more requests than the small one")
    return (large - small) / (large_n - small_n)


class Counter:
    """Drive callgrind in one server process: counting on, and a dump (which also zeroes) when asked.

    ``callgrind_control`` leaves its command in a file that valgrind reads only while the process runs; a
    server asleep in ``epoll_wait`` would take its time to wake, so after ``POKE_AFTER_S`` its health path
    is called until the command is done (counted in the window that ends or begins there: a few hundred
    thousand instructions each, which is why the windows are hundreds of requests apart).
    """

    def __init__(self, pid: int, base: str, out_dir: Path) -> None:
        self.pid, self.base, self.out_dir = pid, base, out_dir
        self.dumps = 0
        self.dumped_at: float | None = None

    def _control(self, *args: str) -> None:
        control = shutil.which("callgrind_control")
        if control is None:
            raise CountError("callgrind_control is not installed (it comes with valgrind)")
        done = threading.Event()
        poker = threading.Thread(target=self._poke_until, args=(done,), daemon=True)
        poker.start()
        try:
            result = subprocess.run(
                [control, *args, str(self.pid)],
                capture_output=True,
                timeout=CONTROL_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise CountError(f"callgrind_control {' '.join(args)} got no answer") from None
        finally:
            done.set()
            poker.join()
        if result.returncode != 0:
            raise CountError(f"callgrind_control {' '.join(args)}: {result.stdout.decode()[-500:]}")

    def _poke_until(self, done: threading.Event) -> None:
        if done.wait(POKE_AFTER_S):  # a server with work to do (or timers due) reads it by itself
            return
        with httpx.Client(timeout=30.0) as client:
            while not done.wait(0.2):
                try:
                    client.get(self.base + "/healthz")
                except httpx.HTTPError:
                    pass

    def counting(self) -> None:
        self._control("--instr=on")

    def dump(self) -> tuple[int, float]:
        """Dump and zero the counters; return the instructions counted since the last dump, and the
        seconds since then (0 for the first)."""
        self._control("--dump")
        now = time.monotonic()
        seconds, self.dumped_at = (0.0 if self.dumped_at is None else now - self.dumped_at), now
        self.dumps += 1
        path = self.out_dir / f"callgrind.{self.pid}.out.{self.dumps}"
        if not path.exists():
            raise CountError(f"callgrind wrote no {path.name}")
        return dump_total(path), seconds


async def send(target: Target, request: bytes, clients: int, total: int, *, stream: bool) -> int:
    """Send ``total`` requests from ``clients`` keep-alive connections; return how many succeeded."""
    shares = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]

    async def client(share: int) -> int:
        reader, writer = await asyncio.open_connection(target.host, target.port)
        ok = 0
        try:
            for _ in range(share):
                writer.write(request)
                answer = await asyncio.wait_for(read_answer(reader, stream=stream), REQUEST_TIMEOUT_S)
                whole = not stream or (answer.done and len(answer.token_times) == TOKENS)
                ok += answer.status == 200 and whole
        finally:
            writer.close()
        return ok

    return sum(await asyncio.gather(*(client(share) for share in shares if share)))


def _request(stack: Stack, case: Case, target: str) -> tuple[Target, bytes]:
    where = Target("127.0.0.1", stack.ports[target])
    headers = {"Content-Type": "application/json"}
    if target == "gateway":
        headers["Authorization"] = "Bearer " + stack.access_token()  # fresh: tokens live 300 s
    body = chat_body(case.model, stream=case.stream, tokens=TOKENS)
    return where, build_request(where, "POST", CHAT_PATH, headers, body)


def measure_case(
    stack: Stack,
    counters: dict[str, Counter],
    case: Case,
    target: str,
    sizes: tuple[int, int],
    idle_per_s: float,
) -> dict[str, Any]:
    """One round of one case through one target: a warm-up, then the two windows, each dumped.

    ``per_request`` is the plain difference; ``per_request_net`` first takes from each window what the
    server's timers did in its time at ``idle_per_s``: under valgrind they fire tens of times more often per
    request than at full speed, and more still when the machine is busy, so this is the steadier figure."""
    where, request = _request(stack, case, target)
    counter = counters[target]
    small_n, large_n = (max(case.clients, round(n * case.scale)) for n in sizes)
    warm = asyncio.run(send(where, request, case.clients, case.clients * 2, stream=case.stream))
    counter.dump()  # the warm-up's count, and whatever came before it, is dropped
    if warm != case.clients * 2:
        raise CountError(
            f"{case.key} through {target}: {warm} of {case.clients * 2} warm-up requests succeeded"
        )
    counts, seconds = [], []
    for n in (small_n, large_n):
        ok = asyncio.run(send(where, request, case.clients, n, stream=case.stream))
        count, took = counter.dump()
        counts.append(count)
        seconds.append(round(took, 3))
        if ok != n:
            raise CountError(f"{case.key} through {target}: {ok} of {n} requests succeeded")
    timers = [idle_per_s * s for s in seconds]
    return {
        "case": case.key,
        "target": target,
        "requests": [small_n, large_n],
        "instructions": counts,
        "seconds": seconds,
        "per_request": round(per_request(counts[0], counts[1], small_n, large_n)),
        "per_request_net": round(per_request(counts[0] - timers[0], counts[1] - timers[1], small_n, large_n)),
    }


def measure_idle(counters: dict[str, Counter], seconds: float) -> dict[str, int]:
    """Instructions a second each server spends with no requests (its timers), over ``seconds``."""
    for counter in counters.values():
        counter.dump()
    time.sleep(seconds)
    rates = {}
    for target, counter in counters.items():
        count, took = counter.dump()
        rates[target] = round(count / took)
    return rates


def execute(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """Start the stack under callgrind, count every case, stop everything; return the result document."""
    options = StackOptions(
        log_dir=log_dir,
        db_name=args.db_name,
        worker=False,  # ingest is the worker's work, not the gateway's
        redis_reply_wait_us=0,  # a polling wait's instructions grow with the wait (module docstring)
        server_prefix=callgrind_prefix(log_dir),
        server_startup_timeout_s=STARTUP_TIMEOUT_S,
    )
    result: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "python": sys.version.split()[0],
        "valgrind": subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout.strip(),
        "sizes": [args.small, args.large],
        "rounds": args.rounds,
    }
    stack = Stack(options)
    try:
        with stack:
            stack.start()
            result["idle_per_s"], result["measurements"] = _count(stack, args, log_dir)
    finally:
        result["pids"] = sorted(stack.pids)
        result["leftover_pids"] = stack.leftover_pids()
    return result


def _count(
    stack: Stack, args: argparse.Namespace, log_dir: Path
) -> tuple[dict[str, int], list[dict[str, Any]]]:
    counters = {t: Counter(stack.service(t).process.pid, stack.service(t).base, log_dir) for t in TARGETS}
    for counter in counters.values():
        counter.counting()
    idle = measure_idle(counters, args.idle)
    measurements = []
    for case in [c for c in CASES if c.key in args.cases]:
        for round_ in range(args.rounds):  # the order of the targets alternates from round to round
            for target in TARGETS if round_ % 2 == 0 else reversed(TARGETS):
                sizes = (args.small, args.large)
                m = measure_case(stack, counters, case, target, sizes, idle[target])
                logger.info("%s through %s: %s instructions a request", case.key, target, m["per_request"])
                measurements.append(m)
    return idle, measurements


def _median(values: list[int]) -> float:
    ordered, middle = sorted(values), len(values) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def summary(measurements: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per case measured: each target's net counts by round, their medians, what the gateway adds to the
    bare proxy's, and the plain (timers included) medians beside them."""
    rows = []
    for case in CASES:
        ours = [m for m in measurements if m["case"] == case.key]
        net = {t: [m["per_request_net"] for m in ours if m["target"] == t] for t in TARGETS}
        plain = {t: [m["per_request"] for m in ours if m["target"] == t] for t in TARGETS}
        if not all(net.values()):
            continue
        gateway, bare = _median(net["gateway"]), _median(net["bare"])
        rows.append(
            {
                "case": case.key,
                "title": case.title,
                "rounds": net,
                "gateway": gateway,
                "bare": bare,
                "added": gateway - bare,
                "plain": {t: _median(v) for t, v in plain.items()},
            }
        )
    return rows


def print_summary(result: dict[str, Any]) -> None:
    """The table: per case, the net medians per request and every round's figure; the plain ones after."""
    print(f"\ninstructions per request (callgrind; Python {result['python']}, {result['valgrind']})")
    print(f"{'case':<46} {'gateway':>11} {'bare':>11} {'added':>11}   rounds: gateway | bare")
    for row in result["summary"]:
        rounds = " | ".join(", ".join(f"{v:,}" for v in row["rounds"][t]) for t in TARGETS)
        figures = " ".join(f"{row[key]:>11,.0f}" for key in ("gateway", "bare", "added"))
        print(f"{row['title']:<46} {figures}   {rounds}")
    idle = result["idle_per_s"]
    print(
        f"idle, instructions a second: gateway {idle['gateway']:,}, bare {idle['bare']:,};"
        " taken from each window"
    )
    plain = "; ".join(
        f"{r['case']} {r['plain']['gateway']:,.0f} / {r['plain']['bare']:,.0f}" for r in result["summary"]
    )
    print(f"for its time. With them (gateway / bare): {plain}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=100, help="requests in the small window (default 100)")
    parser.add_argument("--large", type=int, default=500, help="requests in the large window (default 500)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every case and target (default 2)")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of the idle count (default 5)")
    keys = ",".join(c.key for c in CASES)
    parser.add_argument("--cases", default=keys, help=f"comma-separated, of: {keys}")
    parser.add_argument("--json-out", type=Path, default=None, help="where to write the JSON results")
    parser.add_argument("--db-name", default="portcullis_bench_instr", help="the PostgreSQL database to own")
    parser.add_argument(
        "--keep", action="store_true", help="keep the callgrind dumps (one per window) for callgrind_annotate"
    )
    args = parser.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(args.cases) - {c.key for c in CASES}
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
    if args.large <= args.small or args.small < 1:
        parser.error("--large must be more than --small, and --small at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log_dir = harness_start("portcullis-instr-")
    try:
        result = execute(args, log_dir)
    except (StackError, CountError, ProtocolError, OSError) as exc:
        logger.error("bench.instructions: %s (logs kept in %s)", exc, log_dir)
        return 2
    result["summary"] = summary(result["measurements"])
    path = args.json_out or RESULTS_DIR / f"instructions-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print_summary(result)
    print(f"JSON: {os.path.relpath(path)}")
    if result["leftover_pids"]:
        logger.error("processes outlived the count: %s (logs kept in %s)", result["leftover_pids"], log_dir)
        return 1
    if args.keep:
        print(f"callgrind dumps kept in {log_dir} (callgrind.<pid>.out.<n>, one per window, in order)")
    else:
        shutil.rmtree(log_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
