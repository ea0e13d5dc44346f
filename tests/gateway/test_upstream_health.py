"""The upstream health check keeps a connection warm: it runs more often than the pool lets an idle
connection live, so a request after a quiet spell reuses the connection the checks used instead of
connecting (and, to an https upstream, shaking hands) again."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from gateway.conf import gateway_settings
from gateway.http1 import HttpClient
from gateway.upstream import RECHECK_MIN_S, UPSTREAM_KEEPALIVE_S, UpstreamPool
from tests.gateway.test_http1 import OK, Server, answering, run, serving


def silent(server: Server) -> Any:
    """A handler that reads a request and never answers it: a check of it times out."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        await asyncio.sleep(5)

    return handler


def test_the_health_check_runs_more_often_than_an_idle_upstream_connection_is_kept():
    assert gateway_settings().health_interval_s < UPSTREAM_KEEPALIVE_S


async def quiet_spell(check_every_s: float) -> Server:
    """Check the upstream three times at the interval given, with the pool's keep-alive scaled down to
    0.5 s, then send a request; return the server, which counted the connections."""
    server = await serving(answering(*[OK] * 20))
    client = HttpClient(keepalive_s=0.5)
    pool = UpstreamPool((server.base,), client, "")
    for _ in range(3):
        await pool.check(pool.upstreams[0])
        await asyncio.sleep(check_every_s)
    response = await client.request("POST", f"{server.base}/v1/chat/completions", body=b"{}")
    await response.read()
    response.release()
    await client.close()
    await server.__aexit__()
    return server


def test_checks_within_the_keep_alive_keep_one_connection_warm_for_the_next_request():
    assert run(lambda: quiet_spell(0.1)).connections == 1
    assert run(lambda: quiet_spell(0.7)).connections == 4  # each check, and the request, connected anew


def test_a_5xx_checks_its_upstream_once_at_a_time_and_right_after_a_check_when_recheck_min_has_passed():
    async def scenario() -> tuple[int, int, int, int]:
        server = await serving(answering(*[OK] * 20))
        client = HttpClient()
        pool = UpstreamPool((server.base,), client, "")
        upstream = pool.upstreams[0]
        for _ in range(5):  # five 500s at once: one check
            pool.suspect(upstream)
        await asyncio.gather(*pool._rechecks.values())
        first = len(server.requests)
        pool.suspect(upstream)  # checked a moment ago: the next check waits until RECHECK_MIN_S has passed
        pool.suspect(upstream)
        await asyncio.sleep(RECHECK_MIN_S / 2)
        meanwhile = len(server.requests)
        await asyncio.gather(*pool._rechecks.values())
        second = len(server.requests)
        upstream.checked_at -= RECHECK_MIN_S
        pool.suspect(upstream)
        await pool.close()  # a check still running is cancelled before the client closes
        await client.close()
        await server.__aexit__()
        return first, meanwhile, second, len(pool._rechecks)

    first, meanwhile, second, left = run(scenario)
    assert first == 2  # /health and /v1/models, once
    assert meanwhile == first
    assert second == first + 2  # one more check for the two 5xx, when its time came
    assert left == 0


def test_a_suspect_upstream_goes_last_until_a_check_begun_after_its_5xx_concludes():
    async def scenario() -> list[list[str]]:
        servers = [await serving(answering(*[OK] * 20)) for _ in range(2)]
        client = HttpClient()
        pool = UpstreamPool(tuple(s.base for s in servers), client, "")
        await pool.check_all()
        first, second = pool.upstreams
        orders = []

        def order() -> None:
            for upstream in pool.upstreams:  # the test server's model list is empty; a check rereads it
                upstream.models = {"m": {"id": "m"}}
            orders.append([u.base for u in pool.candidates("m")])

        order()
        order()  # round robin: each goes first in turn
        pool.suspect(first)
        order()
        order()  # while its check runs, the suspect is tried last
        first.inflight, second.inflight = 0, 5
        order()  # even when the other one is busier
        await asyncio.gather(*pool._rechecks.values())
        first.inflight = second.inflight = 0
        order()
        order()  # the check found it healthy: back in turn
        first.suspect_at = 0.0
        checking = asyncio.create_task(pool.check(first))
        await asyncio.sleep(0)  # the check has begun
        pool.suspect(first)  # a 5xx during the check: that check does not clear it
        await checking
        first.inflight = 0
        order()
        order()
        await asyncio.gather(*pool._rechecks.values())  # the one its 5xx started, RECHECK_MIN_S later
        order()
        order()
        await pool.close()
        await client.close()
        for server in servers:
            await server.__aexit__()
        return orders

    orders = run(scenario)
    assert orders[1] == orders[0][::-1]  # in turn
    suspect_last = orders[2]
    assert orders[3] == orders[4] == suspect_last
    assert orders[6] == orders[5][::-1]  # in turn again
    assert orders[7] == orders[8] == suspect_last
    assert orders[10] == orders[9][::-1]


def test_a_5xx_while_its_upstream_is_being_checked_gets_a_check_of_its_own():
    async def scenario() -> tuple[int, float]:
        server = await serving(answering(*[OK] * 20))
        client = HttpClient()
        pool = UpstreamPool((server.base,), client, "")
        upstream = pool.upstreams[0]
        pool.suspect(upstream)
        await asyncio.sleep(0)  # its check has begun
        pool.suspect(upstream)  # another 5xx meanwhile
        await asyncio.gather(*pool._rechecks.values())
        await client.close()
        await server.__aexit__()
        return len(server.requests), upstream.suspect_at

    checks, suspect_at = run(scenario)
    assert checks == 4  # two checks of /health and /v1/models
    assert suspect_at == 0.0


def test_a_check_that_began_with_every_connection_busy_gives_no_verdict_even_if_they_freed_meanwhile(
    monkeypatch,
):
    # The check's timeout covers its wait for a pooled connection: one that spent its time waiting says
    # nothing of the upstream, whether or not the pool has freed by the time it gives up.
    import gateway.upstream

    monkeypatch.setattr(gateway.upstream, "HEALTH_TIMEOUT_S", 0.3)

    async def scenario() -> bool:
        server = await serving(silent)
        client = HttpClient()
        pool = UpstreamPool((server.base,), client, "", max_connections=1)
        upstream = pool.upstreams[0]
        upstream.healthy = True
        upstream.inflight = 1  # a request holds the process's only connection
        asyncio.get_running_loop().call_later(0.1, lambda: setattr(upstream, "inflight", 0))  # then ends
        await pool.check(upstream)
        await client.close()
        await server.__aexit__()
        return upstream.healthy

    assert run(scenario) is True


def test_a_check_that_times_out_while_its_upstream_answers_requests_gives_no_verdict(monkeypatch):
    # An upstream whose event loop is behind (the benchmark's 1,000 streams at once) answers its /health
    # late too; taken out of rotation for that, every request got a 503 until the next round.
    import gateway.upstream

    monkeypatch.setattr(gateway.upstream, "HEALTH_TIMEOUT_S", 0.3)

    async def scenario(answers_meanwhile: bool) -> bool:
        server = await serving(silent)
        client = HttpClient()
        pool = UpstreamPool((server.base,), client, "")
        upstream = pool.upstreams[0]
        upstream.healthy = True
        upstream.answered_at = 1.0  # long before the check
        if answers_meanwhile:  # a request's answer came while the check waited
            loop = asyncio.get_running_loop()
            loop.call_later(0.1, lambda: setattr(upstream, "answered_at", time.monotonic()))
        await pool.check(upstream)
        await client.close()
        await server.__aexit__()
        return upstream.healthy

    assert run(lambda: scenario(True)) is True
    assert run(lambda: scenario(False)) is False


def test_an_answer_below_500_counts_as_answered_and_a_5xx_as_suspect():
    async def scenario() -> tuple[float, float, float, float]:
        ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"
        failed = b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 2\r\n\r\n{}"
        server = await serving(answering(ok, failed))
        client = HttpClient()
        pool = UpstreamPool((server.base,), client, "")
        upstream = pool.upstreams[0]
        upstream.healthy, upstream.models = True, {"m": {"id": "m"}}
        before = time.monotonic()
        async with pool.request("m", "/v1/chat/completions", b"{}", {}) as (_upstream, response):
            await response.read()
        answered = upstream.answered_at
        suspected = upstream.suspect_at
        async with pool.request("m", "/v1/chat/completions", b"{}", {}) as (_upstream, response):
            await response.read()
        await pool.close()
        await client.close()
        await server.__aexit__()
        return before, answered, suspected, upstream.suspect_at

    before, answered, suspected_after_ok, suspected_after_500 = run(scenario)
    assert answered >= before
    assert suspected_after_ok == 0.0
    assert suspected_after_500 >= answered


def test_an_upstream_found_unhealthy_is_logged_with_what_the_check_met(monkeypatch, caplog):
    import gateway.upstream

    monkeypatch.setattr(gateway.upstream, "HEALTH_TIMEOUT_S", 0.3)
    dead = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"
    ok = b'HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n{"data":[]}'

    async def scenario(answers: tuple[bytes, ...]) -> None:
        server = await serving(answering(*answers) if answers else silent)
        client = HttpClient()
        pool = UpstreamPool((server.base,), client, "")
        pool.upstreams[0].healthy = True
        await pool.check(pool.upstreams[0])
        await client.close()
        await server.__aexit__()

    with caplog.at_level("WARNING", logger="gateway.upstream"):
        run(lambda: scenario((dead, ok)))  # an engine that died: /health 503
        run(lambda: scenario((ok, dead)))
        run(lambda: scenario(()))  # reads the request, never answers
    found = [r.getMessage().split(" is now ")[1] for r in caplog.records if r.name == "gateway.upstream"]
    assert found == [
        "unhealthy (/health answered 503)",
        "unhealthy (/v1/models answered 503)",
        "unhealthy (TimeoutError)",
    ]


def test_a_model_list_nested_past_the_parsers_limit_or_holding_nan_is_a_verdict_not_a_crash(caplog):
    # nested 200,000 deep it raised a RecursionError the check did not catch: at start the gateway never came
    # up, and later every round logged a traceback while the upstream kept its old list; a NaN in a card was
    # copied into the gateway's own /v1/models, which was then not JSON
    def answer(body: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)

    health = answer(b"{}")
    deep = answer(b"[" * 200_000 + b"]" * 200_000)
    nan = answer(b'{"data":[{"id":"m1","created":NaN}]}')

    async def scenario(models: bytes) -> tuple[bool, dict[str, Any]]:
        server = await serving(answering(health, models))
        client = HttpClient()
        pool = UpstreamPool((server.base,), client, "")
        upstream = pool.upstreams[0]
        upstream.healthy = True
        await pool.check(upstream)
        await client.close()
        await server.__aexit__()
        return upstream.healthy, upstream.models

    with caplog.at_level("WARNING", logger="gateway.upstream"):
        assert run(lambda: scenario(deep)) == (False, {})
        assert run(lambda: scenario(nan)) == (False, {})
    found = [r.getMessage().split(" is now ")[1] for r in caplog.records if r.name == "gateway.upstream"]
    assert found == ["unhealthy (RecursionError)", "unhealthy (ValueError)"]
