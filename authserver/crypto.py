"""Key material: signing-key generation (RS256 and ES256) and encryption of private keys at rest (Fernet,
from the KEK)."""

from __future__ import annotations

from functools import cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from jwcrypto import jwk

RSA_KEY_BITS = 2048  # RS256 with 2048-bit keys: NIST SP 800-57 acceptable through 2030
# Each key signs with one algorithm, and each algorithm is a family of keys that rotates on its own.
# ID tokens (and audit checkpoints) are RS256, which OIDC Discovery requires every provider to offer;
# access tokens take PORTCULLIS_ACCESS_TOKEN_ALG, ES256 by default: a P-256 token is signed in about
# 45 us here where a 2048-bit RSA one takes 280-300, the largest single cost of a client-credentials token.
ID_TOKEN_ALGORITHM = "RS256"  # noqa: S105 (an algorithm name, not a secret)
SIGNING_ALGORITHMS = ("ES256", "RS256")


class PrivateKeyUnreadable(ImproperlyConfigured):
    """A private key the key-encryption key cannot open: sealed under another one (the setting changed, or
    a replica has another value), or never sealed by this deployment at all (a forged key row)."""


@cache
def _fernet(kek: str, previous: tuple[str, ...]) -> MultiFernet:
    """The current key-encryption key first (it seals), then the ones it replaced (they only open)."""
    return MultiFernet([Fernet(key.encode()) for key in (kek, *previous)])


def _keks() -> MultiFernet:
    return _fernet(
        settings.PORTCULLIS_KEY_ENCRYPTION_KEY, tuple(settings.PORTCULLIS_KEY_ENCRYPTION_KEYS_PREVIOUS)
    )


def private_key_encrypt(pem: bytes) -> bytes:
    """Encrypt a PEM private key with the key-encryption key."""
    return _keks().encrypt(pem)


def private_key_decrypt(token: bytes) -> bytes:
    """Decrypt a private key encrypted by :func:`private_key_encrypt`, under the current key-encryption key
    or one it replaced (``PORTCULLIS_KEY_ENCRYPTION_KEY_PREVIOUS``); ``InvalidToken`` if none opens it."""
    return _keks().decrypt(token)


def private_key_reseal(token: bytes) -> bytes | None:
    """Return a private key sealed under the current key-encryption key, or None if it already is;
    ``InvalidToken`` if neither the current key nor a previous one opens it."""
    try:
        _fernet(settings.PORTCULLIS_KEY_ENCRYPTION_KEY, ()).decrypt(token)
    except InvalidToken:
        return _keks().rotate(token)
    return None


def signing_key_generate(algorithm: str) -> tuple[bytes, dict[str, str], str]:
    """Return a new key for an algorithm as (private PEM, public JWK dict, kid = RFC 7638 thumbprint)."""
    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if algorithm == "RS256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
    elif algorithm == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    else:
        raise ValueError(f"no signing keys for {algorithm!r}; one of {', '.join(SIGNING_ALGORITHMS)}")
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key = jwk.JWK.from_pem(pem)
    kid = key.thumbprint()
    public = key.export_public(as_dict=True)
    public.update({"kid": kid, "alg": algorithm, "use": "sig"})
    return pem, public, kid
