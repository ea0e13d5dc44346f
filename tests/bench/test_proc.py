"""What the harness reads from /proc about waiting for a core and about the gateway's core."""

from __future__ import annotations

import os

from bench import proc
from bench.scenarios import _core_share


def test_a_process_wait_for_a_core_is_read_from_its_schedstat(tmp_path, monkeypatch):
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "schedstat").write_text("9000000000 1500000000 321\n")  # ran 9 s, waited 1.5 s
    monkeypatch.setattr(proc, "PROC", tmp_path)
    assert proc.run_delay_seconds(42) == 1.5
    assert proc.run_delay_seconds(43) is None  # gone


def test_the_harness_reads_its_own_wait_on_this_kernel():
    waited = proc.run_delay_seconds("self")
    assert waited is not None
    assert waited >= 0


def test_a_cores_busy_and_stolen_time_are_read_from_proc_stat(tmp_path, monkeypatch):
    ticks = os.sysconf("SC_CLK_TCK")
    (tmp_path / "stat").write_text(
        f"cpu  9 9 9 9 9 9 9 9 0 0\n"
        f"cpu0 1 1 1 1 1 1 1 1 0 0\n"
        f"cpu1 {4 * ticks} {ticks} {2 * ticks} {50 * ticks} {ticks} {ticks} {ticks} {3 * ticks} 0 0\n"
    )
    monkeypatch.setattr(proc, "PROC", tmp_path)
    assert proc.core_seconds(1) == (9.0, 3.0)  # user, nice, system, irq, softirq; idle and iowait are not
    assert proc.core_seconds(2) is None


def test_the_gateway_cores_others_are_what_the_harness_processes_pinned_there_did_not_use():
    share = _core_share((10.0, 1.0), (12.0, 1.1), 4.0, {"gateway": 30.0, "bare": 0.5, "fast": 90.0})
    assert share == {"others": 19.5, "steal": 2.5}  # 50 % busy; fast runs on the other core
    assert _core_share(None, (1.0, 0.0), 4.0, {}) == {}  # unpinned: nothing to say
    cpu: dict[str, float | None] = {"gateway": 30.0, "bare": 0.5, "redis": 6.0}
    assert _core_share((10.0, 1.0), (12.0, 1.1), 4.0, cpu, ("gateway", "bare", "redis"))["others"] == 13.5


def test_how_an_idle_core_waits_is_read_from_sys(tmp_path, monkeypatch):
    monkeypatch.setattr(proc, "SYS", tmp_path)
    assert proc.cpu_idle() == "none"  # no cpuidle at all (some containers)
    cpuidle = tmp_path / "devices/system/cpu/cpuidle"
    cpuidle.mkdir(parents=True)
    (cpuidle / "current_driver").write_text("intel_idle\n")
    (cpuidle / "current_governor_ro").write_text("menu\n")
    assert proc.cpu_idle() == "intel_idle (menu)"
    (cpuidle / "current_driver").write_text("haltpoll\n")
    (cpuidle / "current_governor_ro").write_text("haltpoll\n")
    assert proc.cpu_idle() == "haltpoll (haltpoll)"  # the module's parameters not readable
    parameters = tmp_path / "module/haltpoll/parameters"
    parameters.mkdir(parents=True)
    (parameters / "guest_halt_poll_ns").write_text("0\n")
    assert proc.cpu_idle() == "haltpoll (haltpoll), guest halt poll 0 ns"
    (cpuidle / "current_driver").write_text("intel_idle\n")
    (cpuidle / "current_governor_ro").unlink()
    (cpuidle / "current_governor").write_text("menu\n")  # kernels before 5.x have only this one
    assert proc.cpu_idle() == "intel_idle (menu)"  # the module loaded but not the driver: not said
