"""End to end: a revocation outlives the processes that were told about it. A gateway that starts after a
token was revoked or its client disabled refuses them, on the embedded default (SQLite, no Redis: the
pushes lived in the process that stopped) and on Redis restarted empty (its keys gone)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from django.core.management import call_command

from authserver.services import client_register
from gateway.services import policy_set
from tests.e2e.conftest import (
    ROOT,
    Server,
    client_token,
    free_port,
    stack_env,
    start_fakevllm,
    start_server,
    start_server_on,
    stop,
)
from tests.e2e.test_policy import start_redis

pytestmark = [pytest.mark.e2e, pytest.mark.django_db]

CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


def calls(server: Server, token: str) -> tuple[int, int]:
    """The gateway's answers to a model list and a chat completion with this token."""
    headers = {"authorization": f"Bearer {token}"}
    models = httpx.get(f"{server.base}/v1/models", headers=headers, timeout=10)
    chat = httpx.post(f"{server.base}/v1/chat/completions", json=CHAT, headers=headers, timeout=10)
    return models.status_code, chat.status_code


def restart(server: Server, tmp: Path, **env: str) -> Server:
    """Stop the server (if it runs) and start it again on its port, with none of the old process's memory."""
    stop(server.process)
    assert "Traceback" not in server.log.read_text(), server.log.read_text()  # the new one writes over it
    return start_server_on(tmp, int(server.base.rsplit(":", 1)[1]), **env)


def revoke(server: Server, reg: Any, token: str) -> None:
    auth = (reg.client.client_id, str(reg.client_secret))
    response = httpx.post(f"{server.base}/oauth/revoke/", data={"token": token}, auth=auth, timeout=10)
    assert response.status_code == 200


def introspect(server: Server, reg: Any, token: str) -> dict[str, Any]:
    auth = (reg.client.client_id, str(reg.client_secret))
    response = httpx.post(f"{server.base}/oauth/introspect/", data={"token": token}, auth=auth, timeout=10)
    return dict(response.json())


def manage(*args: str, **env: str) -> str:
    """Run a management command in a process of its own (``bin/manage``), on the stack's settings."""
    done = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=stack_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def client_disable_elsewhere(client_id: str, **env: str) -> None:
    """Disable a client from another process, as an administrator's command would."""
    manage(
        "shell",
        "-c",
        "from authserver.models import Client; from authserver.services import client_disable; "
        f"client_disable(client=Client.objects.get(client_id={client_id!r}), actor='test')",
        **env,
    )


class Embedded:
    """One embedded-default installation: a SQLite file and a var/ folder, no Redis."""

    def __init__(self, tmp: Path) -> None:
        self.env = {
            "DATABASE_URL": f"sqlite:///{tmp / 'embedded.sqlite3'}",
            "REDIS_URL": "",
            "PORTCULLIS_VAR_DIR": str(tmp / "var"),
        }

    def manage(self, *args: str) -> str:
        return manage(*args, **self.env)

    def client(self, name: str, *extra: str) -> Any:
        """Register a client with ``createclient``; return it shaped as ``client_register`` returns one."""
        made = json.loads(
            self.manage("createclient", "--name", name, "--grant", "client-credentials", "--json", *extra)
        )
        return SimpleNamespace(
            client=SimpleNamespace(client_id=made["client_id"]), client_secret=made["client_secret"]
        )


def test_the_embedded_default_refuses_after_a_restart_what_was_revoked_before_it(tmp_path):
    install = Embedded(tmp_path)
    install.manage("migrate", "--noinput", "-v", "0")
    install.manage("setpolicy", "--default", "--models", "m1")
    kept, revoker, disabled = (
        install.client("kept", "--introspect"),
        install.client("revoker"),
        install.client("disabled"),
    )
    fake = start_fakevllm(tmp_path, "m1")
    server = start_server(tmp_path, VLLM_UPSTREAMS=fake.base, **install.env)
    try:
        token, disabled_token = client_token(server, revoker), client_token(server, disabled)
        assert calls(server, token) == (200, 200)
        revoke(server, revoker, token)
        assert calls(server, token) == (401, 401)  # the push, within the process
        # Another process (bin/manage, a second server) disables a client: recorded in the database.
        client_disable_elsewhere(disabled.client.client_id, **install.env)
        server = restart(server, tmp_path, VLLM_UPSTREAMS=fake.base, **install.env)
        assert calls(server, token) == (401, 401)
        assert calls(server, disabled_token) == (401, 401)
        assert introspect(server, kept, token) == {"active": False}
        assert calls(server, client_token(server, kept)) == (200, 200)  # the others still served
    finally:
        stop(server.process)
        stop(fake.process)
    assert "Traceback" not in server.log.read_text(), server.log.read_text()


@pytest.fixture(scope="module")
def committed(django_db_setup: None, django_db_blocker: Any) -> Iterator[dict[str, Any]]:
    """Clients and the default policy, committed before any test transaction so the servers see them."""
    with django_db_blocker.unblock():
        policy_set(client=None, actor="test", allowed_models=["m1"])
        clients = {
            name: client_register(name=name, grant_types=["client-credentials"])
            for name in ("revoker", "disabled")
        }
    yield clients
    with django_db_blocker.unblock():
        call_command("flush", interactive=False, verbosity=0)


def test_a_gateway_started_after_redis_restarted_empty_still_refuses_what_was_revoked(tmp_path, committed):
    port = free_port()
    redis_url = f"redis://127.0.0.1:{port}/0"
    redis_process = start_redis(tmp_path, port)
    fake = start_fakevllm(tmp_path, "m1")
    server = start_server(tmp_path, VLLM_UPSTREAMS=fake.base, REDIS_URL=redis_url)
    reg, disabled = committed["revoker"], committed["disabled"]
    try:
        token, disabled_token = client_token(server, reg), client_token(server, disabled)
        assert calls(server, token) == (200, 200)
        revoke(server, reg, token)
        client_disable_elsewhere(disabled.client.client_id, REDIS_URL=redis_url)
        assert calls(server, token) == (401, 401)
        assert calls(server, disabled_token) == (401, 401)
        stop(server.process)
        stop(redis_process)  # it keeps nothing on disk: it starts again empty
        redis_process = start_redis(tmp_path, port)
        server = restart(server, tmp_path, VLLM_UPSTREAMS=fake.base, REDIS_URL=redis_url)
        assert calls(server, token) == (401, 401)
        assert calls(server, disabled_token) == (401, 401)
        assert calls(server, client_token(server, reg)) == (200, 200)
    finally:
        for process in (server.process, fake.process, redis_process):
            stop(process)
    assert "Traceback" not in server.log.read_text(), server.log.read_text()
