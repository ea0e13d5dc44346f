"""Run the benchmark: ``python -m bench.run [--quick] [--runs N] [--duration S] [--scenarios a,b]``.

Starts the stack (``bench.stack``), measures every selected scenario directly, through the bare proxy and
through the gateway, run after run with the order reversed every other run, prints the table of medians
against the targets and writes everything to ``bench/results/<UTC timestamp>.json`` (git-ignored). Exits 0
when the benchmark ran (missed targets are reported, not failed), 1 when requests were dropped or a process
outlived it, and 2 when the stack could not be started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Coroutine
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvloop

from bench.profile import py_spy_path, py_spy_start, summarize
from bench.report import against_reference, aggregate, machine_info, print_report, rows
from bench.scenarios import SCENARIOS, Plan, Scenario, measure, scenarios_select
from bench.spawn import RESULTS_DIR, harness_start
from bench.stack import Stack, StackError, StackOptions

logger = logging.getLogger("bench")

PROFILE_MIN_WINDOW_S = 10.0  # enough samples at py-spy's rate to rank the hot spots
Run = Callable[[Coroutine[Any, Any, Any]], Any]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few-second smoke of every code path (CI)")
    parser.add_argument("--runs", type=int, default=None, help="runs per scenario and target (default 3)")
    parser.add_argument(
        "--duration", type=float, default=None, help="measuring window in seconds (default 5)"
    )
    parser.add_argument("--warmup", type=float, default=None, help="discarded warm-up in seconds (default 1)")
    names = ",".join(s.key for s in SCENARIOS)
    parser.add_argument("--scenarios", default=None, help=f"comma-separated keys or numbers of: {names}")
    parser.add_argument("--json-out", type=Path, default=None, help="where to write the JSON results")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="also profile the gateway under one scenario with py-spy and write its collapsed stacks here",
    )
    parser.add_argument(
        "--profile-scenario",
        default="chat_32",
        choices=[s.key for s in SCENARIOS if s.kind != "jwt"],  # jwt runs in the harness, not the gateway
        help="the scenario --profile measures (default chat_32)",
    )
    parser.add_argument(
        "--access-token-alg",
        choices=["ES256", "RS256"],
        default="ES256",
        help="PORTCULLIS_ACCESS_TOKEN_ALG of the server under test (default ES256, the product's default)",
    )
    parser.add_argument(
        "--redis-reply-wait-us",
        type=int,
        default=None,
        help="PORTCULLIS_REDIS_REPLY_WAIT_US of the server under test (default: the product's, 500; 0: off)",
    )
    parser.add_argument("--no-worker", action="store_true", help="do not run the Celery ingest worker")
    parser.add_argument(
        "--ingest-live",
        action="store_true",
        help="let the worker ingest during the measurements too, on core 0 (default: between them)",
    )
    parser.add_argument(
        "--no-bare", action="store_true", help="do not measure the bare proxy (the floor) next to the gateway"
    )
    parser.add_argument("--no-limits", action="store_true", help="give the client a policy with no limits")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument(
        "--db-name", default="portcullis_bench", help="PostgreSQL database to create and drop"
    )
    parser.add_argument(
        "--redis-url",
        help="use this running Redis, unpinned (default: start one on the load generator's core)",
    )
    parser.add_argument("--redis-db", type=int, default=14, help="Redis database number to flush and use")
    parser.add_argument(
        "--redis-on-gateway-core",
        action="store_true",
        help="pin the harness's own Redis to the gateway's core, not the load generator's (an experiment)",
    )
    args = parser.parse_args(argv)
    try:
        args.selected = scenarios_select(args.scenarios)
    except ValueError as exc:
        parser.error(str(exc))
    if args.runs is not None and not 1 <= args.runs <= 50:
        parser.error("--runs must be between 1 and 50")
    for name in ("duration", "warmup"):
        value = getattr(args, name)
        if value is not None and not 0 <= value <= 120:
            parser.error(f"--{name} must be between 0 and 120 seconds")
    return args


def plan_from(args: argparse.Namespace) -> Plan:
    """Return the plan: --quick shrinks windows, runs and clients; explicit options still win."""
    if args.quick:
        # A window that holds whole 160 ms paced streams even while CI's other test worker loads both cores
        # (0.3 s and then 0.5 s each once held none for one target on a slow VM).
        runs, warmup, duration = 1, 0.1, 1.0
    else:
        runs, warmup, duration = 3, 1.0, 5.0
    return Plan(
        runs=args.runs or runs,
        warmup_s=warmup if args.warmup is None else args.warmup,
        duration_s=duration if args.duration is None else args.duration,
        quick=args.quick,
        drain_timeout_s=5.0 if args.quick else 20.0,
    )


def measure_all(run: Run, stack: Stack, plan: Plan, scenarios: list[Scenario]) -> list[dict[str, Any]]:
    """Measure every scenario in every run, alternating which target goes first."""
    measurements = []
    for index in range(plan.runs):
        for scenario in scenarios:
            targets = ["direct", "gateway"] if scenario.direct else ["gateway"]
            if scenario.direct and stack.options.bare:
                targets.insert(1, "bare")
            if index % 2:
                targets.reverse()
            for target in targets:
                m = measure(run, stack, plan, scenario, target)
                m["run"] = index + 1
                measurements.append(m)
                logger.info("run %d/%d %-10s %-7s %s", index + 1, plan.runs, scenario.key, target, _brief(m))
    return measurements


def _brief(m: dict[str, Any]) -> str:
    if "cold_us" in m:
        return (
            f"ES256 cold {m['cold_us']} us, cached {m['cached_us']} us, sign {m['sign_us']} us; RS256 cold "
            f"{m['rs256_cold_us']} us, cached {m['rs256_cached_us']} us, sign {m['rs256_sign_us']} us"
        )
    text = f"{m['rps']}/s p50 {m['p50_ms']} ms p99 {m['p99_ms']} ms"
    if m.get("ttft_p99_ms") is not None:
        text += f" ttft p99 {m['ttft_p99_ms']} ms gap p50/p99 {m['gap_p50_ms']}/{m['gap_p99_ms']} ms"
    return text + f" dropped {m['dropped']} cpu {m.get('cpu_pct')}"


def profile_gateway(run: Run, stack: Stack, plan: Plan, out: Path, key: str) -> dict[str, Any]:
    """Measure one scenario through the gateway once more with py-spy attached; summarise the profile."""
    executable = py_spy_path()
    if executable is None:
        raise StackError("--profile needs py-spy: .venv/bin/pip install py-spy")
    scenario = next(s for s in SCENARIOS if s.key == key)
    plan = replace(plan, duration_s=max(plan.duration_s, PROFILE_MIN_WINDOW_S))
    duration = max(2, round(plan.warmup_s + plan.duration_s))
    pid = stack.service("gateway").process.pid
    on_pool = scenario.kind == "token"  # the OAuth thread pool does this work, not the event loop
    spy = py_spy_start(executable, pid, duration, out, gil_only=on_pool)
    stack.pids.add(spy.pid)
    try:
        measured = measure(run, stack, plan, scenario, "gateway")
    finally:
        try:
            _out, err = spy.communicate(timeout=duration + 30)
        except subprocess.TimeoutExpired:
            spy.kill()
            _out, err = spy.communicate()
    if spy.returncode != 0 or not out.exists():
        raise StackError(f"py-spy failed: {err.decode(errors='replace')[-1000:]}")
    summary = summarize(out.read_text(), all_threads=on_pool)
    summary.update(path=str(out), measurement=measured, note="profiled run; not part of the medians")
    return summary


def metering(stack: Stack, measurements: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    """Report whether ingest keeps up: what was sent to /v1, appended, left over and stored."""
    sent = sum(
        m.get("started", 0)
        for m in measurements
        if m["target"] == "gateway" and m["scenario"] not in ("token", "jwt")
    )
    at_end = stack.audit_stream()
    # what the worker drained before each measurement: the one before's records (or, live, what it lagged)
    drains = [
        (m["audit_backlog_before"], m["audit_drain_wait_s"])
        for m in measurements
        if m.get("audit_backlog_before")
    ]
    waited = stack.wait_audit_drained(plan.drain_timeout_s, appended_at_least=sent, stored_at_least=sent)
    after = stack.audit_stream()
    return {
        "worker": stack.options.worker,
        "ingest": ("live" if stack.options.ingest_live else "between measurements")
        if stack.options.worker
        else "none",
        "requests_sent_to_gateway": sent,
        "appended": after["appended"],
        "backlog_at_end": at_end["backlog"],
        "drain_wait_s": waited,
        "backlog_after_drain": after["backlog"],
        "drained_between": sum(backlog for backlog, _wait in drains),
        "drained_between_s": round(sum(wait for _backlog, wait in drains), 2),
        "usage_rows": stack.usage_rows() if stack.options.worker else None,
    }


def _stack_options(args: argparse.Namespace, log_dir: Path, cores: list[int]) -> StackOptions:
    return StackOptions(
        log_dir=log_dir,
        db_name=args.db_name,
        redis_url=args.redis_url,
        redis_db=args.redis_db,
        worker=not args.no_worker,
        ingest_live=args.ingest_live,
        bare=not args.no_bare,
        limits=not args.no_limits,
        access_token_alg=args.access_token_alg,
        redis_reply_wait_us=args.redis_reply_wait_us,
        gateway_core=cores[1] if cores else None,
        other_core=cores[0] if cores else None,
        redis_on_gateway_core=args.redis_on_gateway_core,
    )


def _cores(args: argparse.Namespace) -> list[int]:
    """The two cores to pin to (the harness's first two allowed ones), or none when unpinned."""
    allowed = sorted(os.sched_getaffinity(0))
    return [] if args.no_pin or len(allowed) < 2 else allowed[:2]


def execute(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """Start the stack, measure, profile if asked, stop everything; return the result document."""
    plan = plan_from(args)
    scenarios = args.selected
    cores = _cores(args)
    # before the harness pins itself
    machine = machine_info(
        cores, own_redis=args.redis_url is None, redis_on_gateway_core=args.redis_on_gateway_core
    )
    if cores:
        os.sched_setaffinity(0, {cores[0]})  # the load generator shares its core with the fakes
    result: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "machine": machine,
        "plan": {
            "runs": plan.runs,
            "warmup_s": plan.warmup_s,
            "duration_s": plan.duration_s,
            "quick": plan.quick,
        },
        "scenarios": [s.key for s in scenarios],
        "access_token_alg": args.access_token_alg,
        "redis_reply_wait_us": args.redis_reply_wait_us,
    }
    logger.info("machine: %s", result["machine"])
    stack = Stack(_stack_options(args, log_dir, cores))
    try:
        with stack:
            stack.start()
            logger.info("stack up: %s", {s.name: s.process.pid for s in stack.services})
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                result["measurements"] = measure_all(runner.run, stack, plan, scenarios)
                if args.profile is not None:
                    result["profile"] = profile_gateway(
                        runner.run, stack, plan, args.profile, args.profile_scenario
                    )
            profiled = [result["profile"]["measurement"]] if "profile" in result else []
            result["metering"] = metering(stack, result["measurements"] + profiled, plan)
    finally:
        result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        result["pids"] = sorted(stack.pids)
        result["leftover_pids"] = stack.leftover_pids()
    return result


def finish(result: dict[str, Any], json_out: Path | None) -> int:
    """Aggregate, write the JSON, print the report; return the exit status."""
    measurements = result["measurements"]
    result["summary"] = aggregate(measurements)
    result["rows"] = rows(result["summary"])
    result["reference"] = against_reference(result["summary"])
    failures: dict[str, int] = {}
    for m in measurements:
        for reason, count in (m.get("failures") or {}).items():
            key = f"{m['scenario']}/{m['target']}/{reason}"
            failures[key] = failures.get(key, 0) + count
    result["failures"] = failures
    result["dropped"] = sum(m.get("dropped", 0) for m in measurements)
    path = json_out or RESULTS_DIR / f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result["json_path"] = str(path)
    path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    print_report(result)
    if result["leftover_pids"]:
        logger.error("processes outlived the benchmark: %s", result["leftover_pids"])
        return 1
    return 1 if result["dropped"] else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    log_dir = harness_start("portcullis-bench-")
    try:
        result = execute(args, log_dir)
    except StackError as exc:
        logger.error("bench: %s (logs kept in %s)", exc, log_dir)
        return 2
    status = finish(result, args.json_out)
    if status == 0:
        shutil.rmtree(log_dir, ignore_errors=True)
    else:
        logger.error("logs kept in %s", log_dir)
    return status


if __name__ == "__main__":
    sys.exit(main())
