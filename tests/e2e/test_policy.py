"""End to end: limits that stay exact under concurrency and streaming, the Redis-down posture, and
client IPs that a client cannot choose."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from audit.ingest import stream_ingest
from audit.models import AuditEvent, UsageRecord
from authserver.services import RegisteredClient, client_register
from gateway.services import policy_set
from tests.e2e.conftest import (
    FakeVllm,
    Server,
    client_token,
    free_port,
    stack_stop,
    start_fakevllm,
    start_server,
    start_worker,
    stop,
)

pytestmark = [pytest.mark.e2e, pytest.mark.django_db]

CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


POLICIES: dict[str, dict[str, Any]] = {
    "rpm": {"rpm": 50},
    "tpm": {"tpm": 1000, "max_tokens": 40},
    "slot": {"concurrency": 1},
    "pair": {"concurrency": 2},
    "ip": {"allow_ips": ["10.1.2.3/32"]},
    "fallback": {"rpm": 40},
    "open": {},  # no limit for other tests to spend
    "capped": {"max_tokens": 3500},  # against fakevllm's 4,096-token context
}


@pytest.fixture(scope="module")
def stack(
    django_db_setup: None, django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, FakeVllm, dict[str, RegisteredClient]]]:
    tmp = tmp_path_factory.mktemp("policy")
    clients: dict[str, RegisteredClient] = {}
    with django_db_blocker.unblock():  # committed before any test transaction, so the servers see them
        for name, policy in POLICIES.items():
            clients[name] = client_register(name=f"{name} client", grant_types=["client-credentials"])
            policy_set(client=clients[name].client, actor="test", allowed_models=["m1"], **policy)
    fake = start_fakevllm(tmp, "m1")
    server = start_server(tmp, VLLM_UPSTREAMS=fake.base)
    worker = start_worker(tmp)
    try:
        yield server, fake, clients
    finally:
        stack_stop(django_db_blocker, worker, server.process, fake.process)


def wait_policy(server: Server, token: str) -> None:
    """Policies are pushed; wait until this server has the new one (well under a second)."""
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        models = httpx.get(
            f"{server.base}/v1/models", headers={"authorization": f"Bearer {token}"}, timeout=5
        )
        if models.status_code == 200 and models.json()["data"]:
            return
        time.sleep(0.05)
    raise AssertionError("the policy did not reach the gateway within 3 s")


async def burst(server: Server, token: str, count: int, body: dict[str, Any]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(base_url=server.base, limits=limits, timeout=30) as client:
        return await asyncio.gather(
            *(
                client.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {token}"})
                for _ in range(count)
            )
        )


def test_two_hundred_concurrent_requests_against_fifty_per_minute_exactly_fifty_succeed(
    stack, django_db_blocker
):
    server, fake, clients = stack
    fake.reset()
    reg = clients["rpm"]
    token = client_token(server, reg, "completions models.read")
    wait_policy(server, token)
    before = fake.served()
    responses = asyncio.run(burst(server, token, 200, CHAT))
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 50  # (the /v1/models probe is answered locally and is not metered)
    assert statuses.count(429) == 150
    assert fake.served() - before == 50
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-limit-requests"] == "50"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    reset = refused.headers["x-ratelimit-reset-requests"]  # when Retry-After says, as Redis reckoned it
    assert reset.endswith("s"), reset
    assert not reset.endswith("ms"), reset
    assert float(reset[:-1]) >= 1, reset
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert refused.json()["error"]["code"] == "requests"
    ok = next(r for r in responses if r.status_code == 200)
    assert ok.headers["x-ratelimit-limit-requests"] == "50"
    assert "x-ratelimit-remaining-requests" in ok.headers


def test_concurrent_streams_never_overspend_tokens_and_settle_to_the_upstream_usage(stack, django_db_blocker):
    server, fake, clients = stack
    fake.reset()
    fake.configure(tokens=40)
    reg = clients["tpm"]
    token = client_token(server, reg, "completions models.read")
    wait_policy(server, token)
    body = {
        "model": "m1",
        "messages": [{"role": "user", "content": "count"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    responses = asyncio.run(burst(server, token, 30, body))
    ok = [r for r in responses if r.status_code == 200]
    assert 0 < len(ok) < 30
    used = 0
    for response in ok:
        usage_line = [
            line for line in response.text.splitlines() if '"usage": {' in line or '"usage":{' in line
        ][-1]
        used += int(usage_line.split('"total_tokens":')[1].split(",")[0].strip().rstrip("}"))
    reservation = 40 + len(json_bytes(body)) // 4 + 60  # one request's reservation, with the prompt estimate
    assert used <= 1000 + reservation
    with django_db_blocker.unblock():
        deadline = time.monotonic() + 15
        rows: list[UsageRecord] = []
        while time.monotonic() < deadline and len(rows) < len(ok):
            rows = list(UsageRecord.objects.filter(client_id=reg.client.client_id, status=200, stream=True))
            time.sleep(0.2)
    assert sum(r.prompt_tokens + r.completion_tokens for r in rows) == used


def json_bytes(body: dict[str, Any]) -> bytes:
    import json

    return json.dumps(body).encode()


def test_a_client_that_disconnects_mid_stream_frees_its_slot_and_is_charged_for_what_was_sent(
    stack, django_db_blocker
):
    server, fake, clients = stack
    fake.reset()
    fake.configure(tokens=500, chunk_delay_s=0.02)
    reg = clients["slot"]
    token = client_token(server, reg, "completions models.read")
    wait_policy(server, token)
    headers = {"authorization": f"Bearer {token}"}
    body = {**CHAT, "max_tokens": 500, "stream": True}
    with httpx.stream(
        "POST", f"{server.base}/v1/chat/completions", json=body, headers=headers, timeout=10
    ) as first:
        lines = first.iter_lines()
        received = [next(lines) for _ in range(12)]
        request_id = first.headers["x-request-id"]
        busy = httpx.post(f"{server.base}/v1/chat/completions", json=CHAT, headers=headers, timeout=10)
        assert busy.status_code == 429
        assert busy.json()["error"]["code"] == "concurrency"
    sent_events = len([line for line in received if line.startswith("data: ")])
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        again = httpx.post(f"{server.base}/v1/chat/completions", json=CHAT, headers=headers, timeout=10)
        if again.status_code == 200:
            break
        time.sleep(0.05)
    assert again.status_code == 200  # the slot came back when the client left
    with django_db_blocker.unblock():
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not UsageRecord.objects.filter(request_id=request_id).exists():
            time.sleep(0.2)
        row = UsageRecord.objects.get(request_id=request_id)
    assert row.outcome == "client_gone"
    assert (
        sent_events - 1 <= row.completion_tokens < 500
    )  # charged for the tokens streamed, not the reservation
    assert row.prompt_tokens > 0  # and for the prompt vLLM read (estimated, as it was reserved)


def test_a_client_chosen_request_id_shared_by_every_request_does_not_share_one_slot(stack):
    server, fake, clients = stack
    fake.reset()
    fake.configure(tokens=500, chunk_delay_s=0.02)
    token = client_token(server, clients["pair"], "completions models.read")
    wait_policy(server, token)
    headers = {"authorization": f"Bearer {token}", "x-request-id": "the-same-id-every-time"}
    body = {**CHAT, "max_tokens": 500, "stream": True}
    url = f"{server.base}/v1/chat/completions"
    with (
        httpx.stream("POST", url, json=body, headers=headers, timeout=10) as first,
        httpx.stream("POST", url, json=body, headers=headers, timeout=10) as second,
    ):
        assert (first.status_code, second.status_code) == (200, 200)
        assert first.headers["x-request-id"] == "the-same-id-every-time"  # still echoed, for the logs
        third = httpx.post(url, json=CHAT, headers=headers, timeout=10)
        assert third.status_code == 429
        assert third.json()["error"]["code"] == "concurrency"
    upstream_ids = [
        seen["x-request-id"]
        for seen in fake.state()["last_headers"]
        if seen.get("x-request-id", "").startswith("the-same-id-every-time-")
    ]
    assert len(set(upstream_ids)) == 2  # vLLM's engine ids must be unique: each request got its own


@pytest.mark.parametrize("trusted", [False, True])
def test_forwarded_for_is_believed_only_from_a_trusted_proxy(tmp_path, stack, django_db_blocker, trusted):
    _server, fake, clients = stack
    reg = clients["ip"]
    env = {"VLLM_UPSTREAMS": fake.base}
    if trusted:
        env["PORTCULLIS_TRUSTED_PROXIES"] = "127.0.0.1/32"
    server = start_server(tmp_path, **env)
    try:
        headers = {"authorization": f"Bearer {client_token(server, reg)}"}
        direct = httpx.post(f"{server.base}/v1/chat/completions", json=CHAT, headers=headers, timeout=10)
        assert direct.status_code == 403
        assert direct.json()["error"]["code"] == "ip_not_allowed"
        spoofed = httpx.post(
            f"{server.base}/v1/chat/completions",
            json=CHAT,
            timeout=10,
            headers={**headers, "x-forwarded-for": "10.1.2.3"},
        )
        assert spoofed.status_code == (200 if trusted else 403)
        leftmost = httpx.post(
            f"{server.base}/v1/chat/completions",
            json=CHAT,
            timeout=10,
            headers={**headers, "x-forwarded-for": "10.1.2.3, 203.0.113.7"},
        )
        assert leftmost.status_code == 403  # the leftmost hop is the client's own claim
    finally:
        stop(server.process)


@pytest.mark.parametrize("denied", ["127.0.0.0/8", "192.0.2.0/24"])
def test_the_global_deny_list_refuses_its_addresses_before_the_token_is_looked_at(tmp_path, stack, denied):
    _server, fake, clients = stack
    server = start_server(tmp_path, VLLM_UPSTREAMS=fake.base, PORTCULLIS_DENY_IPS=denied)
    try:
        headers = {"authorization": f"Bearer {client_token(server, clients['open'])}"}
        answer = httpx.post(f"{server.base}/v1/chat/completions", json=CHAT, headers=headers, timeout=10)
        no_token = httpx.post(f"{server.base}/v1/chat/completions", json=CHAT, timeout=10)
    finally:
        stop(server.process)
    if denied == "127.0.0.0/8":  # the test's own address
        assert answer.status_code == 403
        assert answer.json()["error"]["code"] == "ip_not_allowed"
        assert no_token.status_code == 403  # refused before the missing token would be a 401
    else:
        assert answer.status_code == 200
        assert no_token.status_code == 401


def start_redis(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp),
        ],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}", timeout=0.2):
                break
        except httpx.HTTPError as exc:
            if "Connection refused" not in str(exc):
                break
        time.sleep(0.05)
    return process


def test_with_redis_down_requests_are_served_within_the_fallback_and_never_500(
    tmp_path, stack, django_db_blocker
):
    _server, fake, clients = stack
    port = free_port()
    redis_process = start_redis(tmp_path, port)
    reg = clients["fallback"]
    server = start_server(tmp_path, VLLM_UPSTREAMS=fake.base, REDIS_URL=f"redis://127.0.0.1:{port}/0")
    try:
        token = client_token(server, reg)
        headers = {"authorization": f"Bearer {token}"}
        assert (
            httpx.post(
                f"{server.base}/v1/chat/completions", json=CHAT, headers=headers, timeout=10
            ).status_code
            == 200
        )
        stop(redis_process)
        statuses = [
            httpx.post(
                f"{server.base}/v1/chat/completions", json=CHAT, headers=headers, timeout=10
            ).status_code
            for _ in range(20)
        ]
        assert 500 not in statuses
        assert statuses.count(200) == 10  # a quarter of 40 per minute, per process
        assert set(statuses) == {200, 429}
        redis_process = start_redis(tmp_path, port)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            back = httpx.post(f"{server.base}/v1/chat/completions", json=CHAT, headers=headers, timeout=10)
            if back.status_code == 200 and back.headers.get("x-ratelimit-limit-requests") == "40":
                break
            time.sleep(0.1)
        assert back.headers["x-ratelimit-limit-requests"] == "40"  # shared limits resumed
        # The events were buffered during the outage and handed off to this server's own Redis once it was
        # back; ingest them from there (the suite's worker reads the suite's Redis).
        kinds: set[str] = set()
        deadline = time.monotonic() + 10
        while (
            not {"gateway.redis_unavailable", "gateway.redis_recovered"} <= kinds
            and time.monotonic() < deadline
        ):
            stream_ingest(redis.Redis(port=port))
            kinds = set(AuditEvent.objects.values_list("kind", flat=True))
            time.sleep(0.1)
        assert {"gateway.redis_unavailable", "gateway.redis_recovered"} <= kinds
    finally:
        stop(server.process)
        stop(redis_process)


def chat_post(server: Server, headers: dict[str, str]) -> tuple[str, httpx.Response]:
    """A chat call with a fresh request id, to find its usage record by; return the id and the answer."""
    request_id = os.urandom(16).hex()
    response = httpx.post(
        f"{server.base}/v1/chat/completions",
        json=CHAT,
        headers={**headers, "x-request-id": request_id},
        timeout=10,
    )
    return request_id, response


@contextmanager
def server_on_its_own_redis(
    tmp_path: Path, fake: FakeVllm, client: RegisteredClient, **env: str
) -> Iterator[tuple[Callable[[], tuple[str, httpx.Response]], redis.Redis]]:
    """A server on a Redis of its own (no worker reads it: what waits there stays until the test ingests
    it); yield a chat call that sends a fresh request id, to find its usage record by, and that Redis."""
    port = free_port()
    redis_process = start_redis(tmp_path, port)
    server = start_server(tmp_path, VLLM_UPSTREAMS=fake.base, REDIS_URL=f"redis://127.0.0.1:{port}/0", **env)
    headers = {"authorization": f"Bearer {client_token(server, client)}"}

    def post() -> tuple[str, httpx.Response]:
        return chat_post(server, headers)

    try:
        yield post, redis.Redis(port=port)
    finally:
        stop(server.process)
        stop(redis_process)


def test_a_full_audit_backlog_refuses_new_requests_until_it_drains_and_loses_no_record(
    tmp_path, stack, django_db_blocker
):
    _server, fake, clients = stack
    own = server_on_its_own_redis(tmp_path, fake, clients["open"], PORTCULLIS_AUDIT_BACKLOG_LIMIT="3")
    with own as (post, stream):
        served: list[str] = []
        refused: list[str] = []
        # Three records fill it; the gateway reads the stream's length with a batch at most once a second.
        deadline = time.monotonic() + 5
        while not refused and time.monotonic() < deadline:
            request_id, response = post()
            (served if response.status_code == 200 else refused).append(request_id)
            assert response.status_code in (200, 503)
            time.sleep(0.1)
        assert refused, "the gateway never noticed its full audit backlog"
        assert len(served) >= 3
        first = response
        assert first.json()["error"] == {
            "message": "The audit log cannot take more records right now; try again shortly.",
            "type": "api_error",
            "param": None,
            "code": "audit_backlog_full",
        }
        assert first.headers["retry-after"] == "5"
        time.sleep(0.3)  # the period's one event is handed off
        waiting = stream.xlen("portcullis:audit")
        for _ in range(5):
            request_id, response = post()
            assert response.status_code == 503
            refused.append(request_id)
        time.sleep(0.3)
        assert stream.xlen("portcullis:audit") == waiting  # refusals are counted, not appended one by one

        stream_ingest(stream)  # the worker catches up: everything waiting is stored, nothing was trimmed
        deadline = time.monotonic() + 5  # an idle gateway sees the drain and records the period's end
        while not AuditEvent.objects.filter(kind="gateway.audit_backlog_recovered").exists():
            assert time.monotonic() < deadline, "the drain was not recorded without a request"
            time.sleep(0.2)
            stream_ingest(stream)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            request_id, response = post()
            if response.status_code == 200:
                served.append(request_id)
                break
            refused.append(request_id)
            time.sleep(0.1)
        assert response.status_code == 200, "requests were still refused after the backlog drained"
        time.sleep(0.3)
        stream_ingest(stream)
        stored = set(UsageRecord.objects.values_list("request_id", flat=True))
        assert set(served) <= stored  # every request served has its usage record
        assert not set(refused) & stored
        full = AuditEvent.objects.filter(kind="gateway.audit_backlog_full")
        assert full.count() == 1
        assert full.get().data["stream"] >= 3
        recovered = AuditEvent.objects.get(kind="gateway.audit_backlog_recovered")
        assert recovered.data["refused"] == len(refused)


def test_a_redis_out_of_memory_still_admits_and_the_records_it_refuses_wait_in_the_process_to_a_limit(
    tmp_path, stack, django_db_blocker
):
    _server, fake, clients = stack
    # a client with limits: its reservation writes to Redis
    own = server_on_its_own_redis(tmp_path, fake, clients["fallback"], PORTCULLIS_AUDIT_BUFFER_LIMIT="4")
    with own as (post, stream):
        request_id, response = post()
        served = [request_id]
        deadline = time.monotonic() + 5
        while stream.xlen("portcullis:audit") < 1 and time.monotonic() < deadline:
            time.sleep(0.02)  # its record is handed off before Redis fills up
        stream.set("ballast", b"x" * 2_000_000)
        stream.config_set("maxmemory", "1mb")  # over it: noeviction refuses commands that grow memory
        for _ in range(8):
            request_id, response = post()
            if response.status_code != 200:
                break
            served.append(request_id)  # the reservation still runs; the record waits in the process
            time.sleep(0.05)
        assert response.status_code == 503  # four records held: the process takes no more requests
        assert response.json()["error"]["code"] == "audit_backlog_full"
        assert len(served) == 5  # the first record went before Redis was full, four wait
        assert stream.xlen("portcullis:audit") == 1
        stream.config_set("maxmemory", "0")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and response.status_code != 200:
            time.sleep(0.2)
            request_id, response = post()
        assert response.status_code == 200  # handed off once Redis took them: served again
        served.append(request_id)
        stored: set[str] = set()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not set(served) <= stored:
            time.sleep(0.2)
            stream_ingest(stream)
            stored = set(UsageRecord.objects.values_list("request_id", flat=True))
        assert set(served) <= stored  # every record held in the process was stored


def test_records_held_for_a_redis_that_is_down_survive_a_restart_of_the_gateway_through_its_spool(
    tmp_path, stack, django_db_blocker
):
    _server, fake, clients = stack
    spool = tmp_path / "spool"
    port = free_port()
    env = {"REDIS_URL": f"redis://127.0.0.1:{port}/0", "PORTCULLIS_AUDIT_SPOOL_DIR": str(spool)}
    redis_process = start_redis(tmp_path, port)
    try:
        server = start_server(tmp_path, VLLM_UPSTREAMS=fake.base, **env)
        served: list[str] = []
        try:
            token = client_token(server, clients["open"])
            headers = {"authorization": f"Bearer {token}"}
            request_id, response = chat_post(server, headers)
            assert response.status_code == 200  # the token is cleared with Redis: served through the outage
            time.sleep(0.3)  # its record is handed off
            stop(redis_process)
            for _ in range(5):
                request_id, response = chat_post(server, headers)
                assert response.status_code == 200  # its record waits in the process
                served.append(request_id)
        finally:
            stop(server.process)  # a stop with Redis down: what the process holds goes to the spool
        (spooled,) = spool.glob("audit-*.jsonl")
        held = spooled.read_text()
        assert token not in held
        assert all(request_id in held for request_id in served)

        redis_process = start_redis(tmp_path, port)  # a new, empty Redis
        server = start_server(tmp_path, VLLM_UPSTREAMS=fake.base, **env)
        try:
            deadline = time.monotonic() + 10
            while spooled.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not spooled.exists()  # adopted, handed off, deleted
        finally:
            stop(server.process)
        stream_ingest(redis.Redis(port=port))
        assert set(served) <= set(UsageRecord.objects.values_list("request_id", flat=True))
        kinds = list(AuditEvent.objects.values_list("kind", flat=True))
        assert kinds.count("gateway.audit_spooled") == 1
        assert kinds.count("gateway.audit_spool_adopted") == 1
        assert AuditEvent.objects.get(kind="gateway.audit_spooled").data["records"] >= 5
    finally:
        stop(redis_process)


def capped_chat(words: int, **extra: Any) -> dict[str, Any]:
    """A chat of ``words`` prompt tokens as fakevllm counts them (one a word), with no max_tokens."""
    return {"model": "m1", "messages": [{"role": "user", "content": "word " * words}], **extra}


@pytest.mark.parametrize("stream", [False, True])
def test_a_cap_filled_in_that_overflows_the_context_is_lowered_to_what_the_context_leaves(stack, stream):
    # vLLM refuses a max_tokens that overflows the context with the prompt; the client set none, so the
    # gateway's own fill must not turn "until the context ends" into a refusal
    server, fake, clients = stack
    fake.reset()
    token = client_token(server, clients["capped"], "completions models.read")
    wait_policy(server, token)
    headers = {"authorization": f"Bearer {token}"}
    url = f"{server.base}/v1/chat/completions"
    answer = httpx.post(url, json=capped_chat(1000, stream=stream), headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text
    if stream:
        assert answer.text.rstrip().endswith("data: [DONE]")
    sent = [body for body in fake.state()["last_bodies"] if "messages" in body]
    assert [body.get("max_tokens") for body in sent] == [3500, None, 3096]  # the chat, /tokenize, again
    # a chat whose prompt alone fills the context: vLLM's refusal, saying where the max_tokens came from
    fake.reset()
    refused = httpx.post(url, json=capped_chat(4200, stream=stream), headers=headers, timeout=10)
    assert refused.status_code == 400
    assert "maximum context length" in refused.json()["error"]["message"]
    assert "this client's cap of 3500 was sent" in refused.json()["error"]["message"]
    # a client's own max_tokens is its own: refused as vLLM refuses it, and not sent again
    fake.reset()
    own = httpx.post(url, json=capped_chat(1000, stream=stream, max_tokens=3500), headers=headers, timeout=10)
    assert own.status_code == 400
    assert "cap of" not in own.json()["error"]["message"]
    assert fake.served() == 1
