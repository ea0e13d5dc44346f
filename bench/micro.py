"""The measurements behind two hot-path choices: which HTTP client talks to vLLM, and how Redis is called.

``python -m bench.micro`` starts one fakevllm on a free port (pinned to core 0 where there are two), then
in this process (pinned to core 1) measures the CPU time per call of:

- a proxied request through ``httpx.AsyncClient`` over the httpx-aiohttp transport, through that
  transport alone (httpx's ``Request``/``Response``, no client layer), through ``aiohttp`` directly,
  and through the gateway's own ``gateway.http1.HttpClient`` (one request at a time, and 32 at once);
- the admission script through redis-py (``Script`` call, plain ``EVALSHA``), through a redis-py pipeline
  of 1, 8 and 16, and the cost of packing one such command with redis-py and with hiredis.

CPU time (``time.process_time``) of this process is what is reported, so the fake's own work is not
counted. The optional packages (httpx-aiohttp) are skipped with a note when missing. Nothing here is a
target; it is the evidence for the choices in ``gateway/upstream.py`` and ``gateway/redisbatch.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import hiredis
import httpx
import redis.asyncio as aioredis
import uvloop

from bench.spawn import PYTHON, ROOT, free_port
from gateway.http1 import HttpClient, url_split

BODY = json.dumps({"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}).encode()
HEADERS = {"content-type": "application/json", "x-request-id": "0123456789abcdef", "user-agent": "bench"}
ADMIT_KEYS = [f"portcullis:rl:bench:{i}" for i in range(7)]
# the client's limits (gateway.ratelimit.ADMIT_LUA), then the request's: now, reservation, cost, to midnight
ADMIT_ARGS: list[str | int] = [100_000, 900_000, 0, 172_800, 100_000_000, 2_000_000_000, 0, 0]
ADMIT_ARGS += [1_800_000_000_000, "req", 50, 1000]


async def cpu_per_call(call: Callable[[], Awaitable[Any]], calls: int, concurrency: int) -> float:
    """Return µs of this process's CPU per call, after a warm-up."""
    for _ in range(100):
        await call()
    per_worker = max(1, calls // concurrency)

    async def worker() -> None:
        for _ in range(per_worker):
            await call()

    started = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.process_time() - started) / (per_worker * concurrency) * 1e6


async def http_clients(base: str, calls: int) -> list[tuple[str, float, float]]:
    url = f"{base}/v1/chat/completions"
    rows: list[tuple[str, float, float]] = []
    candidates: list[tuple[str, Callable[[], Awaitable[Any]], Callable[[], Awaitable[None]]]] = []
    try:
        from httpx_aiohttp import AiohttpTransport  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        print("httpx-aiohttp is not installed: `pip install httpx-aiohttp` to compare it", file=sys.stderr)
    else:
        client = httpx.AsyncClient(transport=AiohttpTransport())
        transport = AiohttpTransport()
        parsed = httpx.URL(url)

        async def via_client() -> None:
            response = await client.send(
                client.build_request("POST", url, content=BODY, headers=HEADERS), stream=True
            )
            await response.aread()
            await response.aclose()

        async def via_transport() -> None:
            response = await transport.handle_async_request(
                httpx.Request("POST", parsed, content=BODY, headers=HEADERS)
            )
            await response.aread()
            await response.aclose()

        candidates.append(("httpx.AsyncClient + httpx-aiohttp", via_client, client.aclose))
        candidates.append(("httpx-aiohttp transport alone", via_transport, transport.aclose))
    session = aiohttp.ClientSession()

    async def via_aiohttp() -> None:
        async with session.post(url, data=BODY, headers=HEADERS) as response:
            await response.read()

    candidates.append(("aiohttp.ClientSession", via_aiohttp, session.close))
    http1 = HttpClient()
    target = url_split(url)
    header_pairs = list(HEADERS.items())

    async def via_http1() -> None:
        answer = await http1.request("POST", target, header_pairs, BODY)
        await answer.read()
        answer.release()

    candidates.append(("gateway.http1.HttpClient", via_http1, http1.close))
    for name, call, close in candidates:
        rows.append((name, await cpu_per_call(call, calls, 1), await cpu_per_call(call, calls, 32)))
        await close()
    return rows


def admit_script() -> str:
    """The gateway's admission script (its module needs Django's settings to import)."""
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ.setdefault("DJANGO_DEBUG", "true")
    django.setup()
    from gateway.ratelimit import ADMIT_LUA

    return ADMIT_LUA


async def redis_calls(url: str, calls: int) -> list[tuple[str, float]]:
    ADMIT_LUA = admit_script()  # noqa: N806
    client = aioredis.Redis.from_url(url)
    script = client.register_script(ADMIT_LUA)
    sha = await client.script_load(ADMIT_LUA)
    rows = [
        (
            "redis-py Script() call",
            await cpu_per_call(lambda: script(keys=ADMIT_KEYS, args=ADMIT_ARGS), calls, 32),
        ),
        (
            "redis-py evalsha",
            await cpu_per_call(lambda: client.evalsha(sha, 7, *ADMIT_KEYS, *ADMIT_ARGS), calls, 32),
        ),
    ]
    for size in (1, 8, 16):

        async def pipelined(size: int = size) -> None:
            pipe = client.pipeline(transaction=False)
            for _ in range(size):
                pipe.evalsha(sha, 7, *ADMIT_KEYS, *ADMIT_ARGS)
            await pipe.execute()

        rows.append(
            (
                f"redis-py pipeline of {size} (per command)",
                await cpu_per_call(pipelined, calls // size, 1) / size,
            )
        )
    command: tuple[Any, ...] = ("EVALSHA", sha, 7, *ADMIT_KEYS, *ADMIT_ARGS)
    connection = client.connection_pool.make_connection()
    for name, pack in (
        ("pack: redis-py", lambda: connection.pack_command(*command)),
        ("pack: hiredis", lambda: hiredis.pack_command(command)),
    ):
        started = time.process_time()
        for _ in range(calls):
            pack()
        rows.append((name, (time.process_time() - started) / calls * 1e6))
    await client.aclose()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    args = parser.parse_args(argv)
    two_cores = (os.cpu_count() or 1) >= 2
    port = free_port(set())
    fake_argv = [PYTHON, "-m", "fakevllm", "--port", str(port), "--models", "m1"]
    if two_cores:
        os.sched_setaffinity(0, {1})
        fake_argv = ["taskset", "-c", "0", *fake_argv]
    fake = subprocess.Popen(fake_argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                httpx.get(f"{base}/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        http_rows = uvloop.run(http_clients(base, args.calls))
        redis_rows = uvloop.run(redis_calls(args.redis_url, args.calls))
    finally:
        fake.terminate()
        fake.wait(10)
    print(f"CPU µs per call in this process ({'pinned to core 1' if two_cores else 'unpinned'})")
    print(f"{'HTTP client, proxied chat request':40s} {'1 at a time':>12s} {'32 at once':>12s}")
    for name, one, many in http_rows:
        print(f"{name:40s} {one:12.1f} {many:12.1f}")
    print(f"{'Redis, the admission script':40s} {'µs':>12s}")
    for name, value in redis_rows:
        print(f"{name:40s} {value:12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
