"""The end-to-end tests' process handling: a stopped process takes what it started with it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tests.e2e.conftest import stop

# A parent that ignores SIGTERM (as a worker still finishing a task does, until it is killed) and has
# started a child of its own (as a worker with an embedded beat has); it prints the child's pid.
PARENT = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as status:
            return "\nState:\tZ" not in status.read()
    except FileNotFoundError:
        return False


def test_a_process_killed_after_the_timeout_takes_its_children_when_it_leads_its_own_session():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, start_new_session=True)
    parent.own_session = True  # type: ignore[attr-defined]
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert _alive(child)
    stop(parent, timeout=0.5)
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)
    parent.stdout.close()
    assert os.getpgid(os.getpid()) != parent.pid  # the test's own group was never the target
