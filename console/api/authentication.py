"""Admin API authentication: an access token from this authorization server, or a staff session.

A bearer token is verified the way the gateway verifies tokens (RFC 9068 / RFC 8725): the key taken from
our own JWKS by ``kid``, the header's ``alg`` exactly that key's algorithm (ES256 or RS256),
``typ: at+jwt``, exact ``iss`` and ``aud``, no key-carrying or ``crit`` headers, a size cap. Then its
``jti`` must still have a row (a revoked token has none), and its client must be enabled and marked
administrative. Every failure denies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jwt
from django.conf import settings
from django.utils import timezone
from rest_framework import authentication, exceptions

from audit.context import VIA_CLIENT_ATTR
from authserver.crypto import SIGNING_ALGORITHMS
from authserver.models import AccessToken
from authserver.selectors import jwks_get

MAX_TOKEN_BYTES = 8192
FORBIDDEN_HEADERS = frozenset({"jku", "x5u", "jwk", "x5c", "crit"})
LEEWAY_S = 30  # clock skew tolerated on exp/iat, as at the gateway


@dataclass(frozen=True)
class AdminToken:
    """A verified admin access token: who holds it and what it may do."""

    client_id: str
    scopes: frozenset[str]
    user: Any  # the resource owner for user-delegated tokens, else None
    jti: str


class ClientPrincipal:
    """``request.user`` for a client-credentials token: the client itself, never staff."""

    is_authenticated = True
    is_anonymous = False
    is_active = True
    is_staff = False
    is_superuser = False

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id

    def get_username(self) -> str:
        return f"client:{self.client_id}"

    def __str__(self) -> str:
        return self.get_username()


def _invalid(description: str) -> exceptions.AuthenticationFailed:
    return exceptions.AuthenticationFailed(f"invalid_token: {description}")


def access_token_verify(raw: str) -> AdminToken:
    """Verify an admin bearer token; raise ``AuthenticationFailed`` on any doubt."""
    if len(raw) > MAX_TOKEN_BYTES:
        raise _invalid("token too large")
    try:
        header = jwt.get_unverified_header(raw)
    except jwt.PyJWTError:
        raise _invalid("malformed token") from None
    alg = header.get("alg")
    if alg not in SIGNING_ALGORITHMS or header.get("typ") != "at+jwt" or FORBIDDEN_HEADERS & header.keys():
        raise _invalid("unacceptable token header")
    keys = {key.get("kid"): key for key in jwks_get()["keys"]}
    if header.get("kid") not in keys:
        raise _invalid("unknown key")
    if keys[header["kid"]].get("alg") != alg:
        raise _invalid("the algorithm is not the key's")
    try:
        public = jwt.PyJWK.from_dict(keys[header["kid"]], algorithm=alg)
        claims = jwt.decode(
            raw,
            key=public.key,
            algorithms=[alg],
            audience=settings.PORTCULLIS_AUDIENCE,
            issuer=settings.PORTCULLIS_ISSUER,
            leeway=LEEWAY_S,
            options={"require": ["exp", "iat", "iss", "aud", "jti", "client_id"]},
        )
    except jwt.PyJWTError:
        raise _invalid("signature or claims did not verify") from None
    row = (
        AccessToken.objects.select_related("application", "user")
        .filter(jti=str(claims["jti"]), expires__gt=timezone.now())
        .first()
    )
    if row is None or row.application is None or row.application.client_id != claims["client_id"]:
        raise _invalid("token revoked or unknown")
    if row.application.disabled or not row.application.is_admin_client:
        raise _invalid("client may not use the admin API")
    if row.user is not None and not row.user.is_active:
        raise _invalid("user is locked")
    return AdminToken(
        client_id=row.application.client_id,
        scopes=frozenset(row.scope.split()),
        user=row.user,
        jti=claims["jti"],
    )


class AdminBearerAuthentication(authentication.BaseAuthentication):
    """``Authorization: Bearer <access token>`` (RFC 6750 §2.1) with admin scopes."""

    def authenticate(self, request: Any) -> tuple[Any, AdminToken] | None:
        header = authentication.get_authorization_header(request).decode("latin-1")
        scheme, _, raw = header.partition(" ")
        if scheme.lower() != "bearer":
            return None
        raw = raw.strip()
        if not raw:
            raise _invalid("empty bearer token")
        token = access_token_verify(raw)
        if token.user is not None:  # the user acts, through this app: the audit records name both
            setattr(request._request, VIA_CLIENT_ATTR, token.client_id)
        return (token.user or ClientPrincipal(token.client_id)), token

    def authenticate_header(self, request: Any) -> str:
        return 'Bearer realm="portcullis-admin"'


class StaffSessionAuthentication(authentication.SessionAuthentication):
    """A signed-in console session; DRF enforces CSRF on every unsafe method."""

    def enforce_csrf(self, request: Any) -> None:
        # Django's check reads a form's csrfmiddlewaretoken from request.POST. On DRF's request that parses
        # the body with this API's parsers, which take JSON only: a cross-site form post was answered 415
        # before the CSRF and permission checks ran, and neither refusal was audited. Django's own request
        # reads a form as a form (and a JSON body not at all).
        super().enforce_csrf(request._request)
