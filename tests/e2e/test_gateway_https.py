"""A gateway configured as for production: it serves /v1 over HTTPS only, refusing a plain-HTTP request
with an OpenAI error and an audit record before it reads the body (a trusted proxy's X-Forwarded-Proto
counts as HTTPS), and, told its upstream compiles every tool's schema, checks every tool's."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from audit.models import AuditEvent, UsageRecord
from authserver.services import client_register
from gateway.services import policy_set
from tests.e2e.conftest import Server, client_token, stack_stop, start_fakevllm, start_server, start_worker

pytestmark = [pytest.mark.e2e, pytest.mark.django_db]
CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def https_only(
    django_db_setup: None, django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, str]]:
    tmp = tmp_path_factory.mktemp("https-only")
    fake = start_fakevllm(tmp)
    with django_db_blocker.unblock():
        reg = client_register(name="HTTPS app", grant_types=["client-credentials"])
        policy_set(client=reg.client, actor="test", allowed_models=["m1"])
    server = start_server(
        tmp,
        VLLM_UPSTREAMS=fake.base,
        PORTCULLIS_GATEWAY_REQUIRE_HTTPS="true",
        PORTCULLIS_TRUSTED_PROXIES="127.0.0.1/32",
        PORTCULLIS_UPSTREAM_STRICT_TOOLS="true",
    )
    worker = start_worker(tmp)
    try:
        yield server, client_token(server, reg)
    finally:
        stack_stop(django_db_blocker, worker, server.process, fake.process)


def _stored(django_db_blocker: Any, model: Any, request_id: str, kind: str | None = None) -> Any:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with django_db_blocker.unblock():
            rows = model.objects.filter(request_id=request_id)
            row = (rows.filter(kind=kind) if kind else rows).first()
        if row is not None:
            return row
        time.sleep(0.2)
    raise AssertionError(f"nothing stored for {request_id}")


def test_plain_http_to_v1_is_refused_with_an_openai_error_and_audited(https_only, django_db_blocker):
    server, token = https_only
    request_id = f"plain-http-{time.time_ns()}"
    response = httpx.post(
        f"{server.base}/v1/chat/completions",
        content=json.dumps(CHAT).encode(),
        headers={
            "authorization": f"Bearer {token}",
            "content-type": "application/json",
            "x-request-id": request_id,
        },
        timeout=10,
    )
    assert response.status_code == 403
    assert response.json() == {
        "error": {
            "message": "This API is served over HTTPS only: send the request (and a new access token) to https://.",
            "type": "invalid_request_error",
            "param": None,
            "code": "https_required",
        }
    }
    assert "www-authenticate" not in response.headers  # not a token's want of scope
    assert response.headers["connection"] == "close"  # refused before the body: nothing more is read
    event = _stored(django_db_blocker, AuditEvent, request_id, "gateway.denied")
    assert event.data["reason"] == "https_required"
    assert _stored(django_db_blocker, UsageRecord, request_id).status == 403
    assert token not in json.dumps(event.data)


def test_a_trusted_proxys_forwarded_proto_https_is_served(https_only):
    server, token = https_only
    headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
    response = httpx.post(
        f"{server.base}/v1/chat/completions",
        content=json.dumps(CHAT).encode(),
        headers={**headers, "x-forwarded-proto": "https"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    models = httpx.get(
        f"{server.base}/v1/models", headers={**headers, "x-forwarded-proto": "http"}, timeout=10
    )
    assert models.status_code == 403
    assert models.json()["error"]["code"] == "https_required"


def test_told_its_upstream_compiles_every_tool_the_gateway_checks_every_tools_schema(https_only):
    server, token = https_only
    loose = {"type": "function", "function": {"name": "f", "parameters": {"type": "string", "pattern": "("}}}
    response = httpx.post(
        f"{server.base}/v1/chat/completions",
        json={**CHAT, "tools": [loose]},
        headers={"authorization": f"Bearer {token}", "x-forwarded-proto": "https"},
        timeout=10,
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "tools[0].function.parameters.pattern"
