"""Access-token verification on the hot path: RFC 9068 JWTs checked locally against the published keys.

One asymmetric algorithm per key, the key found by ``kid`` in our own key set, ``typ`` ``at+jwt``, exact
``iss``, ``aud`` naming the gateway, ``exp``/``nbf``/``iat`` with a small leeway, and a lifetime (``exp``
less ``iat``) no longer than the authorization server gives (RFC 8725 §3.10): a token signed with a stolen
key and a far ``exp`` would otherwise stay in the cache below past the key's removal. Any other header
parameter (``jku``, ``x5u``, ``jwk``, ``x5c``, ``crit`` …) is refused, as are ``none`` and ``HS*``. A
verified token is cached until it expires, so the signature is checked once per token per process.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import jwt
from jwt import PyJWK

from gateway.conf import GatewaySettings
from gateway.errors import AuthenticationError

logger = logging.getLogger(__name__)

ALLOWED_HEADER_PARAMS = frozenset({"alg", "typ", "kid"})
ALLOWED_ALGORITHMS = frozenset({"ES256", "RS256"})  # what our authorization server signs with (asymmetric)
ACCESS_TOKEN_TYPES = frozenset({"at+jwt", "application/at+jwt"})  # RFC 9068 §2.1
REQUIRED_CLAIMS = ["iss", "sub", "aud", "exp", "iat", "jti", "client_id"]

JwksFetcher = Callable[[], Awaitable[dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the verified claims the gateway uses."""

    jti: str
    client_id: str
    subject: str
    scopes: frozenset[str]
    exp: int

    @property
    def user(self) -> str | None:
        """The resource owner, or None for a client acting for itself (client credentials)."""
        return None if self.subject == self.client_id else self.subject


def _b64json(segment: str) -> Any:
    padded = segment + "=" * (-len(segment) % 4)
    return json.loads(base64.urlsafe_b64decode(padded))


class KeySet:
    """The published signing keys, by kid; refreshed in the background, refetched on an unknown kid."""

    def __init__(self, fetch: JwksFetcher, *, refetch_interval_s: float) -> None:
        self._fetch = fetch
        self._refetch_interval_s = refetch_interval_s
        self._keys: dict[str, PyJWK] = {}
        self._last_attempt = float("-inf")
        self._begun = 0  # fetches begun, numbered: the one begun last wins, whichever ends last (an older
        self._applied = 0  # one applied after a push's had trusted a revoked key again, until the next)
        self.loaded_at = float("-inf")
        self.on_removed: Callable[[set[str]], None] | None = None  # told the kids a load took away

    def load(self, jwks: dict[str, Any]) -> None:
        """Replace the keys from a JWK Set document; keys we cannot use are skipped."""
        keys: dict[str, PyJWK] = {}
        for raw in jwks.get("keys", []):
            kid, alg = raw.get("kid"), raw.get("alg")
            if not isinstance(kid, str) or alg not in ALLOWED_ALGORITHMS or raw.get("use", "sig") != "sig":
                continue
            try:
                keys[kid] = PyJWK(raw, algorithm=alg)
            except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
                logger.warning("skipping unusable key %s in the key set", kid)
        removed = set(self._keys) - set(keys)
        self._keys = keys
        self.loaded_at = time.monotonic()
        if removed and self.on_removed is not None:
            self.on_removed(removed)

    @property
    def loaded(self) -> bool:
        """Whether a key set has been loaded since start (as ``PolicyCache.loaded`` says of the policies)."""
        return self.loaded_at != float("-inf")

    async def refresh(self) -> bool:
        """Fetch the key set now; on failure keep serving the keys we have (stale beats none)."""
        self._last_attempt = time.monotonic()
        self._begun += 1
        ticket = self._begun
        try:
            document = await self._fetch()
            if ticket < self._applied:
                return True  # a fetch begun later was loaded: this older one would undo it
            self.load(document)
            self._applied = ticket
        except Exception:  # any fetch failure keeps the previous keys; the reason is logged
            logger.exception("key set refresh failed; serving the %d cached keys", len(self._keys))
            return False
        return True

    async def get(self, kid: str) -> PyJWK | None:
        """Return the key for a kid, refetching at most once per interval when it is unknown."""
        key = self._keys.get(kid)
        if key is None and (
            not self._keys or time.monotonic() - self._last_attempt >= self._refetch_interval_s
        ):
            await self.refresh()
            key = self._keys.get(kid)
        return key


class TokenVerifier:
    """Verify bearer tokens; cache each verified token's principal until it expires, or until the key that
    signed it leaves the key set (``rotatekeys --revoke``: it leaked, and what it signed is not to be
    trusted, from the cache either)."""

    def __init__(self, conf: GatewaySettings, keys: KeySet) -> None:
        self.conf = conf
        self.keys = keys
        self._cache: dict[str, tuple[Principal, str]] = {}  # token -> its principal, and its key's kid
        keys.on_removed = self._forget_signed_by

    async def verify(self, token: str, *, now: float | None = None) -> Principal:
        """Return the principal of a valid token or raise AuthenticationError (every failure denies)."""
        now = time.time() if now is None else now
        cached = self._cache.get(token)
        if cached is not None:
            if cached[0].exp + self.conf.leeway_s > now:
                return cached[0]
            del self._cache[token]
        principal, kid = await self._verify_uncached(token, now)
        if len(self._cache) >= self.conf.verify_cache_size:
            self._evict(now)
        self._cache[token] = principal, kid
        return principal

    def _forget_signed_by(self, kids: set[str]) -> None:
        """Drop the tokens verified with keys no longer published."""
        gone = [token for token, (_principal, kid) in self._cache.items() if kid in kids]
        for token in gone:
            del self._cache[token]
        if gone:
            logger.warning("dropped %d verified tokens whose keys were unpublished", len(gone))

    def _evict(self, now: float) -> None:
        expired = [t for t, (p, _kid) in self._cache.items() if p.exp + self.conf.leeway_s <= now]
        for token in expired:
            del self._cache[token]
        while len(self._cache) >= self.conf.verify_cache_size:
            del self._cache[next(iter(self._cache))]

    def _header(self, token: str) -> dict[str, Any]:
        if len(token) > self.conf.max_token_bytes:
            raise AuthenticationError("The access token is too large.")
        parts = token.split(".")
        if len(parts) != 3 or "=" in token:  # RFC 7515 §2: base64url without padding, one spelling per token
            raise AuthenticationError("The access token is not a signed JWT.")
        try:
            header = _b64json(parts[0])
        except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):  # deep nesting recurses
            raise AuthenticationError("The access token header is malformed.") from None
        if not isinstance(header, dict) or not set(header) <= ALLOWED_HEADER_PARAMS:
            raise AuthenticationError("The access token header carries parameters that are not accepted.")
        if not isinstance(header.get("alg"), str) or header["alg"] not in ALLOWED_ALGORITHMS:
            raise AuthenticationError("The access token algorithm is not accepted.")
        if str(header.get("typ", "")).lower() not in ACCESS_TOKEN_TYPES:
            raise AuthenticationError("The token is not an access token (typ must be at+jwt).")
        if not isinstance(header.get("kid"), str):
            raise AuthenticationError("The access token names no key.")
        return header

    async def _verify_uncached(self, token: str, now: float) -> tuple[Principal, str]:
        header = self._header(token)
        key = await self.keys.get(header["kid"])
        if key is None:
            raise AuthenticationError("The access token was signed by an unknown key.")
        if key.algorithm_name != header["alg"]:
            raise AuthenticationError("The access token algorithm does not match its key.")
        try:
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=[key.algorithm_name],
                audience=self.conf.audience,
                issuer=self.conf.issuer,
                leeway=self.conf.leeway_s,
                options={"require": REQUIRED_CLAIMS, "strict_aud": False},
            )
        except jwt.PyJWTError:
            raise AuthenticationError() from None
        issued, expires = claims["iat"], claims["exp"]
        if not isinstance(issued, int | float) or not isinstance(expires, int):
            raise AuthenticationError("The access token claims are malformed.")
        if expires - issued > self.conf.max_token_lifetime_s + self.conf.leeway_s:
            raise AuthenticationError("The access token lives longer than this server issues them for.")
        return self._principal(claims), header["kid"]

    @staticmethod
    def _principal(claims: dict[str, Any]) -> Principal:
        scope, jti, client_id, sub = (
            claims.get("scope", ""),
            claims["jti"],
            claims["client_id"],
            claims["sub"],
        )
        if not all(isinstance(v, str) for v in (scope, jti, client_id, sub)) or not isinstance(
            claims["exp"], int
        ):
            raise AuthenticationError("The access token claims are malformed.")
        return Principal(
            jti=jti, client_id=client_id, subject=sub, scopes=frozenset(scope.split()), exp=claims["exp"]
        )
