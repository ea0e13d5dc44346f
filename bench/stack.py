"""The stack under test, started and stopped by the harness: everything on 127.0.0.1, on free ports.

Two fake vLLM servers (``m1`` answers at once, ``m2`` paces its stream at 10 ms a chunk), one gateway
process (uvicorn, uvloop, httptools) serving both through ``VLLM_UPSTREAMS``, and optionally a Celery
worker with an embedded beat that ingests the usage records the gateway hands to the Redis stream, and
(unless ``--no-bare``) the bare proxy of ``bench.bareproxy``. The gateway and the bare proxy get their own
core; the fakes, the worker, the harness's own ``redis-server`` and the load generator share the other
(``taskset``), so that the gateway is alone on its core as issue 7 sets it up: a Redis left to the kernel
runs where the gateway's writes wake it, on the gateway's core. ``--redis-url`` uses a running Redis
instead, unpinned. The harness owns a PostgreSQL database, created empty and dropped again, and a Redis
database, flushed before and after (its own Redis keeps nothing: no snapshot, no append-only file).

What can be asked of the stack, and what its processes are told, is in ``bench.stack_options``; how a
process is started, waited for and stopped in ``bench.spawn``; the database, and what the harness reads
from it and from Redis, in ``bench.stack_data``.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field

import httpx
import psycopg
import redis

from bench import proc
from bench.spawn import PYTHON, ROOT, Service, StackError, free_port, spawn, wait_until
from bench.stack_data import (
    audit_stream_state,
    database_create,
    database_drop,
    ingest_group_exists,
    redis_connect,
    usage_rows_count,
)
from bench.stack_options import StackOptions, process_env

__all__ = ["Credentials", "Service", "Stack", "StackError", "StackOptions"]  # what the harness builds on

logger = logging.getLogger(__name__)

MANAGE_TIMEOUT_S = 180.0
CLIENT_SCOPE = "models.read completions embeddings"
TOKEN_ATTEMPTS, TOKEN_RETRY_S = 30, 0.5
# Generous but real limits, so the Lua reservation (GCRA, tokens, concurrency) runs on every request;
# the token limit is the largest the policy's integer column holds.
POLICY_LIMITS = ("--rpm", "100000000", "--tpm", "2000000000", "--concurrency", "100000")


@dataclass
class Credentials:
    """The benchmark client."""

    client_id: str
    client_secret: str

    def basic(self) -> str:
        """Return the HTTP Basic credentials (RFC 6749 §2.3.1)."""
        raw = f"{self.client_id}:{self.client_secret}".encode()
        return "Basic " + base64.b64encode(raw).decode()


@dataclass
class Stack:
    """Start, query and stop the processes, the database and the Redis database of one benchmark."""

    options: StackOptions
    services: list[Service] = field(default_factory=list)
    pids: set[int] = field(default_factory=set)
    ports: dict[str, int] = field(default_factory=dict)
    credentials: Credentials | None = None
    _secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(48))
    _database_created: bool = False

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- start -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Create the database, start the fakes, set up the client and its policy, start the gateway."""
        taken: set[int] = set()
        names = ["fast", "paced", "gateway", *(["bare"] if self.options.bare else [])]
        if self.options.redis_url is None:
            names.append("redis")
        self.ports = {name: free_port(taken) for name in names}
        self._database_create()
        if self.options.redis_url is None:
            self._redis_server()
        self._redis().flushdb()
        self._fakevllm("fast", "m1", [])
        self._fakevllm("paced", "m2", ["--chunk-delay-ms", str(self.options.paced_chunk_ms)])
        self._manage("migrate", "--noinput")
        created = json.loads(
            self._manage(
                "createclient",
                "--name",
                "bench",
                "--grant",
                "client-credentials",
                "--json",
                "--scope",
                CLIENT_SCOPE,
            )
        )
        self.credentials = Credentials(created["client_id"], created["client_secret"])
        limits = POLICY_LIMITS if self.options.limits else ()
        self._manage("setpolicy", self.credentials.client_id, "--models", "m1,m2", *limits)
        self._gateway()
        if self.options.bare:
            self._bare()
        if self.options.worker:
            self._worker()

    def service(self, name: str) -> Service:
        """Return a started service by name."""
        for service in self.services:
            if service.name == name:
                return service
        raise KeyError(name)

    def _env(self) -> dict[str, str]:
        return process_env(self.options, self.ports, self._secret_key, self._redis_url())

    def _redis_url(self) -> str:
        base = self.options.redis_url or f"redis://127.0.0.1:{self.ports['redis']}"
        return f"{base}/{self.options.redis_db}"

    def _redis(self) -> redis.Redis:
        return redis_connect(self._redis_url())

    def _spawn(self, name: str, argv: list[str], core: int | None, port: int | None = None) -> Service:
        service = spawn(name, argv, core, port, env=self._env(), log_dir=self.options.log_dir)
        self.services.append(service)
        self.pids.add(service.process.pid)
        return service

    def _wait_ready(self, service: Service, path: str, timeout_s: float = 60.0) -> None:
        def answers() -> bool:
            try:
                return httpx.get(service.base + path, timeout=1.0).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(service, answers, service.name, f"did not answer {path}", 0.1, timeout_s)

    def _fakevllm(self, name: str, model: str, extra: list[str]) -> None:
        port = self.ports[name]
        argv = [PYTHON, "-m", "fakevllm", "--port", str(port), "--models", model]
        argv += ["--tokens", str(self.options.tokens), *extra]
        self._wait_ready(self._spawn(name, argv, self.options.other_core, port), "/health")

    def _redis_server(self) -> None:
        """The harness's own Redis, keeping nothing on disk, on the other core (or the gateway's if asked)."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise StackError("redis-server is not installed (bin/services installs it); or pass --redis-url")
        port = self.ports["redis"]
        argv = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
        argv += ["--dir", str(self.options.log_dir)]
        core = self.options.gateway_core if self.options.redis_on_gateway_core else self.options.other_core
        service = self._spawn("redis", argv, core, port)
        client = self._redis()

        def answers() -> bool:
            try:
                return bool(client.ping())
            except (redis.ConnectionError, redis.TimeoutError):
                return False

        try:
            wait_until(service, answers, "redis-server", "did not answer PING", 0.05)
        finally:
            client.close()

    def _gateway(self) -> None:
        # served as deployed: httptools, with uvicorn's own refusals audited (config/protocol.py)
        self._uvicorn("gateway", "config.asgi:application", "config.protocol:AuditedHttpToolsProtocol")

    def _bare(self) -> None:
        """The bare proxy, served as the gateway is, on its core (each idles while the other is measured)."""
        self._uvicorn("bare", "bench.bareproxy:application")

    def _uvicorn(self, name: str, app: str, http: str = "httptools") -> None:
        """Serve an ASGI application on the gateway's core: uvloop, httptools, no access log."""
        port = self.ports[name]
        argv = [*self.options.server_prefix, PYTHON, "-m", "uvicorn", app, "--host", "127.0.0.1"]
        argv += ["--port", str(port), "--loop", "uvloop", "--http", http, "--no-access-log"]
        argv += ["--no-proxy-headers", "--no-server-header", "--log-level", "warning"]
        service = self._spawn(name, argv, self.options.gateway_core, port)
        self._wait_ready(service, "/healthz", self.options.server_startup_timeout_s)

    def _worker(self) -> None:
        schedule = self.options.log_dir / "beat-schedule"
        argv = [PYTHON, "-m", "celery", "-A", "config", "worker", "--pool", "solo", "-B", "-l", "warning"]
        argv += ["--schedule", str(schedule)]
        service = self._spawn("worker", argv, self.options.other_core)
        # the first beat-driven ingest creates the consumer group
        ingested = functools.partial(ingest_group_exists, self._redis_url())
        wait_until(service, ingested, "the Celery worker", "ran no ingest", 0.2)

    def ingest_pause(self) -> None:
        """Stop the Celery worker (its embedded beat too) until ``ingest_resume``: usage records wait in
        the stream meanwhile. Nothing happens without a worker, or when the stack was asked to ingest live."""
        self._worker_signal(signal.SIGSTOP)

    def ingest_resume(self) -> None:
        self._worker_signal(signal.SIGCONT)

    def _worker_signal(self, number: signal.Signals) -> None:
        if self.options.ingest_live:
            return
        for service in self.services:
            if service.name == "worker" and service.process.poll() is None:
                service.send_signal(number)

    def _manage(self, *args: str) -> str:
        try:
            done = subprocess.run(
                [PYTHON, "manage.py", *args],
                cwd=ROOT,
                env=self._env(),
                capture_output=True,
                timeout=MANAGE_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise StackError(f"manage.py {args[0]} took longer than {MANAGE_TIMEOUT_S} s") from None
        if done.returncode != 0:
            raise StackError(f"manage.py {args[0]} failed:\n{done.stderr.decode(errors='replace')[-2000:]}")
        return done.stdout.decode()

    # --- database ----------------------------------------------------------------------------------

    def _database_create(self) -> None:
        """Create the database empty (refusing one in use), to be dropped again at the stop."""
        database_create(self.options.pg_url, self.options.db_name)
        self._database_created = True

    def _database_drop(self) -> None:
        if self._database_created:
            database_drop(self.options.pg_url, self.options.db_name)
            self._database_created = False

    def usage_rows(self) -> int:
        """Return how many usage records the worker has stored."""
        return usage_rows_count(self.options.pg_url, self.options.db_name)

    # --- queries -----------------------------------------------------------------------------------

    def access_token(self) -> str:
        """Get a fresh access token with the client credentials grant (they live 300 s).

        Retried for a while: right after the token scenario the authorization server may still be short
        of database connections.
        """
        assert self.credentials is not None  # noqa: S101  (start() set it)
        problem = ""
        for _ in range(TOKEN_ATTEMPTS):
            try:
                response = httpx.post(
                    self.service("gateway").base + "/oauth/token/",
                    auth=(self.credentials.client_id, self.credentials.client_secret),
                    data={"grant_type": "client_credentials", "scope": CLIENT_SCOPE},
                    timeout=10.0,
                )
            except httpx.HTTPError as exc:
                problem = repr(exc)
            else:
                if response.status_code == 200:
                    return str(response.json()["access_token"])
                problem = f"{response.status_code}: {response.text[:300]}"
            time.sleep(TOKEN_RETRY_S)
        raise StackError(f"no access token after {TOKEN_ATTEMPTS} attempts; last answer {problem}")

    def audit_stream(self) -> dict[str, int]:
        """Return the audit stream's backlog (XLEN) and how many entries were ever appended."""
        return audit_stream_state(self._redis_url())

    def wait_audit_drained(
        self, timeout_s: float, *, appended_at_least: int = 0, stored_at_least: int = 0
    ) -> float:
        """Wait (at most timeout_s) until the audit stream holds at least ``appended_at_least`` entries ever
        appended (the gateway hands records off within a few ms of the answer, not before it) and the
        worker, when there is one, has ingested them all and stored at least ``stored_at_least`` usage
        records (the stream carries audit events too, so its count alone can be reached early); return
        the seconds waited."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            stream = self.audit_stream()
            if stream["appended"] >= appended_at_least and (
                not self.options.worker or (stream["backlog"] == 0 and self.usage_rows() >= stored_at_least)
            ):
                break
            time.sleep(0.2)
        return round(time.monotonic() - started, 2)

    # --- stop --------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every process (newest first), then drop the database and flush the Redis database (the
        harness's own Redis, stopped with the rest, took its data with it)."""
        for service in reversed(self.services):
            service.stop(self.pids)
        self.services.clear()
        try:
            self._database_drop()
            if self.options.redis_url is not None:
                self._redis().flushdb()
        except (psycopg.Error, redis.RedisError) as exc:
            logger.warning("cleanup of the benchmark database failed: %s", exc)

    def leftover_pids(self) -> list[int]:
        """Return the started processes (and their descendants) that are still alive."""
        return sorted(pid for pid in self.pids if proc.alive(pid))
