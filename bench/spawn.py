"""Start, wait for and stop the harness's processes, on 127.0.0.1 and free ports.

Every process is started in its own session, so stopping it (by its process group id) also stops what it
spawned; pinned to a core with ``taskset`` when asked; its output in a log file, whose end is shown when
it exits at start.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from bench import proc

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"  # git-ignored
PYTHON = sys.executable
STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


class StackError(Exception):
    """The stack could not be started as asked (the message says why)."""


@dataclass
class Service:
    """One process the harness started."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    port: int | None = None

    @property
    def base(self) -> str:
        """The service's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def send_signal(self, number: signal.Signals) -> None:
        """Send a signal to the process's group (nothing happens when it is gone)."""
        _signal(functools.partial(os.killpg, self.process.pid, number))

    def stop(self, seen: set[int]) -> None:
        """Stop the process and its group; its descendants join ``seen`` first (the pids to check after)."""
        children = proc.descendants(self.process.pid)
        seen.update(children)
        _terminate(self.process, children)


def free_port(taken: set[int]) -> int:
    """Return a loopback port the kernel just handed out, distinct from those already chosen."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in taken:
            taken.add(port)
            return port
    raise StackError("could not find a free port")


def port_check_free(port: int) -> None:
    """Refuse to go on if something listens on (or holds) the port."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise StackError(f"port {port} on 127.0.0.1 is taken; refusing to run") from None


def spawn(
    name: str, argv: list[str], core: int | None, port: int | None, *, env: dict[str, str], log_dir: Path
) -> Service:
    """Start a process in its own session, on ``core`` unless None, logging to ``<log_dir>/<name>.log``."""
    if port is not None:
        port_check_free(port)
    prefix = ["taskset", "-c", str(core)] if core is not None else []
    log = log_dir / f"{name}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            prefix + argv,
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopping it stops its children too
        )
    return Service(name, process, log, port)


def wait_until(
    service: Service,
    ready: Callable[[], bool],
    who: str,
    missed: str,
    every_s: float,
    timeout_s: float = STARTUP_TIMEOUT_S,
) -> None:
    """Poll ``ready`` every ``every_s`` until it is true; fail if the process exits first, or after
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if service.process.poll() is not None:
            raise StackError(f"{who} exited at start:\n{_tail(service.log)}")
        if time.monotonic() > deadline:
            raise StackError(f"{who} {missed} within {timeout_s} s")
        time.sleep(every_s)


def _terminate(process: subprocess.Popen[bytes], children: list[int]) -> None:
    """Stop a process we started and its group: SIGTERM, SIGKILL after a grace period, then stragglers."""
    if process.poll() is None:
        _signal(lambda: os.killpg(process.pid, signal.SIGTERM))  # its own session: the group is its pid
        _signal(lambda: os.killpg(process.pid, signal.SIGCONT))  # a stopped worker acts on it only then
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _signal(lambda: os.killpg(process.pid, signal.SIGKILL))
            process.wait(timeout=STOP_TIMEOUT_S)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while any(proc.alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in children:  # descendants seen before the stop that outlived their parent
        if proc.alive(pid):
            _signal(functools.partial(os.kill, pid, signal.SIGKILL))


def _signal(send: Callable[[], None]) -> None:
    try:
        send()
    except ProcessLookupError:
        pass


def _tail(path: Path, size: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return ""


def on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM ends a harness run as an exception would: through the stack's context manager, which stops
    everything it started. A second one must not cut that stop short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def harness_start(log_prefix: str) -> Path:
    """What every harness command does first: log to stderr, stop its stack on SIGTERM, and make the
    folder its processes log to (kept when the run fails)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, on_sigterm)
    return Path(tempfile.mkdtemp(prefix=log_prefix))
