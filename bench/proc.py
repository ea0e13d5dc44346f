"""Read what the harness needs about processes and cores from /proc: CPU time, time spent waiting for a
core, resident memory, descendants, and what a core did."""

from __future__ import annotations

import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")
SYS = Path("/sys")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses


def cpu_seconds(pid: int) -> float | None:
    """Return user plus system CPU seconds a process has used, or None if it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime and stime: fields 14 and 15 of stat


def run_delay_seconds(pid: int | str) -> float | None:
    """Return how long a process's main thread has waited, runnable, for a core (``/proc/<pid>/schedstat``:
    run-queue time), or None if it is gone or the kernel does not keep it."""
    try:
        fields = (PROC / str(pid) / "schedstat").read_text().split()
    except OSError:
        return None
    return int(fields[1]) / 1e9 if len(fields) >= 2 else None


def core_seconds(core: int) -> tuple[float, float] | None:
    """Return a core's busy seconds (user, nice, system, irq and softirq; guest time is inside user) and
    the seconds the hypervisor gave it to others (steal), from ``/proc/stat``; None if not listed."""
    try:
        lines = (PROC / "stat").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if fields and fields[0] == f"cpu{core}" and len(fields) >= 9:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[1:9])
            return (user + nice + system + irq + softirq) / CLOCK_TICKS, steal / CLOCK_TICKS
    return None


def status_kib(pid: int, name: str) -> int | None:
    """Return a kB field of /proc/<pid>/status (VmRSS, VmHWM), or None."""
    try:
        lines = (PROC / str(pid) / "status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return None


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def descendants(pid: int) -> list[int]:
    """Return every descendant of a process (children first), as far as /proc shows them now."""
    found: list[int] = []
    todo = [pid]
    for _ in range(10_000):  # bounded walk
        if not todo:
            break
        current = todo.pop()
        for task in (PROC / str(current) / "task").glob("*/children"):
            try:
                children = [int(c) for c in task.read_text().split()]
            except OSError:
                continue
            found.extend(children)
            todo.extend(children)
    return found


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo."""
    try:
        for line in (PROC / "cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def cpu_idle() -> str:
    """Describe how an idle core waits: the cpuidle driver and governor, and, in a guest whose driver is
    haltpoll, how long it polls before it halts. A core that halts at once (0 ns) must be woken by the
    host, and every hop between processes on two idle cores pays for that (bench/README.md, session 18)."""
    base = SYS / "devices/system/cpu/cpuidle"
    driver = _read(base / "current_driver") or "none"
    governor = _read(base / "current_governor_ro") or _read(base / "current_governor")
    described = f"{driver} ({governor})" if governor else driver
    poll_ns = _read(SYS / "module/haltpoll/parameters/guest_halt_poll_ns")
    if driver == "haltpoll" and poll_ns is not None:
        described += f", guest halt poll {poll_ns} ns"
    return described


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


TCP_TIME_WAIT = "06"  # the st column of /proc/net/tcp


def time_wait_by_port(ports: dict[str, int]) -> dict[str, int]:
    """Count loopback TCP sockets in TIME_WAIT with either end on each named port (IPv4 only)."""
    wanted = {f"{port:04X}": name for name, port in ports.items()}
    counts = dict.fromkeys(ports, 0)
    try:
        lines = (PROC / "net" / "tcp").read_text().splitlines()[1:]
    except OSError:
        return counts
    for line in lines:
        fields = line.split()
        if len(fields) < 4 or fields[3] != TCP_TIME_WAIT:
            continue
        for end in (fields[1], fields[2]):
            name = wanted.get(end.rsplit(":", 1)[-1])
            if name is not None:
                counts[name] += 1
                break
    return counts
