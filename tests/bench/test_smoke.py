"""The benchmark harness cannot rot: its --quick smoke runs every scenario and leaves nothing behind.

Only that it ran and produced sane numbers is asserted, never a timing target (timings on shared
machines are noise). The harness manages its own PostgreSQL database and Redis database.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.proc import alive
from bench.scenarios import SCENARIOS

pytestmark = [pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240  # the quick run takes ~45 s alone on a slow VM, more beside the other test worker


def run_quick_bench(out: Path) -> tuple[int, str]:
    process = subprocess.Popen(
        # a database of its own (and its own Redis, as every run has), so neither a developer's benchmark
        # on the same machine nor another test worker's smoke is dropped or flushed under it
        [
            sys.executable,
            "-m",
            "bench.run",
            "--quick",
            "--json-out",
            str(out),
            "--db-name",
            f"bench_smoke_{os.getpid()}",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.terminate()  # SIGTERM: the harness stops everything it started before it exits
        output, _ = process.communicate(timeout=60)
        pytest.fail(f"the quick benchmark took longer than {TIMEOUT_S} s:\n{output.decode(errors='replace')}")
    return process.returncode, output.decode(errors="replace")


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    status, output = run_quick_bench(out)
    assert status == 0, output
    return json.loads(out.read_text()), output


def test_every_scenario_ran_against_every_target_with_positive_numbers(quick):
    result, output = quick
    summary = result["summary"]
    assert set(summary) == {s.key for s in SCENARIOS}, output
    for scenario in SCENARIOS:
        expected = {"direct", "bare", "gateway"} if scenario.direct else {"gateway"}
        assert set(summary[scenario.key]) == expected, scenario.key
        for target, figures in summary[scenario.key].items():
            keys = (
                ["cold_us", "cached_us", "sign_us", "rs256_cold_us", "rs256_cached_us", "rs256_sign_us"]
                if scenario.kind == "jwt"
                else ["rps", "p50_ms", "p99_ms", "succeeded"]
            )
            if scenario.stream:
                keys += ["ttft_p50_ms", "ttft_p99_ms"]
            for key in keys:
                assert figures[key] > 0, (scenario.key, target, key, figures)


def test_paced_streams_keep_their_spacing_fields_and_the_gateway_memory_is_read(quick):
    summary = quick[0]["summary"]
    for target in ("direct", "bare", "gateway"):
        assert summary["paced_32"][target]["gap_p50_ms"] > 0
    held = summary["paced_1000"]["gateway"]
    assert held["rss_peak_mib"] > 0
    assert held["in_flight_peak"] == held["clients"]


def test_every_load_measurement_says_how_long_its_processes_waited_for_a_core(quick):
    result, output = quick
    for m in result["measurements"]:
        if m["scenario"] in {s.key for s in SCENARIOS if s.kind != "jwt"}:
            waited = m["core_wait_ms_per_s"]
            assert waited["loadgen"] is not None, (m["scenario"], m["target"])
            assert waited[m["target"] if m["target"] != "direct" else "fast"] is not None
            assert waited["gateway"] >= 0
    assert "ms per second each process waited, runnable, for a core" in output


def test_nothing_was_dropped_and_every_request_was_metered(quick):
    result = quick[0]
    assert result["dropped"] == 0
    assert result["failures"] == {}
    metering = result["metering"]
    assert metering["requests_sent_to_gateway"] > 0
    assert metering["appended"] >= metering["requests_sent_to_gateway"]
    assert metering["usage_rows"] >= metering["requests_sent_to_gateway"]  # every request, stored


def test_the_worker_ingested_between_the_measurements_not_during_them(quick):
    result, output = quick
    metering = result["metering"]
    assert metering["ingest"] == "between measurements"
    # A measurement's records waited in the stream for the drain before the next one; a worker that ingested
    # during the windows would have left next to nothing there.
    waited = metering["drained_between"] + metering["backlog_at_end"]
    assert waited > metering["requests_sent_to_gateway"] / 2
    assert f"the worker drained {metering['drained_between']:,} records" in output


def test_the_table_was_printed_with_a_verdict_for_every_target(quick):
    result, output = quick
    assert "gw/direct" in output
    assert "gw-bare" in output  # the floor is printed next to the gateway
    verdicts = {row["verdict"] for row in result["rows"]}
    assert verdicts <= {"PASS", "MISS", "report"}
    assert sum(row["verdict"] != "report" for row in result["rows"]) >= 8


def test_the_harness_ran_its_own_redis_and_measured_its_share_of_each_request(quick):
    result, output = quick
    assert "the harness's Redis" in result["machine"]["note"]
    for scenario in ("chat_32", "stream_16"):
        assert result["summary"][scenario]["gateway"]["redis_cpu_us"] > 0, scenario
    assert "Redis CPU per request (us)" in output


def test_no_process_the_harness_started_is_left_running(quick):
    result = quick[0]
    assert len(result["pids"]) >= 6  # two fakes, the gateway, the bare proxy, the worker, Redis
    assert result["leftover_pids"] == []
    assert [pid for pid in result["pids"] if alive(pid)] == []


def test_the_micro_benchmark_of_the_transport_and_redis_choices_runs():
    from django.conf import settings

    done = subprocess.run(
        [sys.executable, "-m", "bench.micro", "--calls", "200", "--redis-url", settings.REDIS_URL],
        cwd=ROOT,
        capture_output=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    rows = ("aiohttp.ClientSession", "gateway.http1.HttpClient", "redis-py evalsha", "pack: hiredis")
    for row in (*rows, "redis-py pipeline of 8"):
        line = next(line for line in out.splitlines() if line.startswith(row))
        assert float(line.split()[-1]) > 0  # a figure was measured, not left blank
