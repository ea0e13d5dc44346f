"""The seven scenarios of issue 7 and how one measurement of each is taken.

A load scenario runs the closed loop against the fake vLLM directly ("direct"), through the bare proxy
("bare", the floor: ``bench.bareproxy``) and through the gateway ("gateway") with the same request bytes (plus
the bearer token for the gateway); while its window runs, an observer reads the CPU time of every process, how
long each waited for a core, what else the gateway's core did and, when asked, polls the gateway's resident
memory. The token endpoint and the in-process JWT micro-benchmark have no direct counterpart.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from bench import proc
from bench.jwtbench import jwt_verify_bench
from bench.loadgen import LoadSpec, Target, Window, build_request, run_closed_loop, tally_summary
from bench.stack import Stack

RSS_POLL_S = 0.05
ON_GATEWAY_CORE = ("gateway", "bare")  # the harness's processes pinned to the gateway's core
TOKEN_BODY = b"grant_type=client_credentials&scope=completions"
CHAT_PATH = "/v1/chat/completions"
Runner = Callable[[Coroutine[Any, Any, Any]], Any]


@dataclass(frozen=True)
class Scenario:
    """One scenario: what is sent, by how many clients, and against which targets."""

    key: str
    number: int
    title: str
    kind: str  # "load", "token" or "jwt"
    model: str = ""
    stream: bool = False
    clients: int = 1
    quick_clients: int = 1
    direct: bool = True
    watch_rss: bool = False
    stagger: bool = False  # start the clients spread over one stream's length, not in lockstep


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("chat_1", 1, "non-streaming chat, 1 client", "load", "m1", False, 1, 1),
    Scenario("chat_32", 2, "non-streaming chat, 32 clients", "load", "m1", False, 32, 4),
    Scenario("stream_16", 3, "16-chunk streams, 16 clients, no delay", "load", "m1", True, 16, 4),
    Scenario("paced_32", 4, "32 streams paced at 10 ms/chunk", "load", "m2", True, 32, 4, stagger=True),
    Scenario(
        "paced_1000", 5, "1,000 concurrent paced streams", "load", "m2", True, 1000, 20, False, watch_rss=True
    ),
    Scenario(
        "token", 6, "token endpoint, client credentials", "token", clients=16, quick_clients=2, direct=False
    ),
    Scenario("jwt", 7, "JWT verification in process", "jwt", direct=False),
    # Not a target: what starting one stream costs with nothing else in flight, next to paced_32's figures
    Scenario("paced_1", 8, "1 stream paced at 10 ms/chunk", "load", "m2", True, 1, 1),
)


@dataclass(frozen=True)
class Plan:
    """How long and how often to measure."""

    runs: int
    warmup_s: float
    duration_s: float
    quick: bool
    tokens: int = 16
    jwt_cold: int = 2000
    jwt_cached: int = 200_000
    drain_timeout_s: float = 20.0


def scenarios_select(names: str | None) -> list[Scenario]:
    """Return the scenarios named (by key or number, comma-separated), or all of them."""
    if not names:
        return list(SCENARIOS)
    wanted = {n.strip() for n in names.split(",") if n.strip()}
    chosen = [s for s in SCENARIOS if s.key in wanted or str(s.number) in wanted]
    unknown = wanted - {s.key for s in chosen} - {str(s.number) for s in chosen}
    if unknown:
        raise ValueError(f"unknown scenarios: {', '.join(sorted(unknown))}")
    return chosen


def chat_body(model: str, *, stream: bool, tokens: int) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": tokens,
    }
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def _load_spec(scenario: Scenario, target: str, stack: Stack, plan: Plan) -> LoadSpec:
    clients = scenario.quick_clients if plan.quick else scenario.clients
    headers = {"Content-Type": "application/json"}
    if scenario.kind == "token":
        assert stack.credentials is not None  # noqa: S101  (the stack is started)
        where = Target("127.0.0.1", stack.ports["gateway"])
        headers = {
            "Authorization": stack.credentials.basic(),
            "Content-Type": "application/x-www-form-urlencoded",
        }
        request = build_request(where, "POST", "/oauth/token/", headers, TOKEN_BODY)
    else:
        upstream = "fast" if scenario.model == "m1" else "paced"
        where = Target("127.0.0.1", stack.ports[upstream if target == "direct" else target])
        if target == "gateway":
            headers["Authorization"] = "Bearer " + stack.access_token()  # fresh: tokens live 300 s
        body = chat_body(scenario.model, stream=scenario.stream, tokens=plan.tokens)
        request = build_request(where, "POST", CHAT_PATH, headers, body)
    return LoadSpec(
        target=where,
        request=request,
        clients=clients,
        warmup_s=plan.warmup_s,
        duration_s=plan.duration_s,
        stream=scenario.stream,
        expected_tokens=plan.tokens if scenario.stream else None,
        drain_timeout_s=plan.drain_timeout_s,
        # Streams of equal length started together stay in lockstep for the whole run: every 160 ms all
        # 32 would start at once and TTFT would measure a thundering herd. Spread over one stream's length.
        stagger_s=plan.tokens * stack.options.paced_chunk_ms / 1000 if scenario.stagger else 0.0,
    )


def _observer(
    pids: dict[str, int],
    ports: dict[str, int],
    rss_pid: int | None,
    gateway_core: int | None,
    on_gateway_core: tuple[str, ...] = ON_GATEWAY_CORE,
) -> Callable[[Window], Awaitable[dict[str, Any]]]:
    waiting: dict[str, int | str] = {**pids, "loadgen": "self"}

    async def observe(window: Window) -> dict[str, Any]:
        time_wait_before = proc.time_wait_by_port(ports)  # during the warm-up: it is not cheap
        await asyncio.sleep(max(0.0, window.measure_from - time.perf_counter()))
        before = {name: proc.cpu_seconds(pid) for name, pid in pids.items()}
        waited_before = {name: proc.run_delay_seconds(who) for name, who in waiting.items()}
        core_before = proc.core_seconds(gateway_core) if gateway_core is not None else None
        own_before, started = time.process_time(), time.perf_counter()
        peak = await _rss_peak(rss_pid, window.end)
        elapsed = max(time.perf_counter() - started, 1e-9)
        core_after = proc.core_seconds(gateway_core) if gateway_core is not None else None
        cpu = {
            name: _per_window(proc.cpu_seconds(pid), before[name], elapsed, 100, 1)
            for name, pid in pids.items()
        }
        cpu["loadgen"] = _per_window(time.process_time(), own_before, elapsed, 100, 1)
        waited = {
            name: _per_window(proc.run_delay_seconds(who), waited_before[name], elapsed, 1000, 2)
            for name, who in waiting.items()
        }
        time_wait_after = proc.time_wait_by_port(ports)
        closed = {name: time_wait_after[name] - time_wait_before[name] for name in ports}
        return {
            "cpu_pct": cpu,
            "core_wait_ms_per_s": waited,
            "gateway_core_pct": _core_share(core_before, core_after, elapsed, cpu, on_gateway_core),
            "rss_peak_mib": round(peak / 1024, 1) if peak else None,
            "tcp_closed": closed,
        }

    return observe


def _per_window(
    now: float | None, then: float | None, elapsed: float, scale: int, digits: int
) -> float | None:
    """Seconds of something spent in the window, per second of it, times ``scale`` (100: % of a core; 1000:
    ms a second); None when either reading is missing (the process is gone)."""
    return None if now is None or then is None else round((now - then) / elapsed * scale, digits)


def _core_share(
    before: tuple[float, float] | None,
    after: tuple[float, float] | None,
    elapsed: float,
    cpu: dict[str, float | None],
    on_gateway_core: tuple[str, ...] = ON_GATEWAY_CORE,
) -> dict[str, float]:
    """What the gateway's core did in the window besides the harness's own processes pinned to it, in % of
    the window: ``others`` (every other process, kernel threads and interrupts) and ``steal`` (the
    hypervisor ran something else instead). Empty when the core is not pinned or not listed."""
    if before is None or after is None:
        return {}
    busy = (after[0] - before[0]) / elapsed * 100
    own = sum(cpu.get(name) or 0.0 for name in on_gateway_core)
    steal = (after[1] - before[1]) / elapsed * 100
    return {"others": round(max(busy - own, 0.0), 1), "steal": round(steal, 1)}


async def _rss_peak(pid: int | None, until: float) -> int:
    """Poll a process's resident memory until the given time; return the peak in KiB (0 if not asked)."""
    peak = 0
    while (remaining := until - time.perf_counter()) > 0:
        if pid is not None:
            peak = max(peak, proc.status_kib(pid, "VmRSS") or 0)
        await asyncio.sleep(min(RSS_POLL_S, remaining))
    return peak


def ingest_paused_for(scenario: Scenario) -> bool:
    """Whether the worker is stopped while a scenario is measured: not for the token endpoint's. Its server
    writes its audit events to the database itself (nothing reaches the stream, so the worker has nothing to
    ingest), and a worker stopped inside an ingest's transaction that stores audit events holds the audit
    chain's lock: every token request would wait for it until the window ended."""
    return scenario.kind != "token"


def measure(run: Runner, stack: Stack, plan: Plan, scenario: Scenario, target: str) -> dict[str, Any]:
    """Take one measurement of a scenario against a target and return its numbers.

    The worker ingests what the last measurement handed off first, then stops for this one: the issue's
    core 0 holds the fakes and the load generator, and a worker ingesting there slowed the request loop,
    which the direct and bare measurements, handing nothing off, never pay (bench/README.md, "What it
    starts"). ``--ingest-live`` keeps it ingesting throughout."""
    backlog = stack.audit_stream()["backlog"]
    drain_wait_s = stack.wait_audit_drained(plan.drain_timeout_s)
    if scenario.kind == "jwt":
        cold, cached = (50, 5000) if plan.quick else (plan.jwt_cold, plan.jwt_cached)
        result: dict[str, Any] = run(jwt_verify_bench(cold=cold, cached=cached))
    else:
        spec = _load_spec(scenario, target, stack, plan)
        pids = {service.name: service.process.pid for service in stack.services}
        rss_pid = pids["gateway"] if scenario.watch_rss and target == "gateway" else None
        # the harness's own Redis is on the gateway's core too when asked: not one of the core's "others"
        beside = ("redis",) if stack.options.redis_on_gateway_core else ()
        observer = _observer(pids, stack.ports, rss_pid, stack.options.gateway_core, ON_GATEWAY_CORE + beside)
        paused = ingest_paused_for(scenario)
        if paused:
            stack.ingest_pause()
        try:
            tally, observed = run(run_closed_loop(spec, observer))
        finally:
            if paused:
                stack.ingest_resume()
        result = {"clients": spec.clients, **tally_summary(tally), **observed}
        started = max(result["started"], 1)
        # TIME_WAIT sockets that appeared per request, by port: ~1 means a new connection per request
        result["tcp_closed_per_request"] = {
            k: round(max(v, 0) / started, 3) for k, v in observed["tcp_closed"].items()
        }
    result["audit_drain_wait_s"] = drain_wait_s
    result["audit_backlog_before"] = backlog  # what that wait drained
    if target == "gateway" and scenario.kind == "load":
        result["audit_backlog_after"] = stack.audit_stream()["backlog"]
    return {"scenario": scenario.key, "target": target, **result}
