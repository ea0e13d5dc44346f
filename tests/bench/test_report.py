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
