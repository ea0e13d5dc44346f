"""Start the real stack for end-to-end tests: uvicorn on a free port, on the test PostgreSQL and Redis."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import connection

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up within {timeout} s")


def stack_env(**extra: str) -> dict[str, str]:
    db = connection.settings_dict
    env = dict(os.environ)
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "config.test_settings",
            "DJANGO_DEBUG": "true",
            "DJANGO_SECRET_KEY": settings.SECRET_KEY,
            "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
            "REDIS_URL": settings.REDIS_URL,
            "PORTCULLIS_EMBEDDED_BEAT": "0",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


@dataclass
class Server:
    base: str
    process: subprocess.Popen[bytes]
    log: Path


def start_server(tmp: Path, **env: str) -> Server:
    return start_server_on(tmp, free_port(), **env)


def start_server_on(tmp: Path, port: int, **env: str) -> Server:
    """Start uvicorn on this port (a restart: the tokens the server issued name its address as ``iss``)."""
    base = f"http://127.0.0.1:{port}"
    log = tmp / f"uvicorn-{port}.log"
    with log.open("wb") as sink:
        process = _spawn(port, base, sink, env)
    try:
        wait_http(f"{base}/healthz")
    except RuntimeError:
        stop(process)
        raise RuntimeError(log.read_text()) from None
    return Server(base=base, process=process, log=log)


def _spawn(port: int, base: str, sink: Any, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "config.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--loop",
            "uvloop",
            "--http",
            "config.protocol:AuditedHttpToolsProtocol",
            "--no-proxy-headers",
            "--no-server-header",
        ],
        cwd=ROOT,
        env=stack_env(**{"PORTCULLIS_ISSUER": base, **env}),
        stdout=sink,
        stderr=subprocess.STDOUT,
    )


def stop(process: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """Stop a process, and, when it leads a session of its own (``start_new_session``), whatever it started:
    a Celery worker's embedded beat is a child process, which a worker killed after the timeout left
    running with its database connections open (the next test database could then not be created)."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if getattr(process, "own_session", False):
        with contextlib.suppress(ProcessLookupError):  # nothing left in the group: all gone
            os.killpg(process.pid, signal.SIGKILL)


def stack_stop(django_db_blocker: Any, *processes: subprocess.Popen[bytes]) -> None:
    """End a module's stack: stop its processes in order (the worker first), then empty the database the
    module's tests wrote to outside any test transaction."""
    for process in processes:
        stop(process)
    with django_db_blocker.unblock():
        call_command("flush", interactive=False, verbosity=0)


@dataclass
class FakeVllm:
    base: str
    process: subprocess.Popen[bytes]

    def state(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.base}/_fake/state", timeout=5).json())

    def configure(self, **fields: Any) -> None:
        httpx.post(f"{self.base}/_fake/config", json=fields, timeout=5).raise_for_status()

    def reset(self) -> None:
        httpx.post(f"{self.base}/_fake/reset", timeout=5).raise_for_status()
        self.configure(
            tokens=16, chunk_delay_s=0.0, first_chunk_delay_s=0.0, fail_after_chunks=None, refuse=False
        )

    def served(self) -> int:
        """Requests that reached the upstream other than the gateway's own health and model discovery."""
        by_path = self.state()["requests_by_path"]
        return sum(count for path, count in by_path.items() if path not in {"/health", "/v1/models"})


def start_fakevllm(tmp: Path, models: str = "m1,m2,embed-1", *extra: str) -> FakeVllm:
    port = free_port()
    log = tmp / f"fakevllm-{port}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "fakevllm", "--port", str(port), "--models", models, *extra],
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/health")
    except RuntimeError:
        stop(process)
        raise RuntimeError(log.read_text()) from None
    return FakeVllm(base=base, process=process)


def start_worker(tmp: Path) -> subprocess.Popen[bytes]:
    """A real Celery worker with an embedded beat (-B): it ingests what the gateway hands off."""
    log = tmp / "celery.log"
    with log.open("wb") as sink:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "config",
                "worker",
                "-B",
                "--pool",
                "solo",
                "-l",
                "warning",
                "--schedule",
                str(tmp / "beat-schedule"),
            ],
            cwd=ROOT,
            env=stack_env(),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its embedded beat is stopped with it (``stop``)
        )
    worker.own_session = True  # type: ignore[attr-defined]
    return worker


@pytest.fixture(scope="module")
def server(
    django_db_setup: None, django_db_blocker: object, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("e2e"))
    yield srv
    stop(srv.process)
    text = srv.log.read_text()
    assert "Traceback" not in text, text


def client_token(server: Server, reg: Any, scope: str = "completions models.read") -> str:
    """Get an access token for a registered client with client credentials, over HTTP."""
    response = httpx.post(
        f"{server.base}/oauth/token/",
        data={"grant_type": "client_credentials", "scope": scope},
        auth=(reg.client.client_id, str(reg.client_secret)),
        timeout=10,
    )
    response.raise_for_status()
    return str(response.json()["access_token"])


def denial_reason(django_db_blocker: Any, request_id: str, timeout: float = 15.0) -> str:
    """The reason of the gateway.denied event a request left in the audit log (once ingested)."""
    from audit.models import AuditEvent

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with django_db_blocker.unblock():
            event = AuditEvent.objects.filter(kind="gateway.denied", request_id=request_id).first()
        if event is not None:
            return str(event.data["reason"])
        time.sleep(0.2)
    raise AssertionError(f"no gateway.denied event for {request_id} after {timeout} s")


def committed(django_db_blocker: Any, change: Any) -> None:
    """Run a change on a database connection of its own, committed as an admin's change is (so that its
    on-commit push goes out and the servers see it), outside the test's transaction."""

    def run() -> None:
        try:
            change()
        finally:
            connection.close()

    with django_db_blocker.unblock():
        worker = threading.Thread(target=run)
        worker.start()
        worker.join()


def usage_row(django_db_blocker: Any, request_id: str, timeout: float = 15.0) -> Any:
    """The usage record a request left (once ingested)."""
    from audit.models import UsageRecord

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with django_db_blocker.unblock():
            row = UsageRecord.objects.filter(request_id=request_id).first()
        if row is not None:
            return row
        time.sleep(0.2)
    raise AssertionError(f"no usage record for {request_id} after {timeout} s")
