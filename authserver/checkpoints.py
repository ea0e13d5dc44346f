"""Audit checkpoints are signed with our signing keys; the audit app gets the signer through a registry."""

from __future__ import annotations

import json

from jwcrypto import jwk, jws
from jwcrypto.common import JWException

from authserver.crypto import ID_TOKEN_ALGORITHM
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


def checkpoint_verify(signature: str) -> bytes | None:
    """Return the signed payload if a checkpoint verifies against one of our keys (any state)."""
    try:
        token = jws.JWS()
        token.deserialize(signature)
        header = token.jose_header
        row = SigningKey.objects.filter(kid=header.get("kid")).first()
        if row is None or header.get("typ") != CHECKPOINT_TYPE or header.get("alg") != row.algorithm:
            return None
        token.verify(jwk.JWK(**row.public_jwk), alg=row.algorithm)
    except (JWException, ValueError, TypeError):
        return None
    return bytes(token.payload)
