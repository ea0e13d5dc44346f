"""Shared fixtures: users, clients, an OAuth helper for the Django test client, and Redis."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from django.conf import settings
from django.test import Client as HttpClient

from authserver.models import Client
from authserver.revocation import local_revocations
from authserver.selectors import active_key_cache_clear, private_jwk_for, private_signing_key_for
from authserver.services import RegisteredClient, client_register, signing_family_notes_forget

REDIRECT_URI = "https://app.example.com/callback"


@pytest.fixture(scope="session", autouse=True)
def _redis_per_worker(worker_id: str) -> None:
    """Give each xdist worker its own Redis database (settings load before xdist names the worker)."""
    base = os.environ.get("REDIS_URL_BASE", "redis://127.0.0.1:6379")
    number = 0 if worker_id == "master" else int(worker_id.removeprefix("gw"))
    settings.REDIS_URL = f"{base}/{1 + number % 15}"


@pytest.fixture(autouse=True)
def _isolate_process_state() -> None:
    active_key_cache_clear()
    signing_family_notes_forget()
    private_jwk_for.cache_clear()
    private_signing_key_for.cache_clear()
    local_revocations.__init__()  # type: ignore[misc]


@pytest.fixture
def redis_client() -> redis.Redis:
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.flushdb()
    return client


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[str, redis.Redis, Path]]:
    """A Redis server of the test's own: its URL, a client, and its (removable) directory."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    directory = tmp_path / "redis"
    directory.mkdir()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        + ["--dir", str(directory)],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0", client, directory
    finally:
        client.close()
        process.terminate()
        process.wait(10)


@pytest.fixture
def make_client(db: None) -> Callable[..., RegisteredClient]:
    def make(
        *,
        grants: tuple[str, ...] = ("client-credentials",),
        public: bool = False,
        scopes: str = "models.read completions embeddings",
        redirect_uris: tuple[str, ...] = (),
        name: str = "Test app",
        **extra: Any,
    ) -> RegisteredClient:
        if "authorization-code" in grants and not redirect_uris:
            redirect_uris = (REDIRECT_URI,)
        return client_register(
            name=name,
            grant_types=list(grants),
            public=public,
            scopes=scopes.split(),
            redirect_uris=list(redirect_uris),
            **extra,
        )

    return make


@pytest.fixture
def alice(django_user_model: Any) -> Any:
    return django_user_model.objects.create_user("alice", "alice@example.com", "correct horse battery")


def basic_auth(client_id: str, secret: str | None) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret or ''}".encode()).decode()


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


@dataclass
class OAuthDriver:
    """Drives the authorization server's endpoints through Django's test client."""

    http: HttpClient

    def token(self, data: dict[str, str], auth: tuple[str, str | None] | None = None, **headers: Any) -> Any:
        if auth:
            headers["HTTP_AUTHORIZATION"] = basic_auth(*auth)
        return self.http.post("/oauth/token/", data, **headers)

    def client_credentials(self, reg: RegisteredClient, scope: str = "models.read completions") -> Any:
        return self.token(
            {"grant_type": "client_credentials", "scope": scope}, (reg.client.client_id, reg.client_secret)
        )

    def authorize(
        self,
        client: Client,
        *,
        challenge: str,
        scope: str = "models.read",
        method: str = "S256",
        allow: bool = True,
        redirect_uri: str = REDIRECT_URI,
        state: str = "xyz",
    ) -> Any:
        params = {
            "response_type": "code",
            "client_id": client.client_id,
            "redirect_uri": redirect_uri,
            "scope": scope,
            "state": state,
            "code_challenge": challenge,
            "code_challenge_method": method,
        }
        page = self.http.get("/oauth/authorize/", params)
        if page.status_code != 200:
            return page
        form = dict(params)
        if allow:
            form["allow"] = "Allow"
        return self.http.post("/oauth/authorize/", form)

    def code_from(self, response: Any) -> str:
        assert response.status_code == 302, response.content
        query = parse_qs(urlsplit(response["Location"]).query)
        return query["code"][0]

    def code_exchange(
        self,
        reg: RegisteredClient,
        code: str,
        verifier: str,
        redirect_uri: str = REDIRECT_URI,
        **headers: Any,
    ) -> Any:
        data = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": verifier,
        }
        if reg.client_secret is None:
            data["client_id"] = reg.client.client_id
            return self.token(data, **headers)
        return self.token(data, (reg.client.client_id, reg.client_secret), **headers)

    def code_tokens(self, reg: RegisteredClient, scope: str, **headers: Any) -> Any:
        """The token endpoint's answer to a code issued with PKCE for ``scope`` to the signed-in user."""
        verifier, challenge = pkce_pair()
        code = self.code_from(self.authorize(reg.client, challenge=challenge, scope=scope))
        return self.code_exchange(reg, code, verifier, **headers)


@pytest.fixture
def oauth(client: HttpClient) -> OAuthDriver:
    return OAuthDriver(http=client)


EMBEDDED_PREAMBLE = """
import django
django.setup()
from django.core.management import call_command
from django.db import connection
if not RETURNING:  # as SQLite before 3.35, which Django 5.2 still supports
    features = type(connection.features)
    features.can_return_columns_from_insert = False
    features.can_return_rows_from_bulk_insert = False
assert connection.features.can_return_columns_from_insert is RETURNING
call_command("migrate", verbosity=0)
"""


def asgi_get_scope(path: str, *, headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    """The ASGI scope of a GET of ``path`` (query included) as uvicorn builds it."""
    path, _, query = path.partition("?")
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": [(b"host", b"testserver"), *(headers or [])],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }


def django_asgi_get(path: str, *, headers: list[tuple[bytes, bytes]] | None = None) -> list[dict[str, Any]]:
    """GET ``path`` from Django's own ASGI handler, as uvicorn would (warnings are errors here); return the
    messages it sent. Its database work runs in threads of its own: the test needs ``transaction=True``."""
    from django.core.handlers.asgi import ASGIHandler

    scope = asgi_get_scope(path, headers=headers)
    requests = [{"type": "http.request", "body": b"", "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if requests:
            return requests.pop()
        return await asyncio.get_running_loop().create_future()  # the client stays: Django cancels this

    async def send(message: Mapping[str, Any]) -> None:
        sent.append(dict(message))

    asyncio.run(ASGIHandler()(scope, receive, send))
    return sent


def environ_unconfigured() -> dict[str, str]:
    """This process's environment without what configures Portcullis, for a child that the test configures."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "PORTCULLIS_", "REDIS_URL"))}


def embedded_sqlite_run(
    tmp_path: Path, code: str, *, returning: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a new process on the embedded default (SQLite in tmp_path, no Redis), migrated."""
    env = environ_unconfigured()
    env.update(
        DJANGO_SETTINGS_MODULE="config.settings",
        DJANGO_DEBUG="true",
        DATABASE_URL=f"sqlite:///{tmp_path / 'embedded.sqlite3'}",
        PORTCULLIS_VAR_DIR=str(tmp_path / "var"),
    )
    script = f"RETURNING = {returning!r}\n" + EMBEDDED_PREAMBLE + code
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )


def self_signed_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """Write a self-signed P-256 certificate for ``name`` and its key into ``directory``; return the paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path
