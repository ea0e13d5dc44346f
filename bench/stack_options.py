"""What can be asked of the benchmark's stack (``StackOptions``), and the environment its processes are
started with: the production profile, on loopback, with nothing of the harness's own environment that
would configure them (a ``DJANGO_``, ``PORTCULLIS_``, ``VLLM_``, ``CELERY_`` or ``PYTEST_`` variable, a
database or a Redis URL).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SCRUBBED_ENV_PREFIXES = ("DJANGO_", "PORTCULLIS_", "VLLM_", "CELERY_", "PYTEST_")
SCRUBBED_ENV = frozenset({"DATABASE_URL", "REDIS_URL", "REDIS_URL_BASE"})


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
    # put before the gateway's and the bare proxy's command line (``bench.instructions`` runs them under
    # valgrind), with this long for each to answer at start
    server_prefix: tuple[str, ...] = ()
    server_startup_timeout_s: float = 60.0


def process_env(
    options: StackOptions, ports: dict[str, int], secret_key: str, redis_url: str
) -> dict[str, str]:
    """Return the environment of every process of the stack (``ports``: each service's, by name)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(SCRUBBED_ENV_PREFIXES) and k not in SCRUBBED_ENV
    }
    upstreams = {
        model: f"http://127.0.0.1:{ports[name]}" for model, name in (("m1", "fast"), ("m2", "paced"))
    }
    env.update(
        # The production profile (DEBUG off: no query log, JSON logs), as behind a TLS-terminating
        # proxy: the issuer is https, the harness speaks plain HTTP on loopback, so no redirect.
        DJANGO_DEBUG="false",
        DJANGO_SETTINGS_MODULE="config.settings",
        DJANGO_SECRET_KEY=secret_key,
        DJANGO_ALLOWED_HOSTS="127.0.0.1",
        DJANGO_SECURE_SSL_REDIRECT="false",
        PORTCULLIS_KEY_ENCRYPTION_KEY=secret_key,
        DATABASE_URL=f"{options.pg_url}/{options.db_name}",
        REDIS_URL=redis_url,
        PORTCULLIS_ISSUER=f"https://127.0.0.1:{ports['gateway']}",
        PORTCULLIS_EMBEDDED_BEAT="0",
        PORTCULLIS_ACCESS_TOKEN_ALG=options.access_token_alg,
        PORTCULLIS_VAR_DIR=str(options.log_dir / "var"),
        VLLM_UPSTREAMS=",".join(upstreams.values()),
        BENCH_BARE_UPSTREAMS=",".join(f"{model}={base}" for model, base in upstreams.items()),
        PYTHONUNBUFFERED="1",
    )
    if options.redis_reply_wait_us is not None:
        env["PORTCULLIS_REDIS_REPLY_WAIT_US"] = str(options.redis_reply_wait_us)
    return env
