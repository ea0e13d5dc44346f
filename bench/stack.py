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
Every process is started in its own session, so stopping it (by its process group id) also stops what
it spawned.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis
from psycopg import sql

from bench import proc

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
MANAGE_TIMEOUT_S = 180.0
AUDIT_STREAM = "portcullis:audit"  # audit.sink.STREAM; read here without importing Django
CLIENT_SCOPE = "models.read completions embeddings"
TOKEN_ATTEMPTS, TOKEN_RETRY_S = 30, 0.5
# Generous but real limits, so the Lua reservation (GCRA, tokens, concurrency) runs on every request;
# the token limit is the largest the policy's integer column holds.
POLICY_LIMITS = ("--rpm", "100000000", "--tpm", "2000000000", "--concurrency", "100000")
SCRUBBED_ENV_PREFIXES = ("DJANGO_", "PORTCULLIS_", "VLLM_", "CELERY_", "PYTEST_")
SCRUBBED_ENV = frozenset({"DATABASE_URL", "REDIS_URL", "REDIS_URL_BASE"})


class StackError(Exception):
    """The stack could not be started as asked (the message says why)."""


@dataclass(frozen=True)
class StackOptions:
    """How to build the stack."""

    log_dir: Path
    pg_url: str = "postgres://postgres:postgres@127.0.0.1:5432"
    db_name: str = "portcullis_bench"
    redis_url: str | None = None  # None: start the harness's own redis-server on the other core
    redis_db: int = 14
    tokens: int = 16
    paced_chunk_ms: float = 10.0
    worker: bool = True
    # False: the worker is stopped (SIGSTOP) during each measurement and ingests between them; True: it
    # ingests during them too, on the load generator's and the fakes' core
    ingest_live: bool = False
    bare: bool = True  # also start the bare proxy (bench.bareproxy), the floor the gateway is compared with
    limits: bool = True  # False: the client's policy sets no limit (the script then only checks revocation)
    access_token_alg: str = "ES256"  # noqa: S105 (an algorithm name, not a secret)
    redis_reply_wait_us: int | None = None  # PORTCULLIS_REDIS_REPLY_WAIT_US of the gateway; None: its default
    gateway_core: int | None = 1  # None: unpinned
    other_core: int | None = 0
    # True: the harness's own Redis shares the gateway's core instead of the load generator's (an experiment:
    # the Redis hop becomes a switch between two processes on one core, and the gateway's core pays for
    # Redis's work; bench/README.md, session 18)
    redis_on_gateway_core: bool = False


@dataclass
class Service:
    """One process the harness started."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    port: int | None = None

    @property
    def base(self) -> str:
        """The service's base URL."""
        return f"http://127.0.0.1:{self.port}"


def free_port(taken: set[int]) -> int:
    """Return a loopback port the kernel just handed out, distinct from those already chosen."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in taken:
            taken.add(port)
            return port
    raise StackError("could not find a free port")


def port_check_free(port: int) -> None:
    """Refuse to go on if something listens on (or holds) the port."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise StackError(f"port {port} on 127.0.0.1 is taken; refusing to run") from None


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
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(SCRUBBED_ENV_PREFIXES) and k not in SCRUBBED_ENV
        }
        upstreams = {
            model: f"http://127.0.0.1:{self.ports[name]}" for model, name in (("m1", "fast"), ("m2", "paced"))
        }
        env.update(
            # The production profile (DEBUG off: no query log, JSON logs), as behind a TLS-terminating
            # proxy: the issuer is https, the harness speaks plain HTTP on loopback, so no redirect.
            DJANGO_DEBUG="false",
            DJANGO_SETTINGS_MODULE="config.settings",
            DJANGO_SECRET_KEY=self._secret_key,
            DJANGO_ALLOWED_HOSTS="127.0.0.1",
            DJANGO_SECURE_SSL_REDIRECT="false",
            PORTCULLIS_KEY_ENCRYPTION_KEY=self._secret_key,
            DATABASE_URL=f"{self.options.pg_url}/{self.options.db_name}",
            REDIS_URL=self._redis_url(),
            PORTCULLIS_ISSUER=f"https://127.0.0.1:{self.ports['gateway']}",
            PORTCULLIS_EMBEDDED_BEAT="0",
            PORTCULLIS_ACCESS_TOKEN_ALG=self.options.access_token_alg,
            PORTCULLIS_VAR_DIR=str(self.options.log_dir / "var"),
            VLLM_UPSTREAMS=",".join(upstreams.values()),
            BENCH_BARE_UPSTREAMS=",".join(f"{model}={base}" for model, base in upstreams.items()),
            PYTHONUNBUFFERED="1",
        )
        if self.options.redis_reply_wait_us is not None:
            env["PORTCULLIS_REDIS_REPLY_WAIT_US"] = str(self.options.redis_reply_wait_us)
        return env

    def _redis_url(self) -> str:
        base = self.options.redis_url or f"redis://127.0.0.1:{self.ports['redis']}"
        return f"{base}/{self.options.redis_db}"

    def _redis(self) -> redis.Redis:
        return redis.Redis.from_url(self._redis_url(), socket_timeout=5)

    def _spawn(self, name: str, argv: list[str], core: int | None, port: int | None = None) -> Service:
        if port is not None:
            port_check_free(port)
        prefix = ["taskset", "-c", str(core)] if core is not None else []
        log = self.options.log_dir / f"{name}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                prefix + argv,
                cwd=ROOT,
                env=self._env(),
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopping it stops its children too
            )
        service = Service(name, process, log, port)
        self.services.append(service)
        self.pids.add(process.pid)
        return service

    def _wait_ready(self, service: Service, path: str) -> None:
        def answers() -> bool:
            try:
                return httpx.get(service.base + path, timeout=1.0).status_code == 200
            except httpx.TransportError:
                return False

        _wait_until(service, answers, service.name, f"did not answer {path}", 0.1)

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
            _wait_until(service, answers, "redis-server", "did not answer PING", 0.05)
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
        argv = [PYTHON, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--loop", "uvloop", "--http", http, "--no-access-log", "--no-proxy-headers"]
        argv += ["--log-level", "warning"]
        self._wait_ready(self._spawn(name, argv, self.options.gateway_core, port), "/healthz")

    def _worker(self) -> None:
        schedule = self.options.log_dir / "beat-schedule"
        argv = [PYTHON, "-m", "celery", "-A", "config", "worker", "--pool", "solo", "-B", "-l", "warning"]
        argv += ["--schedule", str(schedule)]
        service = self._spawn("worker", argv, self.options.other_core)
        # the first beat-driven ingest creates the consumer group
        _wait_until(service, self._ingest_group_exists, "the Celery worker", "ran no ingest", 0.2)

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
                _signal(functools.partial(os.killpg, service.process.pid, number))

    def _ingest_group_exists(self) -> bool:
        client = self._redis()
        try:
            return bool(client.xinfo_groups(AUDIT_STREAM))
        except redis.ResponseError:  # no stream yet
            return False
        finally:
            client.close()

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

    def _admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(f"{self.options.pg_url}/postgres", autocommit=True, connect_timeout=5)

    def _database_create(self) -> None:
        """Create the database empty, dropping one left by an earlier run; refuse one that is in use (another
        run's: dropping it would end that run's connections)."""
        name = sql.Identifier(self.options.db_name)
        with self._admin() as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (self.options.db_name,)
            ).fetchone()
            if row is not None and row[0]:
                raise StackError(
                    f"the database {self.options.db_name} is in use ({row[0]} connections): another "
                    "benchmark running? Give this one its own with --db-name"
                )
            try:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(name))
            except psycopg.errors.ObjectInUse as exc:  # someone connected since the check
                raise StackError(f"the database {self.options.db_name} is in use: {exc}") from exc
            conn.execute(sql.SQL("CREATE DATABASE {}").format(name))
        self._database_created = True

    def _database_drop(self) -> None:
        if not self._database_created:
            return
        with self._admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(self.options.db_name)
                )
            )
        self._database_created = False

    def usage_rows(self) -> int:
        """Return how many usage records the worker has stored."""
        url = f"{self.options.pg_url}/{self.options.db_name}"
        with psycopg.connect(url, connect_timeout=5) as conn:
            row = conn.execute("SELECT count(*) FROM audit_usagerecord").fetchone()
        return int(row[0]) if row else 0

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
        client = self._redis()
        try:
            info: dict[str, Any] = client.xinfo_stream(AUDIT_STREAM)
        except redis.ResponseError:  # no stream yet
            return {"backlog": 0, "appended": 0}
        finally:
            client.close()
        return {"backlog": int(info.get("length", 0)), "appended": int(info.get("entries-added", 0))}

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
            children = proc.descendants(service.process.pid)
            self.pids.update(children)
            _terminate(service.process, children)
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


def _wait_until(service: Service, ready: Callable[[], bool], who: str, missed: str, every_s: float) -> None:
    """Poll ``ready`` every ``every_s`` until it is true; fail if the process exits first, or after
    ``STARTUP_TIMEOUT_S``."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not ready():
        if service.process.poll() is not None:
            raise StackError(f"{who} exited at start:\n{_tail(service.log)}")
        if time.monotonic() > deadline:
            raise StackError(f"{who} {missed} within {STARTUP_TIMEOUT_S} s")
        time.sleep(every_s)


def _terminate(process: subprocess.Popen[bytes], children: list[int]) -> None:
    """Stop a process we started and its group: SIGTERM, SIGKILL after a grace period, then stragglers."""
    if process.poll() is None:
        _signal(lambda: os.killpg(process.pid, signal.SIGTERM))  # its own session: the group is its pid
        _signal(lambda: os.killpg(process.pid, signal.SIGCONT))  # a stopped worker acts on it only then
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _signal(lambda: os.killpg(process.pid, signal.SIGKILL))
            process.wait(timeout=STOP_TIMEOUT_S)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while any(proc.alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in children:  # descendants seen before the stop that outlived their parent
        if proc.alive(pid):
            _signal(functools.partial(os.kill, pid, signal.SIGKILL))


def _signal(send: Callable[[], None]) -> None:
    try:
        send()
    except ProcessLookupError:
        pass


def _tail(path: Path, size: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return ""
