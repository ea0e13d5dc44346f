"""Scenario 7: the gateway's token verification measured in process, cold (a new token each time) and cached.

The verifier is the gateway's own ``TokenVerifier`` over a ``KeySet`` loaded with locally generated keys'
public JWKs, one per algorithm the authorization server signs access tokens with (ES256, its default, and
RS256); tokens are RFC 9068 access tokens signed with PyJWT, as the authorization server signs them.
Signing happens before the clock starts; only ``verify`` is timed. Signing is timed too, apart, since it
is the authorization server's share of every token.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from audit.sink import BACKLOG_LIMIT, BUFFER_LIMIT
from authserver.crypto import signing_key_generate
from gateway.auth import KeySet, TokenVerifier
from gateway.conf import GatewaySettings
from gateway.redisbatch import REPLY_WAIT_S

ISSUER = "http://127.0.0.1:8000"
AUDIENCE = ISSUER + "/v1"
ALGORITHMS = ("ES256", "RS256")  # the default first: its figures are the report's headline rows
SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _signing_key(algorithm: str) -> tuple[SigningKey, dict[str, Any]]:
    """A key as the authorization server makes one (``authserver.crypto``), and its public JWK."""
    pem, public, _kid = signing_key_generate(algorithm)
    private = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(private, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)  # noqa: S101  (RS256, ES256)
    return private, public  # the key object, parsed once: parsing a PEM private key costs ~30 ms a token


def _settings(cache_size: int) -> GatewaySettings:
    return GatewaySettings(
        issuer=ISSUER,
        audience=AUDIENCE,
        upstreams=(),
        upstream_api_key="",
        jwks_url="",
        jwks_refresh_s=30.0,
        jwks_max_age_s=60.0,
        leeway_s=30,
        max_token_lifetime_s=300,
        max_token_bytes=8192,
        max_body_bytes=1 << 20,
        connect_timeout_s=5.0,
        read_timeout_s=600.0,
        body_read_timeout_s=30.0,
        health_interval_s=5.0,
        max_connections=1024,
        revocation_stale_s=60.0,
        verify_cache_size=cache_size,
        deny_ips=(),
        require_https=False,
        prefix_cache_scope="user",
        upstream_strict_tools=False,
        fallback_ceiling_rpm=600,
        redis_reply_wait_s=REPLY_WAIT_S,
        audit_backlog_limit=BACKLOG_LIMIT,
        audit_buffer_limit=BUFFER_LIMIT,
        audit_spool_dir=Path("unused"),  # no runtime is built here: nothing is spooled
    )


def _tokens(private: SigningKey, public: dict[str, Any], count: int) -> tuple[list[str], float]:
    """Sign ``count`` tokens; return them and the seconds the signing took."""
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": "bench", "aud": AUDIENCE, "client_id": "bench", "scope": "completions"}
    headers = {"typ": "at+jwt", "kid": public["kid"]}
    started = time.perf_counter()
    tokens = [
        jwt.encode(
            {**claims, "jti": uuid.uuid4().hex, "iat": now, "exp": now + 300}, private, public["alg"], headers
        )
        for _ in range(count)
    ]
    return tokens, time.perf_counter() - started


async def _no_fetch() -> dict[str, Any]:
    raise RuntimeError("the key set is loaded up front; the benchmark never fetches")


async def _one_algorithm(algorithm: str, *, cold: int, cached: int) -> dict[str, float]:
    private, public = _signing_key(algorithm)
    tokens, sign_s = _tokens(private, public, cold + 1)
    keys = KeySet(_no_fetch, refetch_interval_s=30.0)
    keys.load({"keys": [public]})
    verifier = TokenVerifier(_settings(cache_size=cold + 16), keys)
    started = time.perf_counter()
    for token in tokens[:cold]:
        await verifier.verify(token)
    cold_s = time.perf_counter() - started
    repeated = tokens[cold]
    await verifier.verify(repeated)  # the first call fills the cache
    started = time.perf_counter()
    for _ in range(cached):
        await verifier.verify(repeated)
    cached_s = time.perf_counter() - started
    return {
        "cold_us": round(cold_s / cold * 1e6, 2),
        "cached_us": round(cached_s / cached * 1e6, 3),
        "sign_us": round(sign_s / (cold + 1) * 1e6, 2),
    }


async def jwt_verify_bench(*, cold: int, cached: int) -> dict[str, float]:
    """Return microseconds per verification, cold (every token new) and cached (one token again), and per
    signature, for each algorithm: ES256's as ``cold_us`` …, RS256's as ``rs256_cold_us`` …"""
    result: dict[str, float] = {"cold_n": cold, "cached_n": cached}
    for algorithm in ALGORITHMS:
        prefix = "" if algorithm == ALGORITHMS[0] else f"{algorithm.lower()}_"
        figures = await _one_algorithm(algorithm, cold=cold, cached=cached)
        result.update({prefix + name: value for name, value in figures.items()})
    return result
