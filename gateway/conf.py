"""The gateway's knobs: one namespaced ``GATEWAY`` dict, read through a typed accessor.

The accessor caches the parsed settings and resets on ``setting_changed``, so tests can override them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver


@dataclass(frozen=True)
class GatewaySettings:
    issuer: str
    audience: str
    upstreams: tuple[str, ...]
    upstream_api_key: str
    jwks_url: str  # empty: read the key set from this deployment's database (off the hot path)
    jwks_refresh_s: float  # an unknown kid refetches at most this often
    jwks_max_age_s: float  # the key set is refreshed in the background this often
    leeway_s: int
    max_token_lifetime_s: int  # a token whose exp - iat is longer (plus leeway) is refused
    max_token_bytes: int
    max_body_bytes: int
    connect_timeout_s: float
    read_timeout_s: float
    body_read_timeout_s: float  # a client's whole request body must arrive within this
    health_interval_s: float
    max_connections: int
    revocation_stale_s: float
    verify_cache_size: int
    deny_ips: tuple[str, ...]
    require_https: bool  # /v1 only over TLS (the connection's, or a trusted proxy's X-Forwarded-Proto)
    prefix_cache_scope: str  # user, client or shared: who may share vLLM's prefix cache (cache_salt)
    upstream_strict_tools: bool  # vLLM compiles every tool's schema (VLLM_ENFORCE_STRICT_TOOL_CALLING)
    fallback_ceiling_rpm: int
    redis_reply_wait_s: float  # 0: a carried Redis batch's reply is always awaited on the event loop
    audit_backlog_limit: int  # records waiting in the audit stream before new requests are refused
    audit_buffer_limit: int  # records one process holds for the audit sink before new requests are refused
    audit_spool_dir: Path  # where a stopping process leaves what Redis did not take, for the next one


PREFIX_CACHE_SCOPES = ("user", "client", "shared")


@cache
def gateway_settings() -> GatewaySettings:
    """Return the gateway's settings (cached until a setting changes)."""
    raw: dict[str, Any] = settings.GATEWAY
    if raw["PREFIX_CACHE_SCOPE"] not in PREFIX_CACHE_SCOPES:  # a mistyped override must not mean "client"
        raise ImproperlyConfigured(
            f"GATEWAY['PREFIX_CACHE_SCOPE'] must be one of {', '.join(PREFIX_CACHE_SCOPES)}"
        )
    return GatewaySettings(
        issuer=settings.PORTCULLIS_ISSUER,
        audience=settings.PORTCULLIS_AUDIENCE,
        upstreams=tuple(raw["UPSTREAMS"]),
        upstream_api_key=raw["UPSTREAM_API_KEY"],
        jwks_url=raw["JWKS_URL"],
        jwks_refresh_s=float(raw["JWKS_REFRESH_S"]),
        jwks_max_age_s=float(raw["JWKS_MAX_AGE_S"]),
        leeway_s=int(raw["LEEWAY_S"]),
        max_token_lifetime_s=int(raw["MAX_TOKEN_LIFETIME_S"]),
        max_token_bytes=int(raw["MAX_TOKEN_BYTES"]),
        max_body_bytes=int(raw["MAX_BODY_BYTES"]),
        connect_timeout_s=float(raw["CONNECT_TIMEOUT_S"]),
        read_timeout_s=float(raw["READ_TIMEOUT_S"]),
        body_read_timeout_s=float(raw["BODY_READ_TIMEOUT_S"]),
        health_interval_s=float(raw["HEALTH_INTERVAL_S"]),
        max_connections=int(raw["MAX_CONNECTIONS"]),
        revocation_stale_s=float(raw["REVOCATION_STALE_S"]),
        verify_cache_size=int(raw["VERIFY_CACHE_SIZE"]),
        deny_ips=tuple(raw["DENY_IPS"]),
        require_https=bool(raw["REQUIRE_HTTPS"]),
        prefix_cache_scope=str(raw["PREFIX_CACHE_SCOPE"]),
        upstream_strict_tools=bool(raw["UPSTREAM_STRICT_TOOLS"]),
        fallback_ceiling_rpm=int(raw["FALLBACK_CEILING_RPM"]),
        redis_reply_wait_s=float(raw["REDIS_REPLY_WAIT_S"]),
        audit_backlog_limit=int(raw["AUDIT_BACKLOG_LIMIT"]),
        audit_buffer_limit=int(raw["AUDIT_BUFFER_LIMIT"]),
        audit_spool_dir=Path(raw["AUDIT_SPOOL_DIR"]),
    )


@receiver(setting_changed)
def _reset(setting: str, **kwargs: Any) -> None:
    if setting in {"GATEWAY", "PORTCULLIS_ISSUER", "PORTCULLIS_AUDIENCE"}:
        gateway_settings.cache_clear()
