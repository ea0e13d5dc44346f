"""RFC 9068 JWT access tokens, minted by DOT through ``ACCESS_TOKEN_GENERATOR``.

The token carries ``typ: at+jwt`` and the signing key's ``kid`` in its header, and ``iss``, ``sub``,
``aud``, ``client_id``, ``scope``, ``jti``, ``iat`` and ``exp`` in its claims. The ``jti`` is left on the
oauthlib request so the validator records it with the token row (that is what revocation pushes).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from typing import Any

import jwt
from django.conf import settings
from jwt import PyJWK
from oauth2_provider.settings import oauth2_settings

from authserver.selectors import signing_key_active, signing_keys_published

ID_TOKEN_HINT_MAX = 8192  # characters: one of our ID tokens is under 2 KB; a longer hint is not ours


def access_token_claims(request: Any, *, now: int, lifetime_s: int, jti: str) -> dict[str, Any]:
    """Return the RFC 9068 §2.2 claims for the token being issued on this oauthlib request."""
    client = request.client
    user = getattr(request, "user", None)
    subject = str(user.pk) if user is not None and getattr(user, "pk", None) else client.client_id
    return {
        "iss": settings.PORTCULLIS_ISSUER,
        "sub": subject,
        "aud": settings.PORTCULLIS_AUDIENCE,
        "client_id": client.client_id,
        "scope": " ".join(request.scopes or []),
        "jti": jti,
        "iat": now,
        "exp": now + lifetime_s,
    }


def access_token_generate(request: Any, refresh_token: bool = False) -> str:
    """Mint a signed access token for an oauthlib request (DOT's ACCESS_TOKEN_GENERATOR hook)."""
    key = signing_key_active(settings.AUTHSERVER["ACCESS_TOKEN_ALGORITHM"], borrow=True)
    jti = str(uuid.uuid4())
    lifetime_s = int(oauth2_settings.ACCESS_TOKEN_EXPIRE_SECONDS)
    claims = access_token_claims(request, now=int(time.time()), lifetime_s=lifetime_s, jti=jti)
    # PyJWT over the cached ``cryptography`` key: about 45 us per ES256 token here and 280-300 us per RS256
    # token (jwcrypto's JWT took 440); ``python -m bench.run --scenarios jwt`` measures both.
    token = jwt.encode(
        claims, key.private_signing_key(), algorithm=key.algorithm, headers={"typ": "at+jwt", "kid": key.kid}
    )
    request.access_token_jti = jti
    return token


def jwt_unverified_claims(token: str) -> dict[str, Any]:
    """Read the claims of a JWT this server just minted, without verifying it (never for input)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error):
        return {}
    return claims if isinstance(claims, dict) else {}


def jwt_signed_by_published_key(token: str) -> bool:
    """Whether a JWT's signature verifies under the published key its ``kid`` names, in that key's one
    algorithm: what a gateway checks before it believes anything in a token. False for a key revoked
    (``rotatekeys --revoke``), removed or never ours, whatever the token's row says."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        return False
    key = next((k for k in signing_keys_published() if k.kid == header.get("kid")), None)
    if key is None or header.get("alg") != key.algorithm:
        return False
    try:
        jwt.PyJWS().decode_complete(
            token, key=PyJWK(key.public_jwk, algorithm=key.algorithm).key, algorithms=[key.algorithm]
        )
    except (jwt.PyJWTError, ValueError, TypeError):
        return False
    return True


def id_token_hint_subject(token: str) -> str | None:
    """The ``sub`` of an ID token this server issued, or None: signed under a published key (as
    ``jwt_signed_by_published_key``), with our ``iss``, and not an access token. Its ``exp`` is not
    checked: OIDC Core §3.1.2.1 lets a client send an expired ID token as ``id_token_hint``."""
    if len(token) > ID_TOKEN_HINT_MAX or not jwt_signed_by_published_key(token):
        return None
    if jwt.get_unverified_header(token).get("typ") == "at+jwt":  # verified above; RFC 9068 §2.1
        return None
    claims = jwt_unverified_claims(token)  # verified above
    subject = claims.get("sub")
    if claims.get("iss") != settings.PORTCULLIS_ISSUER or not isinstance(subject, str):
        return None
    return subject
