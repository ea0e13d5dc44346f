"""A gateway process started while its key set could not be read (the database down) answers a valid token
with a fast 503 ``api_error``, not a 401 "signed by an unknown key" after a pool timeout per request; one
load attempt runs at a time, in the background; and it says it is not ready until the key set and the
policies have loaded once."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest
from django.db import OperationalError

from gateway import runtime as runtime_module
from gateway.conf import gateway_settings
from gateway.consumers.base import GatewayConsumer
from gateway.errors import AuthenticationError
from gateway.runtime import NotReady, Runtime
from tests.gateway.test_auth import AUD, ISS, PUBLIC, claims, token


class KeySource:
    """The key set's source: down (each fetch waits, as for a pool connection, then fails) until told up."""

    def __init__(self, wait_s: float) -> None:
        self.wait_s = wait_s
        self.up = False
        self.fetches = 0

    async def __call__(self) -> dict[str, Any]:
        self.fetches += 1
        await asyncio.sleep(self.wait_s)
        if not self.up:
            raise OperationalError("couldn't get a connection after 2.00 sec")
        return {"keys": [PUBLIC]}


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch, settings: Any) -> None:
    settings.PORTCULLIS_ISSUER, settings.PORTCULLIS_AUDIENCE = ISS, AUD
    monkeypatch.setattr(runtime_module, "FIRST_LOAD_RETRY_S", 0.01)
    monkeypatch.setattr(runtime_module, "FIRST_LOAD_WAIT_S", 0.05)


async def authenticate(rt: Runtime, raw: str) -> Any:
    """What a /v1 consumer does with a bearer token (``GatewayConsumer.authenticate``)."""
    consumer: Any = SimpleNamespace(
        scope={"query_string": b""},
        headers={b"authorization": f"Bearer {raw}".encode()},
        rt=rt,
        principal=None,
        client_ip="127.0.0.1",
        cors_origin=None,
    )
    return await GatewayConsumer.authenticate(consumer, "completions")


async def probe_answer(path: str) -> tuple[int, bytes]:
    """What a probe path answers (config.asgi, before Django) in this process."""
    from config.asgi import http

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await http({"type": "http", "path": path, "method": "GET"}, None, send)
    return sent[0]["status"], sent[1]["body"]


def test_a_process_that_never_loaded_its_keys_answers_a_fast_503_and_loads_them_once_at_a_time(quick):
    async def scenario() -> None:
        rt = Runtime(gateway_settings())
        source = KeySource(wait_s=0.5)
        rt.keys._fetch = source
        rt.policies.replace({})  # the policies loaded; the key set did not (at start: down)
        assert not await rt.keys.refresh()
        assert not rt.ready
        source.wait_s = 3.0  # the attempt under way outlasts every bound below, however slow the machine
        rt._tasks.append(asyncio.create_task(rt._first_load_loop()))
        for _ in range(500):  # until a load attempt is under way (it takes 3 s, as a pool's wait)
            if rt._first_load is not None:
                break
            await asyncio.sleep(0.01)
        raw = token(claims())
        started = time.monotonic()
        answers = await asyncio.gather(*(authenticate(rt, raw) for _ in range(12)), return_exceptions=True)
        waited = time.monotonic() - started
        assert all(isinstance(a, NotReady) for a in answers), answers
        refused = answers[0]
        assert isinstance(refused, NotReady)
        assert (refused.status, refused.type, refused.code) == (503, "api_error", "gateway_not_ready")
        assert refused.headers == {"retry-after": "1"}
        assert not any(isinstance(a, AuthenticationError) for a in answers)
        assert waited < 1.5  # about FIRST_LOAD_WAIT_S (0.05 s), not the attempt's 3 s, nor 12 of them
        assert source.fetches == 2  # the one at start, and the one attempt under way that all shared
        source.up, source.wait_s = True, 0
        for _ in range(500):  # the attempt under way ends (3 s), then the next one loads
            if rt.ready:
                break
            await asyncio.sleep(0.02)
        assert rt.ready
        principal = await authenticate(rt, raw)
        assert principal.client_id == "c1"
        await rt.stop()

    asyncio.run(scenario())


def test_between_attempts_a_request_is_refused_at_once_without_starting_a_load(quick):
    async def scenario() -> None:
        rt = Runtime(gateway_settings())
        source = KeySource(wait_s=0)
        rt.keys._fetch = source
        rt.policies.replace({})
        raw = token(claims())
        started = time.monotonic()
        with pytest.raises(NotReady):
            await authenticate(rt, raw)
        assert time.monotonic() - started < 0.05
        assert source.fetches == 0  # the background loop's to try, not each request's
        await rt.stop()

    asyncio.run(scenario())


def test_a_preflight_before_the_origins_have_loaded_is_a_503_not_a_refusal_of_the_origin(quick):
    async def scenario() -> None:
        rt = Runtime(gateway_settings())
        rt.keys._fetch = KeySource(wait_s=0)
        consumer: Any = SimpleNamespace(rt=rt, cors_origin=None, headers={})
        with pytest.raises(NotReady):  # the origins load with the policies: a listed one may be refused
            await GatewayConsumer._preflight(consumer)
        await rt.stop()

    asyncio.run(scenario())


def test_the_process_is_ready_once_keys_and_policies_have_both_loaded(quick, monkeypatch):
    async def scenario() -> None:
        rt = Runtime(gateway_settings())
        source = KeySource(wait_s=0)
        source.up = True
        rt.keys._fetch = source
        policy_reads: list[bool] = []

        async def policies_down_then_up() -> bool:
            policy_reads.append(True)
            if len(policy_reads) < 3:
                return False  # as PolicyCache.reload on a database that is down
            rt.policies.replace({})
            return True

        monkeypatch.setattr(rt.policies, "reload", policies_down_then_up)
        monkeypatch.setattr(runtime_module, "_runtime", rt)
        assert await rt.keys.refresh()
        assert not rt.ready
        assert await probe_answer("/readyz") == (503, b'{"status":"starting"}')
        assert await probe_answer("/healthz") == (200, b'{"status":"ok"}')  # alive: not one to restart
        loop = asyncio.create_task(rt._first_load_loop())
        await asyncio.wait_for(loop, timeout=2)  # it ends once ready
        assert rt.ready
        assert await probe_answer("/readyz") == (200, b'{"status":"ok"}')
        assert len(policy_reads) == 3
        await rt.stop()

    asyncio.run(scenario())
