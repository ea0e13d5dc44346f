"""The load generator frames HTTP/1.1 answers correctly and times streams; the report judges targets."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import bench
from bench.loadgen import ProtocolError, Target, build_request, read_answer
from bench.profile import summarize
from bench.report import aggregate, rows
from bench.stats import percentile

CHUNK = b'data: {"choices":[{"index":0,"delta":{"content":"tok%d "}}]}\n\n'


def answer_of(raw: bytes, *, stream: bool = False):
    async def read():
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        return await read_answer(reader, stream=stream)

    return asyncio.run(read())


def chunked(*parts: bytes) -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts)
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body + b"0\r\n\r\n"


def test_a_request_is_one_keep_alive_http11_message_with_its_length():
    raw = build_request(Target("127.0.0.1", 9), "POST", "/v1/x", {"A": "b"}, b"{}")
    assert raw == b"POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1:9\r\nA: b\r\nContent-Length: 2\r\n\r\n{}"


def test_a_content_length_answer_is_read_whole():
    answer = answer_of(b"HTTP/1.1 201 Created\r\ncontent-length: 5\r\n\r\nhello")
    assert (answer.status, answer.body_bytes, answer.keep_alive) == (201, 5, True)


def test_a_chunked_stream_counts_its_tokens_and_sees_done():
    answer = answer_of(chunked(CHUNK % 0, CHUNK % 1 + CHUNK % 2, b"data: [DONE]\n\n"), stream=True)
    assert answer.status == 200
    assert len(answer.token_times) == 3
    assert answer.done
    assert answer.first_chunk_at is not None


def test_a_stream_cut_before_its_terminating_chunk_is_an_error():
    raw = chunked(CHUNK % 0)[: -len(b"0\r\n\r\n")]
    with pytest.raises(asyncio.IncompleteReadError):
        answer_of(raw, stream=True)


@pytest.mark.parametrize(
    "raw",
    [b"SMTP 200 OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"],
    ids=["not http", "no framing"],
)
def test_answers_the_harness_cannot_frame_are_refused(raw):
    with pytest.raises(ProtocolError):
        answer_of(raw)


def test_percentiles_are_by_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (50.0, 99.0, 100.0)
    assert percentile([], 50) is None


def test_medians_across_runs_judge_added_latency_and_drops_are_summed():
    measurements = [
        {"scenario": "chat_1", "target": "direct", "p50_ms": 0.2, "p99_ms": 0.5},
        {"scenario": "chat_1", "target": "gateway", "p50_ms": 0.9, "p99_ms": 3.0},
        {"scenario": "chat_1", "target": "gateway", "p50_ms": 1.5, "p99_ms": 3.0},
        {"scenario": "chat_1", "target": "gateway", "p50_ms": 1.1, "p99_ms": 3.0},
        {"scenario": "paced_1000", "target": "gateway", "dropped": 0, "clients": 5, "in_flight_peak": 5},
        {"scenario": "paced_1000", "target": "gateway", "dropped": 2, "clients": 5, "in_flight_peak": 4},
    ]
    table = {(r["scenario"], r["metric"]): r for r in rows(aggregate(measurements))}
    p50 = table[("chat_1", "latency p50 (ms)")]
    assert (p50["gateway"], p50["added"], p50["verdict"]) == (1.1, 0.9, "PASS")
    assert table[("chat_1", "latency p99 (ms)")]["verdict"] == "MISS"
    assert table[("paced_1000", "streams dropped (all runs)")]["gateway"] == 2
    assert table[("paced_1000", "streams dropped (all runs)")]["verdict"] == "MISS"
    assert table[("paced_1000", "streams in flight, peak")]["verdict"] == "PASS"


def test_the_gateways_cpu_per_request_is_the_median_over_runs():
    measurements = [
        {"scenario": "token", "target": "gateway", "rps": 400.0, "cpu_pct": {"gateway": 90.0, "fast": 1.0}},
        {"scenario": "token", "target": "gateway", "rps": 500.0, "cpu_pct": {"gateway": 100.0}},
        {"scenario": "token", "target": "gateway", "rps": 450.0, "cpu_pct": {"gateway": 99.0}},
        {"scenario": "chat_32", "target": "direct", "rps": 9000.0, "cpu_pct": {"fast": 60.0, "gateway": 0.4}},
    ]
    summary = aggregate(measurements)
    assert summary["token"]["gateway"]["gateway_cpu_us"] == 2200.0  # runs: 2250, 2000, 2200
    assert "gateway_cpu_us" not in summary["chat_32"]["direct"]
    table = {(r["scenario"], r["metric"]): r for r in rows(summary)}
    assert table[("token", "server CPU per token (us)")]["gateway"] == 2200.0


def test_redis_cpu_per_request_is_the_gateways_when_the_harness_ran_the_redis():
    def chat_32(target: str, rps: float, cpu: dict[str, float]) -> dict:
        return {"scenario": "chat_32", "target": target, "rps": rps, "cpu_pct": cpu}

    own = aggregate(
        [
            chat_32("gateway", 4000.0, {"gateway": 90.0, "redis": 20.0}),
            chat_32("gateway", 5000.0, {"gateway": 95.0, "redis": 20.0}),
            chat_32("gateway", 4000.0, {"gateway": 92.0, "redis": 16.0}),
            chat_32("direct", 9000.0, {"fast": 60.0, "redis": 0.2}),
        ]
    )
    assert own["chat_32"]["gateway"]["redis_cpu_us"] == 40.0  # runs: 50, 40, 40
    assert "redis_cpu_us" not in own["chat_32"]["direct"]  # the direct requests never touch Redis
    row = next(r for r in rows(own) if r["metric"] == "Redis CPU per request (us)")
    assert (row["gateway"], row["verdict"]) == (40.0, "report")
    external = aggregate([chat_32("gateway", 4e3, {"gateway": 90.0}), chat_32("direct", 9e3, {"fast": 60.0})])
    assert "Redis CPU per request (us)" not in {r["metric"] for r in rows(external)}  # not measured: no row
    assert "gateway CPU per request (us)" in {r["metric"] for r in rows(external)}


def test_a_profile_is_ranked_by_own_time():
    collapsed = "\n".join(
        [
            "run (asyncio/base_events.py:1);handle (/x/gateway/consumers.py:10);loads (json/__init__.py:2) 3",
            "run (asyncio/base_events.py:1);handle (/x/gateway/consumers.py:10) 1",
        ]
    )
    summary = summarize(collapsed)
    assert summary["samples"] == 4
    assert summary["top"][0] == {"frame": "loads (json/__init__.py)", "samples": 3, "share_pct": 75.0}


def test_a_thread_pool_profile_counts_the_pool_threads_only_when_asked():
    views = Path(bench.__file__).resolve().parents[1] / "authserver" / "views.py"
    collapsed = "\n".join(
        [
            f"Thread._bootstrap (threading.py:1);post ({views}:9);sign (jwt/api_jws.py:3) 5",
            "run (asyncio/base_events.py:1);send (uvicorn/protocols/http/httptools_impl.py:4) 1",
        ]
    )
    loop_only = summarize(collapsed)
    assert (loop_only["samples"], loop_only["other_thread_samples"]) == (1, 5)
    everything = summarize(collapsed, all_threads=True)
    assert everything["samples"] == 6
    assert everything["top"][0]["frame"] == "sign (jwt/api_jws.py)"
    assert everything["project_inclusive"][0]["frame"] == "post (authserver/views.py)"


def test_the_bare_proxys_figures_sit_next_to_the_gateways_and_do_not_change_the_verdict():
    measurements = [
        {"scenario": "paced_32", "target": "direct", "ttft_p99_ms": 1.0, "rps": 200.0},
        {
            "scenario": "paced_32",
            "target": "bare",
            "ttft_p99_ms": 1.5,
            "rps": 200.0,
            "cpu_pct": {"bare": 4.0},
        },
        {
            "scenario": "paced_32",
            "target": "gateway",
            "ttft_p99_ms": 3.5,
            "rps": 200.0,
            "cpu_pct": {"gateway": 20.0},
        },
    ]
    summary = aggregate(measurements)
    assert summary["paced_32"]["bare"]["gateway_cpu_us"] == 200.0  # the bare proxy's own process
    assert summary["paced_32"]["gateway"]["gateway_cpu_us"] == 1000.0
    row = next(r for r in rows(summary) if r["metric"] == "TTFT p99 (ms)")
    assert (row["bare"], row["added"], row["over_bare"], row["verdict"]) == (1.5, 2.5, 2.0, "MISS")


def test_the_bare_proxy_routes_by_model_and_refuses_a_malformed_route():
    from bench.bareproxy import routes_parse

    assert routes_parse("m1=http://127.0.0.1:1/, m2=http://127.0.0.1:2") == {
        "m1": "http://127.0.0.1:1",
        "m2": "http://127.0.0.1:2",
    }
    assert routes_parse("") == {}
    with pytest.raises(ValueError, match="model=url"):
        routes_parse("m1http://127.0.0.1:1")
