"""Audit checkpoints are signed with our signing keys; the audit app gets the signer through a registry.

A checkpoint is evidence only if its key is ours. The key rows live in the database the checkpoints guard,
so a public key counts only when the private key sealed beside it with the key-encryption key (which is
never in the database) is its pair: whoever can rewrite audit rows can add a key row of their own, or
change a published one, but cannot seal a private key.
"""

from __future__ import annotations

import json

from jwcrypto import jwk, jws
from jwcrypto.common import JWException

from authserver.crypto import ID_TOKEN_ALGORITHM, PrivateKeyUnreadable
from authserver.models import SigningKey
from authserver.selectors import signing_key_active

CHECKPOINT_TYPE = "audit-checkpoint+jws"


def checkpoint_signature(payload: bytes) -> tuple[str, str]:
    """Sign a checkpoint payload with the active RS256 key (the family that always exists); return (kid,
    compact JWS)."""
    key = signing_key_active(ID_TOKEN_ALGORITHM)
    token = jws.JWS(payload)
    token.add_signature(
        key.private_jwk(),
        alg=key.algorithm,
        protected=json.dumps({"alg": key.algorithm, "kid": key.kid, "typ": CHECKPOINT_TYPE}),
    )
    return key.kid, token.serialize(compact=True)


def _public_key_sealed(row: SigningKey) -> jwk.JWK | None:
    """Return the row's public key if the private key sealed with our key-encryption key is its pair."""
    try:
        public, private = jwk.JWK(**row.public_jwk), row.private_jwk()
    except (PrivateKeyUnreadable, JWException, ValueError, TypeError):
        return None
    return public if public.thumbprint() == private.thumbprint() else None


def checkpoint_verify(signature: str) -> bytes | None:
    """Return the signed payload if a checkpoint verifies against one of our keys.

    Any state: a key retired and removed by rotation signed honest checkpoints while it was active, and
    they must keep verifying. So is a key revoked because it leaked: nothing in a checkpoint tells one signed
    before the leak from a forgery after it, so refusing them would break honest history, and trusting them
    means they vouch for the chain only as well as the key was kept."""
    try:
        token = jws.JWS()
        token.deserialize(signature)
        header = token.jose_header
        row = SigningKey.objects.filter(kid=header.get("kid")).first()
        if row is None or header.get("typ") != CHECKPOINT_TYPE or header.get("alg") != row.algorithm:
            return None
        public = _public_key_sealed(row)
        if public is None:
            return None
        token.verify(public, alg=row.algorithm)
    except (JWException, ValueError, TypeError):
        return None
    return bytes(token.payload)
