"""The benchmark's printed report."""

from __future__ import annotations

from bench import report


def test_the_profile_is_titled_with_the_scenario_it_measured(capsys):
    entry = {"share_pct": 50.0, "frame": "StreamRelay._pump (gateway/streaming.py)"}
    profile = {
        "samples": 1200,
        "other_thread_samples": 3,
        "measurement": {"scenario": "paced_32", "rps": 204.6},
        "top": [entry],
        "by_package": [{"share_pct": 50.0, "frame": "gateway"}],
        "project_inclusive": [entry],
    }
    report._print_profile(profile)
    title = capsys.readouterr().out.strip().splitlines()[0]
    assert title.startswith("profile of the gateway's event loop under paced_32 (1,200 samples")
    assert "204.6 requests/s" in title


def _summary(direct: float, bare: float) -> dict:
    return {"chat_32": {"direct": {"rps": direct}, "bare": {"rps": bare}, "gateway": {"rps": 1.0}}}


def test_the_run_is_set_beside_the_issues_reference_machine():
    compared = report.against_reference(_summary(5043.4, 2461.0))
    assert [(c["target"], c["reference"], c["ratio"]) for c in compared] == [
        ("direct", 15_000, 0.34),
        ("bare", 8_800, 0.28),
    ]  # stream_16 did not run: no row for it


def test_a_machine_well_below_the_reference_is_said_to_be_slow_and_a_fast_one_is_not(capsys):
    report._print_reference(report.against_reference(_summary(5043.4, 2461.0)))
    slow = capsys.readouterr().out
    assert "chat_32 direct 5,043 requests/s = 0.34x of 15,000" in slow
    assert "verdicts are not\n rescaled" in slow
    report._print_reference(report.against_reference(_summary(15_500.0, 9_000.0)))
    fast = capsys.readouterr().out
    assert "= 1.03x" in fast
    assert "well below" not in fast
    assert "direct figures" not in fast


def test_a_slow_direct_baseline_with_a_bare_proxy_near_the_reference_is_not_a_slow_machine(capsys):
    # 2026-11-26, an AMD EPYC VM: the Python fake and load generator on core 0 at 0.74x the reference's
    # direct figure, the bare proxy on the gateway's core at 0.94x its figure
    report._print_reference(report.against_reference(_summary(11_060.0, 8_265.0)))
    printed = capsys.readouterr().out
    assert "well below" not in printed
    assert "the targets\n bear on this machine" in printed


def test_the_machines_share_is_printed_beside_each_measurement_that_has_it(capsys):
    summary = {
        "chat_1": {
            "direct": {"core_wait_ms_per_s": {"fast": 384.1, "loadgen": 83.3}},
            "gateway": {
                "core_wait_ms_per_s": {"gateway": 23.6, "fast": 23.1, "loadgen": 20.3},
                "gateway_core_pct": {"others": 4.7, "steal": 0.2},
            },
        },
    }
    report._print_waits(summary, {"chat_1": "1 chat"}, ["gateway", "fast", "loadgen"])
    lines = capsys.readouterr().out.splitlines()
    assert "wait gateway" in lines[3]
    assert lines[5].split() == ["1", "chat", "direct", "-", "-", "-", "384.1", "83.3"]
    assert lines[6].split() == ["1", "chat", "gateway", "4.7", "0.2", "23.6", "23.1", "20.3"]


def test_no_table_of_the_machines_share_when_no_measurement_has_it(capsys):
    report._print_waits({"jwt": {"gateway": {"rps": 1.0}}}, {"jwt": "7 jwt"}, ["gateway"])
    assert capsys.readouterr().out == ""
