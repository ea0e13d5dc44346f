"""Reads for the authorization server: the active signing key and the published key set."""

from __future__ import annotations

import threading
import time
from datetime import datetime
from functools import lru_cache
from typing import Any

from django.db.models import Q
from django.utils import timezone
from jwcrypto import jwk

from authserver.models import SigningKey

_ACTIVE_CACHE_S = 5.0  # a rotation reaches every process within this, and the new key is already published
_active_lock = threading.Lock()
_active: tuple[float, SigningKey] | None = None


def active_key_cache_clear() -> None:
    """Forget the cached active key (the rotation service calls this in its own process)."""
    global _active
    with _active_lock:
        _active = None


def signing_key_active() -> SigningKey:
    """Return the key that signs new tokens, creating the first one on a fresh install."""
    global _active
    cached = _active
    if cached is not None and time.monotonic() - cached[0] < _ACTIVE_CACHE_S:
        return cached[1]
    key = SigningKey.objects.filter(state=SigningKey.State.ACTIVE).order_by("-activated_at").first()
    if key is None:
        from authserver.services import signing_key_bootstrap

        key = signing_key_bootstrap()
    with _active_lock:
        _active = (time.monotonic(), key)
    return key


@lru_cache(maxsize=16)
def private_jwk_for(kid: str, encrypted: bytes) -> jwk.JWK:
    """Decrypt a key once per process (decrypting and parsing RSA costs milliseconds)."""
    from authserver.crypto import private_key_decrypt

    return jwk.JWK.from_pem(private_key_decrypt(encrypted))


def signing_keys_published(*, now: datetime | None = None) -> list[SigningKey]:
    """Return the keys the JWKS publishes: due pending keys, the active key and unexpired retired keys."""
    now = now or timezone.now()
    return list(
        SigningKey.objects.filter(
            Q(state=SigningKey.State.PENDING, publish_at__lte=now)
            | Q(state=SigningKey.State.ACTIVE)
            | Q(state=SigningKey.State.RETIRED)
        ).order_by("-created_at")
    )


def jwks_get(*, now: datetime | None = None) -> dict[str, Any]:
    """Return the public JWK Set (RFC 7517 §5)."""
    return {"keys": [key.public_jwk for key in signing_keys_published(now=now)]}
