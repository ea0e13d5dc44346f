"""Key material: RSA key generation and encryption of private keys at rest (Fernet, from the KEK)."""

from __future__ import annotations

from functools import cache

from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from django.conf import settings
from jwcrypto import jwk

RSA_KEY_BITS = 2048  # RS256 with 2048-bit keys: NIST SP 800-57 acceptable through 2030


@cache
def _fernet(kek: str) -> Fernet:
    return Fernet(kek.encode())


def private_key_encrypt(pem: bytes) -> bytes:
    """Encrypt a PEM private key with the key-encryption key."""
    return _fernet(settings.PORTCULLIS_KEY_ENCRYPTION_KEY).encrypt(pem)


def private_key_decrypt(token: bytes) -> bytes:
    """Decrypt a private key encrypted by :func:`private_key_encrypt`."""
    return _fernet(settings.PORTCULLIS_KEY_ENCRYPTION_KEY).decrypt(token)


def rsa_key_generate() -> tuple[bytes, dict[str, str], str]:
    """Return a new RSA key as (private PEM, public JWK dict, kid = RFC 7638 thumbprint)."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key = jwk.JWK.from_pem(pem)
    kid = key.thumbprint()
    public = key.export_public(as_dict=True)
    public.update({"kid": kid, "alg": "RS256", "use": "sig"})
    return pem, public, kid
