"""Profile the gateway process with py-spy while a scenario runs, and summarise where its time goes.

py-spy (``pip install py-spy``; not a project dependency) samples the running gateway by PID and writes
collapsed stacks (``--format raw``, one ``frame;frame;... count`` line each, aggregated by function).
The summary covers the main thread (the event loop; the gateway does its work there): it ranks functions
by own time (the leaf frame of each sample), groups own time by package, and ranks the project's own
functions by inclusive time. Idle samples (waiting in epoll) are not recorded, so shares are of the time
the event loop was busy; time in C code called from the loop itself (uvloop's I/O) shows as
``Runner.run``. Samples of other threads (thread-pool workers) are counted apart.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

SAMPLE_RATE_HZ = 250
PROJECT_PACKAGES = ("gateway", "audit", "authserver", "config")
OTHER_THREAD_ROOT = "Thread._bootstrap "  # a stack that did not start on the main thread (the event loop)
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def py_spy_path() -> str | None:
    """Return the py-spy executable next to this Python, or on PATH, or None."""
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def py_spy_start(
    executable: str, pid: int, duration_s: int, out: Path, *, gil_only: bool = False
) -> subprocess.Popen[bytes]:
    """Start sampling a process for duration_s seconds into a collapsed-stack file.

    ``gil_only`` keeps only the samples of the thread holding the GIL: with a pool of threads that
    mostly wait on the database, that is where the CPU goes; without it the waits dominate.
    """
    argv = [
        executable,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(duration_s),
        "--rate",
        str(SAMPLE_RATE_HZ),
    ]
    # --nonblocking: pausing the process for every sample (py-spy's default) cost the gateway most of its
    # throughput here; reading its memory while it runs may misplace a sample now and then
    argv += ["--format", "raw", "--function", "--nonblocking", "--output", str(out)]
    if gil_only:
        argv.append("--gil")
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _where(path: str) -> tuple[str, str]:
    """Return (short file name, package) for a frame's file."""
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            short = path.split(marker, 1)[1]
            return short, short.split("/", 1)[0]
    stdlib = re.search(r"python3\.\d+/(.*)", path)
    if stdlib:
        short = stdlib.group(1)
        return short, "stdlib:" + short.split("/", 1)[0].removesuffix(".py")
    root = str(Path(__file__).resolve().parents[1]) + "/"
    short = path.removeprefix(root)
    return short, short.split("/", 1)[0]


def _frame(raw: str) -> tuple[str, str]:
    """Return (display name, package) of one collapsed-stack frame."""
    match = _FRAME.match(raw.strip())
    if match is None:
        return raw.strip(), "?"
    short, package = _where(match.group("file"))
    return f"{match.group('func')} ({short})", package


def summarize(collapsed: str, top: int = 15, *, all_threads: bool = False) -> dict[str, Any]:
    """Rank own time by function and by package, and the project's functions by inclusive time.

    The event loop's samples only, unless ``all_threads`` (the token endpoint works on pool threads)."""
    own: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = other_threads = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        if stack.startswith(OTHER_THREAD_ROOT) and not all_threads:
            other_threads += samples  # mostly idle executor threads that py-spy does not see as idle
            continue
        frames = [_frame(f) for f in stack.split(";")]
        total += samples
        own[frames[-1][0]] += samples
        packages[frames[-1][1]] += samples
        for name in {name for name, package in frames if package in PROJECT_PACKAGES}:
            inclusive[name] += samples

    def ranked(counter: Counter[str], n: int) -> list[dict[str, Any]]:
        return [
            {"frame": name, "samples": count, "share_pct": round(100.0 * count / total, 1) if total else 0.0}
            for name, count in counter.most_common(n)
        ]

    return {
        "samples": total,
        "other_thread_samples": other_threads,
        "top": ranked(own, top),
        "by_package": ranked(packages, top),
        "project_inclusive": ranked(inclusive, top),
    }
