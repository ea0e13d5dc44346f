"""The instruction counter (``bench.instructions``): its arithmetic, and a short real run under callgrind so
it cannot rot. Only that it counted, and that the gateway does more than the bare proxy, is asserted: the
figures themselves are the benchmark's to report, not a test's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench import instructions
from bench.instructions import CountError, dump_total, per_request, summary
from bench.proc import alive
from bench.spawn import on_sigterm

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300  # Django starts under valgrind: ~30 s alone on a slow VM, more beside another test worker


def test_dump_total_reads_the_totals_line(tmp_path: Path) -> None:
    dump = tmp_path / "callgrind.1.out.1"
    dump.write_text(
        "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nsummary: 12\nfn=(1) x\n3 4\ntotals: 1234\n"
    )
    assert dump_total(dump) == 1234


def test_dump_total_falls_back_to_the_summary_line(tmp_path: Path) -> None:
    dump = tmp_path / "callgrind.1.out.1"
    dump.write_text("events: Ir\nsummary: 567\n")
    assert dump_total(dump) == 567


def test_a_dump_without_a_count_is_an_error(tmp_path: Path) -> None:
    dump = tmp_path / "callgrind.1.out.1"
    dump.write_text("events: Ir\n")
    with pytest.raises(CountError):
        dump_total(dump)


def test_per_request_is_the_difference_over_the_difference() -> None:
    # a fixed 1,000 in both windows (starting and ending one) cancels out
    assert per_request(1_000 + 100 * 7, 1_000 + 500 * 7, 100, 500) == 7
    with pytest.raises(ValueError, match="more requests"):
        per_request(1, 2, 5, 5)


def test_summary_takes_net_medians_and_what_the_gateway_adds() -> None:
    def m(case: str, target: str, net: int) -> dict[str, object]:
        return {"case": case, "target": target, "per_request_net": net, "per_request": net + 10}

    rows = summary(
        [
            m("chat_1", "gateway", 1_100),
            m("chat_1", "bare", 500),
            m("chat_1", "gateway", 1_000),
            m("chat_1", "bare", 520),
            m("chat_1", "gateway", 1_300),
            m("stream_1", "gateway", 9),  # no bare figure: no row
        ]
    )
    assert [row["case"] for row in rows] == ["chat_1"]
    assert rows[0]["gateway"] == 1_100
    assert rows[0]["bare"] == 510
    assert rows[0]["added"] == 590
    assert rows[0]["rounds"] == {"gateway": [1_100, 1_000, 1_300], "bare": [500, 520]}
    assert rows[0]["plain"] == {"gateway": 1_110, "bare": 520}


def test_arguments_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        instructions.parse_args(["--cases", "chat_1,nope"])
    with pytest.raises(SystemExit):
        instructions.parse_args(["--small", "10", "--large", "10"])
    assert instructions.parse_args(["--cases", "paced_1, chat_32"]).cases == ["paced_1", "chat_32"]


def test_servers_run_with_counting_off_until_asked(tmp_path: Path) -> None:
    prefix = instructions.callgrind_prefix(tmp_path)
    assert "--tool=callgrind" in prefix
    assert "--instr-atstart=no" in prefix
    assert f"--callgrind-out-file={tmp_path}/callgrind.%p.out" in prefix


@pytest.mark.e2e
def test_a_short_count_runs_and_leaves_nothing_behind(tmp_path: Path) -> None:
    out = tmp_path / "instructions.json"
    argv = [sys.executable, "-m", "bench.instructions", "--small", "10", "--large", "40", "--rounds", "1"]
    argv += ["--cases", "chat_1,stream_1", "--idle", "0.5", "--json-out", str(out)]
    argv += ["--db-name", f"bench_instr_smoke_{os.getpid()}"]
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        raw, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.terminate()  # SIGTERM: it stops the stack it started (its servers have sessions of their own)
        raw, _ = process.communicate(timeout=60)
        pytest.fail(f"the count took longer than {TIMEOUT_S} s:\n{raw.decode(errors='replace')}")
    output = raw.decode(errors="replace")
    assert process.returncode == 0, output
    result = json.loads(out.read_text())
    assert [(m["case"], m["target"]) for m in result["measurements"]] == [
        ("chat_1", "gateway"),
        ("chat_1", "bare"),
        ("stream_1", "gateway"),
        ("stream_1", "bare"),
    ]
    assert result["idle_per_s"]["gateway"] > 0
    for m in result["measurements"]:
        assert m["requests"] == [10, 40]
        assert 0 < m["instructions"][0] < m["instructions"][1], m
        # wall-clock time under valgrind on a shared machine: present, not ordered (40 requests can take
        # less time than 10 when the other xdist worker is busy during the first window)
        assert all(s > 0 for s in m["seconds"]), m
    for row in result["summary"]:
        # the gateway verifies, validates, admits and meters; the bare proxy only relays
        assert row["gateway"] > row["bare"] > 0, row
    assert result["leftover_pids"] == []
    assert not any(alive(pid) for pid in result["pids"])
    assert "instructions per request" in output


def test_a_second_sigterm_cannot_cut_the_stop_short() -> None:
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as stopping:
            on_sigterm(signal.SIGTERM, None)
        assert stopping.value.code == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # while the stack's processes are stopped
    finally:
        signal.signal(signal.SIGTERM, before)
