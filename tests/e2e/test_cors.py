"""End to end: browser pages calling /v1 (CORS). A page of an origin its client lists may send the preflight
and the request and read every answer; a page of another origin is refused, and a request without an Origin
(no browser) is served as before."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from authserver.models import Client
from authserver.services import RegisteredClient, client_disable, client_register, client_update
from gateway.services import policy_set
from tests.e2e.conftest import (
    FakeVllm,
    Server,
    client_token,
    committed,
    denial_reason,
    stack_stop,
    start_fakevllm,
    start_server,
    start_worker,
)

pytestmark = [pytest.mark.e2e, pytest.mark.django_db]

APP = "https://app.example"
OTHER = "https://other.example"
CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
ORIGINS = {"spa": [APP], "other": [OTHER], "server": []}


@pytest.fixture(scope="module")
def stack(
    django_db_setup: None, django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, FakeVllm, dict[str, RegisteredClient]]]:
    tmp = tmp_path_factory.mktemp("cors")
    clients: dict[str, RegisteredClient] = {}
    with django_db_blocker.unblock():
        for name, origins in ORIGINS.items():
            clients[name] = client_register(
                name=f"{name} client", grant_types=["client-credentials"], allowed_origins=origins
            )
            policy_set(client=clients[name].client, actor="test", allowed_models=["m1"])
    fake = start_fakevllm(tmp, "m1")
    server = start_server(tmp, VLLM_UPSTREAMS=fake.base)
    worker = start_worker(tmp)
    try:
        yield server, fake, clients
    finally:
        with django_db_blocker.unblock():
            Client.objects.filter(client_id__in=[c.client.client_id for c in clients.values()]).delete()
        stack_stop(django_db_blocker, worker, server.process, fake.process)


def preflight(
    server: Server, origin: str, method: str = "POST", asked: str | bytes = "authorization, content-type"
) -> httpx.Response:
    return httpx.options(
        f"{server.base}/v1/chat/completions",
        headers=[
            (b"origin", origin.encode()),
            (b"access-control-request-method", method.encode()),
            (b"access-control-request-headers", asked if isinstance(asked, bytes) else asked.encode()),
        ],
        timeout=10,
    )


def chat(server: Server, token: str, origin: str | None, **extra: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"}
    if origin is not None:
        headers["origin"] = origin
    return httpx.post(
        f"{server.base}/v1/chat/completions", json={**CHAT, **extra}, headers=headers, timeout=10
    )


def test_a_preflight_from_a_listed_origin_allows_the_method_and_the_headers_asked_for(stack):
    server, _fake, _clients = stack
    asked = "Authorization, Content-Type, X-Stainless-OS, x-stainless-retry-count"
    answer = preflight(server, APP, asked=asked)
    assert answer.status_code == 204
    assert answer.content == b""
    assert answer.headers["access-control-allow-origin"] == APP
    assert answer.headers["access-control-allow-methods"] == "POST"
    assert answer.headers["access-control-allow-headers"] == asked.lower()
    assert answer.headers["access-control-max-age"] == "600"
    assert answer.headers["vary"] == "Origin"
    assert "access-control-allow-credentials" not in answer.headers  # no cookies: a token in a header
    assert "content-length" not in answer.headers  # RFC 9110 §8.6: not on a 204
    models = httpx.options(
        f"{server.base}/v1/models",
        headers={"origin": APP, "access-control-request-method": "GET"},
        timeout=10,
    )
    assert models.status_code == 204
    assert models.headers["access-control-allow-methods"] == "GET"
    assert "access-control-allow-headers" not in models.headers  # none asked for
    assert "connection" not in models.headers  # kept alive
    with_body = httpx.request(  # never read: a client trickling it would hold the connection open
        "OPTIONS",
        f"{server.base}/v1/chat/completions",
        headers={"origin": APP, "access-control-request-method": "POST"},
        content=b"x" * 100,
        timeout=10,
    )
    assert with_body.status_code == 204
    assert with_body.headers["connection"] == "close"


def test_a_preflight_from_an_origin_no_client_lists_is_refused_without_cors_headers(stack, django_db_blocker):
    server, _fake, _clients = stack
    for origin in ("https://evil.example", "null", APP + ":8443", APP.upper()):
        answer = preflight(server, origin)
        assert answer.status_code == 403, origin
        assert answer.json()["error"]["code"] == "origin_not_allowed"
        assert "access-control-allow-origin" not in answer.headers
    assert denial_reason(django_db_blocker, answer.headers["x-request-id"]) == "origin_not_allowed"


def test_a_preflight_for_another_method_or_with_a_broken_header_list_is_refused(stack):
    server, _fake, _clients = stack
    wrong_method = preflight(server, APP, method="DELETE")
    assert wrong_method.status_code == 405
    assert wrong_method.headers["allow"] == "POST"
    assert wrong_method.headers["access-control-allow-origin"] == APP  # the page may read why
    for asked in ("authorization content-type", "x-a\u00e9".encode("latin-1"), "a," * 2000):
        broken = preflight(server, APP, asked=asked)
        assert broken.status_code == 400, asked
        assert broken.json()["error"]["param"] == "access-control-request-headers"
    plain_options = httpx.options(f"{server.base}/v1/chat/completions", headers={"origin": APP}, timeout=10)
    assert plain_options.status_code == 405  # not a preflight: OPTIONS is no method of this endpoint
    nowhere = httpx.options(
        f"{server.base}/v1/invocations",
        headers={"origin": APP, "access-control-request-method": "POST"},
        timeout=10,
    )
    assert nowhere.status_code == 404  # no endpoint, no method allowed
    assert "access-control-allow-methods" not in nowhere.headers


def test_a_page_of_its_clients_origin_reads_answers_streams_and_errors(stack):
    server, _fake, clients = stack
    token = client_token(server, clients["spa"])
    answer = chat(server, token, APP)
    assert answer.status_code == 200
    assert answer.json()["choices"]
    assert answer.headers["access-control-allow-origin"] == APP
    assert answer.headers["vary"] == "Origin"
    exposed = {h.strip() for h in answer.headers["access-control-expose-headers"].split(",")}
    assert {"x-request-id", "retry-after", "x-ratelimit-remaining-requests"} <= exposed
    with httpx.stream(
        "POST",
        f"{server.base}/v1/chat/completions",
        json={**CHAT, "stream": True},
        headers={"authorization": f"Bearer {token}", "origin": APP},
        timeout=10,
    ) as stream:
        assert stream.status_code == 200
        assert stream.headers["access-control-allow-origin"] == APP
        assert b"data: [DONE]" in b"".join(stream.iter_bytes())
    expired = chat(server, "not-a-token", APP)
    assert expired.status_code == 401  # the page can read it, and get a new token
    assert expired.headers["access-control-allow-origin"] == APP
    invalid = chat(server, token, APP, temperature="hot")
    assert invalid.status_code == 400
    assert invalid.headers["access-control-allow-origin"] == APP


def test_a_token_used_from_an_origin_its_client_does_not_list_is_refused(stack, django_db_blocker):
    server, _fake, clients = stack
    spa_token = client_token(server, clients["spa"])
    elsewhere = chat(server, spa_token, OTHER)  # listed by another client only
    assert elsewhere.status_code == 403
    assert elsewhere.json()["error"]["code"] == "origin_not_allowed"
    assert elsewhere.headers["access-control-allow-origin"] == OTHER  # listed: the page may read why
    assert denial_reason(django_db_blocker, elsewhere.headers["x-request-id"]) == "origin_not_allowed"
    server_token = client_token(server, clients["server"])  # lists no origin: never called from a page
    from_page = chat(server, server_token, APP)
    assert from_page.status_code == 403
    assert from_page.json()["error"]["code"] == "origin_not_allowed"


@pytest.mark.parametrize("origin", ["https://evil.example", "chrome-extension://abcdefghij", "null"])
def test_a_request_from_an_origin_no_client_lists_is_served_without_cors_headers(stack, origin):
    # No page of it passed a preflight: a browser extension, a desktop app, a script; a page could not
    # read the answer anyway
    server, _fake, clients = stack
    for name in ("spa", "server"):
        answer = chat(server, client_token(server, clients[name]), origin)
        assert answer.status_code == 200, (name, answer.content)
        assert "access-control-allow-origin" not in answer.headers
        assert answer.headers["vary"] == "Origin"


def test_a_request_without_an_origin_is_served_without_cors_headers(stack):
    server, _fake, clients = stack
    for name in ("spa", "server"):
        answer = chat(server, client_token(server, clients[name]), None)
        assert answer.status_code == 200
        assert "access-control-allow-origin" not in answer.headers
        assert "vary" not in answer.headers


def test_a_clients_new_origins_reach_the_gateway_without_a_restart(stack, django_db_blocker):
    server, _fake, clients = stack
    moved, dev = "https://moved.example", "http://127.0.0.1:5173"  # and its development server's page

    committed(
        django_db_blocker,
        lambda: client_update(client=clients["other"].client, actor="test", allowed_origins=f"{moved} {dev}"),
    )
    deadline = time.monotonic() + 3
    while preflight(server, moved).status_code != 204 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert preflight(server, moved).status_code == 204
    assert preflight(server, OTHER).status_code == 403
    token = client_token(server, clients["other"])
    assert chat(server, token, moved).status_code == 200
    assert preflight(server, dev).status_code == 204
    assert chat(server, token, dev).headers["access-control-allow-origin"] == dev
    dropped = chat(server, token, OTHER)  # listed by no client now: no page of it passes a preflight
    assert dropped.status_code == 200
    assert "access-control-allow-origin" not in dropped.headers
    assert chat(server, token, APP).status_code == 403  # a page of another client's origin


def test_a_disabled_clients_origins_are_no_longer_listed(stack, django_db_blocker):
    server, _fake, clients = stack
    assert preflight(server, APP).status_code == 204  # (the last test: the spa client stays disabled)

    committed(django_db_blocker, lambda: client_disable(client=clients["spa"].client, actor="test"))
    deadline = time.monotonic() + 3
    while preflight(server, APP).status_code != 403 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert preflight(server, APP).status_code == 403
