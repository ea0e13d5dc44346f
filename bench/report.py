"""Turn measurements into medians, check them against the targets of issue 7, and print the table.

Each figure is the median over runs, except counts of dropped or failed requests (summed over runs, so one
drop anywhere shows) and the gateway's peak resident memory (the largest of the runs). A target is marked
PASS or MISS from those figures; "report" rows have no target.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench import proc
from bench.scenarios import SCENARIOS
from bench.stats import median_of

SUMMED = frozenset({"dropped", "failed", "started", "succeeded"})
MAXED = frozenset({"rss_peak_mib", "in_flight_peak"})
CPU_NAMES = ("gateway", "bare", "fast", "paced", "worker", "redis", "loadgen")
PROXIES = ("gateway", "bare")  # the targets whose own process serves the request: CPU per unit is theirs
NESTED = ("cpu_pct", "tcp_closed_per_request", "core_wait_ms_per_s", "gateway_core_pct")

REFERENCE_SLOW = 0.8  # a ratio to the reference machine below which the report says the machine is slow
Rule = Callable[[float | None, float | None, dict[str, Any]], bool | None]


def _added_at_most(limit: float) -> Rule:
    return lambda d, g, _: None if d is None or g is None else g - d <= limit


def _at_least(limit: float) -> Rule:
    return lambda _d, g, _: None if g is None else g >= limit


def _at_most(limit: float) -> Rule:
    return lambda _d, g, _: None if g is None else g <= limit


def _within_of_direct(limit: float) -> Rule:
    return lambda d, g, _: None if d is None or g is None else abs(g - d) <= limit


def _all_held(_d: float | None, g: float | None, gateway: dict[str, Any]) -> bool | None:
    return None if g is None else g >= gateway.get("clients", 0)


@dataclass(frozen=True)
class Check:
    """One row of the table: a metric of a scenario and its target."""

    scenario: str
    label: str
    key: str
    target: str
    rule: Rule | None = None
    added: bool = False


CHECKS: tuple[Check, ...] = (
    Check("chat_1", "latency p50 (ms)", "p50_ms", "<= +1.0 ms added", _added_at_most(1.0), added=True),
    Check("chat_1", "latency p99 (ms)", "p99_ms", "<= +2.0 ms added", _added_at_most(2.0), added=True),
    Check("chat_32", "requests/s", "rps", ">= 3,000/s", _at_least(3000)),
    Check("chat_32", "latency p99 (ms)", "p99_ms", "<= 25 ms", _at_most(25.0)),
    Check("chat_32", "gateway CPU per request (us)", "gateway_cpu_us", "report"),
    Check("chat_32", "Redis CPU per request (us)", "redis_cpu_us", "report"),
    Check("stream_16", "streams/s", "rps", ">= 1,500/s", _at_least(1500)),
    Check("stream_16", "stream latency p99 (ms)", "p99_ms", "report"),
    Check("stream_16", "gateway CPU per stream (us)", "gateway_cpu_us", "report"),
    Check("stream_16", "Redis CPU per stream (us)", "redis_cpu_us", "report"),
    Check("paced_32", "TTFT p50 (ms)", "ttft_p50_ms", "report", added=True),
    Check("paced_32", "TTFT p99 (ms)", "ttft_p99_ms", "<= +2.0 ms added", _added_at_most(2.0), added=True),
    Check(
        "paced_32", "chunk gap p50 (ms)", "gap_p50_ms", "direct +/- 1 ms", _within_of_direct(1.0), added=True
    ),
    Check("paced_32", "chunk gap p99 (ms)", "gap_p99_ms", "report", added=True),
    Check("paced_1", "TTFT p50 (ms)", "ttft_p50_ms", "report", added=True),
    Check("paced_1", "TTFT p99 (ms)", "ttft_p99_ms", "report", added=True),
    Check("paced_1000", "streams dropped (all runs)", "dropped", "0", _at_most(0)),
    Check("paced_1000", "streams completed (all runs)", "succeeded", "report"),
    Check("paced_1000", "streams in flight, peak", "in_flight_peak", "all clients held", _all_held),
    Check("paced_1000", "gateway RSS peak (MiB)", "rss_peak_mib", "report"),
    Check("paced_1000", "streams/s", "rps", "report"),
    Check("paced_1000", "TTFT p99 (ms)", "ttft_p99_ms", "report"),
    Check("paced_1000", "chunk gap p50 (ms)", "gap_p50_ms", "report"),
    Check("paced_1000", "chunk gap p99 (ms)", "gap_p99_ms", "report"),
    Check("token", "tokens/s", "rps", ">= 500/s", _at_least(500)),
    Check("token", "latency p99 (ms)", "p99_ms", "report"),
    Check("token", "server CPU per token (us)", "gateway_cpu_us", "report"),
    Check("jwt", "ES256 verify, cold (us)", "cold_us", "report"),
    Check("jwt", "ES256 verify, cached (us)", "cached_us", "report"),
    Check("jwt", "ES256 sign (us)", "sign_us", "report"),
    Check("jwt", "RS256 verify, cold (us)", "rs256_cold_us", "report"),
    Check("jwt", "RS256 verify, cached (us)", "rs256_cached_us", "report"),
    Check("jwt", "RS256 sign (us)", "rs256_sign_us", "report"),
)


# The table of where the bar is, measured on its reference machine: the fake upstream direct and a
# bare Python proxy with an aiohttp client (ours is one). A run's own figures against these say how this
# machine compares, so a reader can tell a slow machine from a slow gateway. The verdicts stay absolute.
REFERENCE: tuple[tuple[str, str, str, float], ...] = (
    ("chat_32", "direct", "requests/s", 15_000),
    ("chat_32", "bare", "requests/s", 8_800),
    ("stream_16", "direct", "streams/s", 3_200),
    ("stream_16", "bare", "streams/s", 3_360),
)


def against_reference(summary: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Return this run's direct and bare throughput beside the issue's reference machine's, with the ratio."""
    compared = []
    for scenario, target, unit, reference in REFERENCE:
        measured = summary.get(scenario, {}).get(target, {}).get("rps")
        if measured is not None:
            compared.append(
                {
                    "scenario": scenario,
                    "target": target,
                    "unit": unit,
                    "reference": reference,
                    "measured": measured,
                    "ratio": round(measured / reference, 2),
                }
            )
    return compared


def machine_info(
    cores: list[int], *, own_redis: bool = True, redis_on_gateway_core: bool = False
) -> dict[str, Any]:
    """Describe the machine the numbers come from, and the cores used (empty: unpinned)."""
    if not cores:
        note = "UNPINNED (fewer than 2 cores, or --no-pin): every process shares the machine"
    else:
        with_gateway = own_redis and redis_on_gateway_core
        pinned = "gateway, bare proxy and the harness's Redis" if with_gateway else "gateway and bare proxy"
        shared = (
            "fakes, worker, the harness's Redis and"
            if own_redis and not with_gateway
            else "fakes, worker and"
        )
        unpinned = "PostgreSQL" if own_redis else "PostgreSQL and the Redis of --redis-url"
        note = (
            f"{pinned} pinned to core {cores[1]}; {shared} load generator to core {cores[0]}; "
            f"{unpinned} unpinned"
        )
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cores": cores,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "cpu_model": proc.cpu_model(),
        "cpu_idle": proc.cpu_idle(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pinned": bool(cores),
        "note": note,
    }


def aggregate(measurements: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Return {scenario: {target: {metric: median (or sum, or max)}}} over the runs."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for m in measurements:
        grouped.setdefault((m["scenario"], m["target"]), []).append(m)
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for (scenario, target), runs in grouped.items():
        keys = {
            k for m in runs for k, v in m.items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
        figures: dict[str, Any] = {"runs": len(runs)}
        for key in sorted(keys):
            values = [m.get(key) for m in runs]
            present = [v for v in values if v is not None]
            if key in SUMMED:
                figures[key] = sum(present)
            elif key in MAXED:
                figures[key] = max(present) if present else None
            else:
                figures[key] = median_of(values)
        # The proxy's CPU per request (or stream, or token) in µs: steadier than throughput on a host whose
        # speed drifts, and comparable between runs that used the core differently. The key keeps its name
        # for the bare proxy, whose figure is its own process's.
        per_unit = _cpu_per_unit(runs, target)
        if per_unit and target in PROXIES:
            figures["gateway_cpu_us"] = median_of(per_unit)
        # Redis's share of each request (the Lua reservation, the settlement, the usage hand-off), where
        # the harness started the Redis and so measures it alone.
        redis_per_unit = _cpu_per_unit(runs, "redis")
        if redis_per_unit and target == "gateway":
            figures["redis_cpu_us"] = median_of(redis_per_unit)
        for nested in NESTED:
            names = {name for m in runs for name in m.get(nested) or {}}
            figures[nested] = {
                n: median_of([(m.get(nested) or {}).get(n) for m in runs]) for n in sorted(names)
            }
        summary.setdefault(scenario, {})[target] = figures
    return summary


def _cpu_per_unit(runs: list[dict[str, Any]], name: str) -> list[float]:
    """A process's CPU per request (or stream, or token) in µs, one figure for each run that has it."""
    return [
        round(1e4 * m["cpu_pct"][name] / m["rps"], 1)
        for m in runs
        if m.get("rps") and (m.get("cpu_pct") or {}).get(name) is not None
    ]


def rows(summary: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Return the table rows: direct, bare and gateway figures, ratio, added (to direct and to the bare
    proxy's figure), target and verdict. Verdicts compare the gateway with direct, as the issue does."""
    table = []
    for check in CHECKS:
        if check.scenario not in summary:
            continue
        direct = summary[check.scenario].get("direct", {})
        gateway = summary[check.scenario].get("gateway", {})
        d, g = direct.get(check.key), gateway.get(check.key)
        b = summary[check.scenario].get("bare", {}).get(check.key)
        if check.rule is None and d is None and g is None and b is None:
            continue  # a figure this run could not take (Redis's CPU when the Redis is not the harness's)
        verdict = check.rule(d, g, gateway) if check.rule is not None else None
        table.append(
            {
                "scenario": check.scenario,
                "metric": check.label,
                "direct": d,
                "bare": b,
                "gateway": g,
                "ratio": round(g / d, 2) if d and g is not None else None,
                "added": round(g - d, 3) if check.added and d is not None and g is not None else None,
                "over_bare": round(g - b, 3) if check.added and b is not None and g is not None else None,
                "target": check.target,
                "verdict": "report" if check.rule is None else ("PASS" if verdict else "MISS"),
            }
        )
    return table


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3f}".rstrip("0").rstrip(".") if abs(value) < 10 else f"{value:.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _print_grid(header: list[str], lines: list[list[str]]) -> None:
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines, strict=True)]
    for line in [header, ["-" * w for w in widths], *lines]:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


def print_report(result: dict[str, Any]) -> None:
    """Print the machine, the table of medians against the targets, CPU use, metering and failures."""
    machine = result["machine"]
    print(
        f"\nmachine: {machine['nproc']} cores, {machine['cpu_model']}, Linux {machine['kernel']}, "
        f"Python {machine['python']}; idle cores: {machine.get('cpu_idle', 'not read')}; {machine['note']}"
    )
    load = result["machine"].get("load_average_at_start")
    print(f"load average (1, 5, 15 min) at start {load}, at end {result.get('load_average_at_end')}")
    plan = result["plan"]
    print(
        f"plan: {plan['runs']} run(s), {plan['warmup_s']} s warm-up + {plan['duration_s']} s window each"
        + (" (--quick smoke: the verdicts mean nothing)" if plan["quick"] else "")
        + f"; access tokens {result.get('access_token_alg', 'RS256')}"
        + (
            f"; Redis reply wait {result['redis_reply_wait_us']} µs"
            if result.get("redis_reply_wait_us") is not None
            else ""
        )
    )
    titles = {s.key: f"{s.number} {s.title}" for s in SCENARIOS}
    with_bare = any(row.get("bare") is not None for row in result["rows"])
    header = ["scenario", "metric", "direct", "gateway", "gw/direct", "added", "target", "result"]
    if with_bare:
        header[3:3] = ["bare"]
        header[7:7] = ["gw-bare"]
    lines, last = [], ""
    for row in result["rows"]:
        title = titles[row["scenario"]] if row["scenario"] != last else ""
        last = row["scenario"]
        line = [
            title,
            row["metric"],
            _fmt(row["direct"]),
            _fmt(row["gateway"]),
            _fmt(row["ratio"]),
            _fmt(row["added"]),
            row["target"],
            row["verdict"],
        ]
        if with_bare:
            line[3:3] = [_fmt(row.get("bare"))]
            line[7:7] = [_fmt(row.get("over_bare"))]
        lines.append(line)
    print()
    _print_grid(header, lines)
    if with_bare:
        print(
            "(bare: the same requests through a bare proxy on the gateway's core, no auth, aiohttp client;"
            "\n gw-bare: what the gateway adds beyond crossing one more process)"
        )
    _print_reference(result.get("reference") or [])
    _print_cpu(result["summary"], titles)
    _print_footer(result)


def _print_reference(compared: list[dict[str, Any]]) -> None:
    if not compared:
        return
    print(
        "\nthis machine against the issue's reference machine: "
        + "; ".join(
            f"{c['scenario']} {c['target']} {_fmt(c['measured'])} {c['unit']} = {c['ratio']:.2f}x "
            f"of {_fmt(c['reference'])}"
            for c in compared
        )
    )
    # The bare proxy is the same kind of process as the gateway, on the same core: its ratio says whether
    # the gateway's core is as fast as the reference's. Direct measures core 0's fake and load generator.
    bare = [c["ratio"] for c in compared if c["target"] == "bare"]
    if bare and min(bare) < REFERENCE_SLOW:
        print(
            "(well below the reference: the absolute targets ask more of this machine than of the one they"
            "\n were set on; read the gw-bare column, and re-measure on a faster machine; verdicts are not"
            "\n rescaled)"
        )
    elif min(c["ratio"] for c in compared) < REFERENCE_SLOW:
        print(
            "(the bare proxy, a process like the gateway on its core, is near the reference: the targets"
            "\n bear on this machine; the direct figures, core 0's fake and load generator, are below it)"
        )


def _print_cpu(summary: dict[str, dict[str, dict[str, Any]]], titles: dict[str, str]) -> None:
    print(
        "\nCPU during the window in % of one core, and TCP connections closed per request on each fake's"
        "\nport (about 1: a new upstream connection for every request); medians:"
    )
    measured = {
        name for targets in summary.values() for f in targets.values() for name in f.get("cpu_pct") or {}
    }
    names = [name for name in CPU_NAMES if name in measured]  # no bare column when it did not run
    lines = []
    for scenario, targets in summary.items():
        for target, figures in targets.items():
            cpu = figures.get("cpu_pct") or {}
            closed = figures.get("tcp_closed_per_request") or {}
            if cpu:
                lines.append(
                    [titles[scenario], target, *(_fmt(cpu.get(name)) for name in names)]
                    + [_fmt(closed.get("fast")), _fmt(closed.get("paced"))]
                )
    _print_grid(["scenario", "target", *names, "conns/req m1", "conns/req m2"], lines)
    _print_waits(summary, titles, names)


def _print_waits(
    summary: dict[str, dict[str, dict[str, Any]]], titles: dict[str, str], names: list[str]
) -> None:
    """The machine's share of each figure: how long each process waited, runnable, for a core (ms per
    second of the window), and how much of the gateway's core went to processes the harness did not
    start (Redis, PostgreSQL, kernel threads, the host's other services) or to the hypervisor (steal)."""
    lines = []
    for scenario, targets in summary.items():
        for target, figures in targets.items():
            waited = figures.get("core_wait_ms_per_s") or {}
            core = figures.get("gateway_core_pct") or {}
            if waited or core:
                lines.append(
                    [titles[scenario], target, _fmt(core.get("others")), _fmt(core.get("steal"))]
                    + [_fmt(waited.get(name)) for name in names]
                )
    if not lines:
        return
    print(
        "\nThe machine's share, medians: % of the gateway's core taken by processes the harness did not start"
        "\n(others) and by the hypervisor (steal); ms per second each process waited, runnable, for a core:"
    )
    _print_grid(["scenario", "target", "core: others", "core: steal", *(f"wait {n}" for n in names)], lines)


def _print_footer(result: dict[str, Any]) -> None:
    metering = result.get("metering") or {}
    if metering:
        drained = metering.get("drained_between", 0)
        print(
            f"\nmetering (ingest {metering.get('ingest', 'none')}): "
            f"{metering.get('requests_sent_to_gateway', 0):,} gateway requests sent; "
            f"{metering.get('appended', 0):,} entries appended to the audit stream; backlog at the end "
            f"{metering.get('backlog_at_end', 0):,}, after waiting {metering.get('drain_wait_s', 0)} s "
            f"{metering.get('backlog_after_drain', 0):,}; "
            f"{_fmt(metering.get('usage_rows'))} usage rows stored"
        )
        if drained and metering.get("ingest") == "between measurements":
            waited = metering.get("drained_between_s", 0)
            print(
                f"the worker drained {drained:,} records before the measurements that followed them, in "
                f"{waited} s of waiting ({_fmt(round(drained / waited) if waited else None)} a second, "
                "the wait for its next run included)"
            )
    failures = result.get("failures") or {}
    print(
        "failures: " + (", ".join(f"{k}: {v}" for k, v in sorted(failures.items())) if failures else "none")
    )
    if result.get("profile"):
        _print_profile(result["profile"])
    print(f"\nJSON: {result.get('json_path', '-')}")


def _print_profile(profile: dict[str, Any]) -> None:
    measured = profile.get("measurement", {})
    print(
        f"\nprofile of the gateway's event loop under {measured.get('scenario', '?')} "
        f"({profile['samples']:,} samples, {measured.get('rps')} requests/s while profiled; "
        f"{profile.get('other_thread_samples', 0):,} samples of "
        "other threads left out):"
    )
    for title, key in (
        ("own time by function", "top"),
        ("own time by package", "by_package"),
        ("project functions, inclusive", "project_inclusive"),
    ):
        print(f"  {title}:")
        for entry in profile[key]:
            print(f"    {entry['share_pct']:5.1f}%  {entry['frame']}")
