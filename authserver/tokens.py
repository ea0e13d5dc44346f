"""RFC 9068 JWT access tokens, minted by DOT through ``ACCESS_TOKEN_GENERATOR``.

The token carries ``typ: at+jwt`` and the signing key's ``kid`` in its header, and ``iss``, ``sub``,
``aud``, ``client_id``, ``scope``, ``jti``, ``iat`` and ``exp`` in its claims. The ``jti`` is left on the
oauthlib request so the validator records it with the token row (that is what revocation pushes).
What a token says is read back here too: RFC 7662 introspection answers, and ID tokens sent as hints.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from datetime import datetime
from typing import Any

import jwt
from django.conf import settings
from django.utils import timezone
from jwt import PyJWK
from oauth2_provider.settings import oauth2_settings

from authserver.selectors import access_token_live, signing_key_active, signing_keys_published

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


def id_token_hint_claims(token: str) -> dict[str, Any] | None:
    """The claims of an ID token this server issued, or None: signed under a published key (as
    ``jwt_signed_by_published_key``), typed as DOT types its ID tokens (``finalize_id_token``: ``JWT``; an
    access token is ``at+jwt``, an audit checkpoint something else again), with our ``iss`` and a ``sub``.
    Its ``exp`` is not checked: OIDC Core §3.1.2.1 and RP-Initiated Logout §2 let a client send an expired
    ID token as a hint. The row DOT kept for it is not needed, nor read: a refresh or a revocation deletes
    it while the token it stood for still names its user and client truthfully."""
    if len(token) > ID_TOKEN_HINT_MAX or not jwt_signed_by_published_key(token):
        return None
    if jwt.get_unverified_header(token).get("typ") != "JWT":  # verified above
        return None
    claims = jwt_unverified_claims(token)  # verified above
    if claims.get("iss") != settings.PORTCULLIS_ISSUER or not isinstance(claims.get("sub"), str):
        return None
    return claims


def id_token_hint_subject(token: str) -> str | None:
    """The ``sub`` of an ID token this server issued (``id_token_hint_claims``), or None."""
    claims = id_token_hint_claims(token)
    return None if claims is None else str(claims["sub"])


# RFC 7662 §2.2 members an answer copies from the access token itself: the same values every gateway reads
# in it (RFC 9068 §2.2), so that introspection and the token never disagree. ``nbf`` is left out: the
# token carries none (it is valid from ``iat``).
INTROSPECTED_CLAIMS = ("iss", "sub", "aud", "client_id", "scope", "jti", "iat", "exp")


def access_token_introspection(token: str, *, now: datetime | None = None) -> dict[str, Any]:
    """Describe a token as RFC 7662 §2.2 asks: ``{"active": false}`` alone unless it is one of our live
    access tokens, else what the token carries (``INTROSPECTED_CLAIMS``: its ``sub`` is the user's id, or
    for a client's own token the client id, as ``access_token_claims`` set it), ``token_type`` (RFC 6749
    §7.1: ``Bearer``, as the token endpoint said) and, for a user's token, ``username``.

    Live: signed under a published key (a token under a revoked key is refused by every gateway), its row
    still there (revocation deletes it) and unexpired by the row and by its own ``exp``, and its client not
    disabled. A refresh token is answered inactive, as anything else that is not an access token (RFC 7662
    §2.2 lets a server decline to describe a token to a caller): only the authorization server reads one,
    and the callers are resource servers, which never hold one (RFC 6749 §1.5, §10.4). A refresh token in
    a resource server's hands has leaked, and its description would tell whoever holds it that it works.
    """
    inactive: dict[str, Any] = {"active": False}
    now = now or timezone.now()
    if not jwt_signed_by_published_key(token):
        return inactive
    row = access_token_live(token=token, now=now)
    claims = jwt_unverified_claims(token)  # verified above
    expires = claims.get("exp")
    if row is None or not isinstance(expires, int) or expires <= now.timestamp():
        return inactive
    if row.application is not None and row.application.disabled:
        return inactive  # every gateway refuses it (the disabled client is pushed to them)
    answer: dict[str, Any] = {"active": True, "token_type": "Bearer"}
    answer.update({name: claims[name] for name in INTROSPECTED_CLAIMS if name in claims})
    if row.user is not None:
        # RFC 7662 §2.2's human-readable name of the resource owner: for the resource servers an admin let
        # introspect, which DOT's answer gave them before (``sub`` stays the opaque id the token carries)
        answer["username"] = row.user.get_username()
    return answer
