"""Token verification on the hot path, with keys the test controls."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from gateway.auth import KeySet, TokenVerifier
from gateway.conf import gateway_settings
from gateway.errors import AuthenticationError

ISS, AUD = "https://auth.example", "https://auth.example/v1"


def _key() -> tuple[bytes, dict[str, Any]]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = json.loads(RSAAlgorithm.to_jwk(private.public_key()))
    public.update({"kid": "k1", "alg": "RS256", "use": "sig"})
    return pem, public


PEM, PUBLIC = _key()
EC_PRIVATE = ec.generate_private_key(ec.SECP256R1())  # the authorization server's default family, ES256
EC_PUBLIC = {
    **json.loads(ECAlgorithm.to_jwk(EC_PRIVATE.public_key())),
    "kid": "e1",
    "alg": "ES256",
    "use": "sig",
}


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {
        "iss": ISS,
        "sub": "c1",
        "aud": AUD,
        "client_id": "c1",
        "scope": "completions",
        "jti": "j1",
        "iat": now,
        "exp": now + 300,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def token(payload: dict[str, Any] | None = None, **header: Any) -> str:
    head = {"typ": "at+jwt", "kid": "k1", **header}
    return jwt.encode(payload or claims(), PEM, algorithm=head.pop("alg", "RS256"), headers=head)


def hs256_with_public_key() -> str:
    """The classic key-confusion forgery: HMAC-sign with the public key an attacker can read."""
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "at+jwt", "kid": "k1"}).encode())
    body = b64(json.dumps(claims()).encode())
    public_pem = json.dumps(PUBLIC).encode()
    signature = hmac.new(public_pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(signature)}"


class Fetcher:
    def __init__(self, jwks: dict[str, Any]) -> None:
        self.jwks = jwks
        self.calls = 0

    async def __call__(self) -> dict[str, Any]:
        self.calls += 1
        return self.jwks


@pytest.fixture
def verifier(settings) -> tuple[TokenVerifier, Fetcher]:
    settings.PORTCULLIS_ISSUER, settings.PORTCULLIS_AUDIENCE = ISS, AUD
    fetcher = Fetcher({"keys": [PUBLIC, EC_PUBLIC]})
    keys = KeySet(fetcher, refetch_interval_s=30)
    return TokenVerifier(gateway_settings(), keys), fetcher


def verify(v: TokenVerifier, raw: str) -> Any:
    return asyncio.run(v.verify(raw))


def test_a_valid_token_gives_its_principal_and_is_verified_once(verifier):
    v, fetcher = verifier
    raw = token()
    first = verify(v, raw)
    assert (first.client_id, first.jti, first.scopes, first.user) == (
        "c1",
        "j1",
        frozenset({"completions"}),
        None,
    )
    assert verify(v, raw) is first  # served from the cache
    assert fetcher.calls == 1


def test_a_token_living_longer_than_the_server_issues_them_is_refused_however_well_signed(verifier):
    # a key stolen and used to sign a far exp: cached, such a token outlived the key's removal
    v, _ = verifier
    now = int(time.time())
    longest = v.conf.max_token_lifetime_s + v.conf.leeway_s
    assert verify(v, token(claims(iat=now, exp=now + longest))).jti == "j1"  # on the bound
    for jti, iat, exp in [("j2", now, now + longest + 1), ("j3", now - 86_400, now + 60)]:
        with pytest.raises(AuthenticationError, match="lives longer"):
            verify(v, token(claims(jti=jti, iat=iat, exp=exp)))


def test_a_key_that_leaves_the_key_set_takes_the_tokens_it_signed_out_of_the_cache(verifier):
    v, fetcher = verifier
    rsa_signed = token()
    ec_signed = jwt.encode(
        claims(jti="e"), EC_PRIVATE, algorithm="ES256", headers={"typ": "at+jwt", "kid": "e1"}
    )
    assert (verify(v, rsa_signed).jti, verify(v, ec_signed).jti) == ("j1", "e")  # both cached
    fetcher.jwks = {"keys": [EC_PUBLIC]}  # k1 leaked: rotatekeys --revoke unpublished it, and the push came
    asyncio.run(v.keys.refresh())
    with pytest.raises(AuthenticationError, match="unknown key"):
        verify(v, rsa_signed)
    assert verify(v, ec_signed).jti == "e"


def test_an_es256_token_verifies_with_its_p256_key(verifier):
    v, _ = verifier
    raw = jwt.encode(claims(jti="e"), EC_PRIVATE, algorithm="ES256", headers={"typ": "at+jwt", "kid": "e1"})
    assert verify(v, raw).jti == "e"


@pytest.mark.parametrize(
    ("alg", "signer", "kid", "refusal"),
    [
        ("RS256", PEM, "e1", "does not match its key"),
        ("ES256", EC_PRIVATE, "k1", "does not match its key"),
        ("ES384", ec.generate_private_key(ec.SECP384R1()), "e1", "algorithm is not accepted"),
    ],
    ids=["RS256 naming the EC key", "ES256 naming the RSA key", "ES384, which the server never signs"],
)
def test_an_algorithm_other_than_the_keys_is_refused(verifier, alg, signer, kid, refusal):
    v, _ = verifier
    raw = jwt.encode(claims(), signer, algorithm=alg, headers={"typ": "at+jwt", "kid": kid})
    with pytest.raises(AuthenticationError, match=refusal):
        verify(v, raw)


def _raw_header(header_json: str) -> str:
    import base64

    head = base64.urlsafe_b64encode(header_json.encode()).rstrip(b"=").decode()
    return f"{head}.{token().split('.', 1)[1]}"


@pytest.mark.parametrize(
    "header_json",
    [
        '{"alg": ["ES256"], "typ": "at+jwt", "kid": "e1"}',
        '{"alg": {"a": 1}, "typ": "at+jwt", "kid": "e1"}',
        "[" * 2000 + "]" * 2000,  # under the size cap
        '{"alg": "ES256", "typ": "at+jwt", "kid": ' + "[" * 2000 + "]" * 2000 + "}",
    ],
    ids=["alg a list", "alg an object", "nested arrays", "kid nested arrays"],
)
def test_a_header_of_the_wrong_shape_is_refused_not_a_crash(verifier, header_json):
    v, _ = verifier
    with pytest.raises(AuthenticationError):
        verify(v, _raw_header(header_json))


def test_a_user_token_names_its_user(verifier):
    v, _ = verifier
    assert verify(v, token(claims(sub="42"))).user == "42"


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("expired", lambda: token(claims(exp=int(time.time()) - 100, iat=int(time.time()) - 400))),
        ("not yet valid", lambda: token(claims(nbf=int(time.time()) + 600))),
        ("issued in the future", lambda: token(claims(iat=int(time.time()) + 600))),
        ("wrong issuer", lambda: token(claims(iss="https://other"))),
        ("wrong audience", lambda: token(claims(aud="https://other/v1"))),
        ("missing client_id", lambda: token(claims(client_id=None))),
        ("missing jti", lambda: token(claims(jti=None))),
        ("scope not a string", lambda: token(claims(scope=["completions"]))),
        ("typ JWT", lambda: token(typ="JWT")),
        ("no typ", lambda: jwt.encode(claims(), PEM, algorithm="RS256", headers={"kid": "k1"})),
        ("unknown kid", lambda: token(kid="k2")),
        ("HS256 with the public key as secret", lambda: hs256_with_public_key()),
        ("alg mismatch RS512", lambda: token(alg="RS512")),
        ("jwk header", lambda: token(jwk=PUBLIC)),
        ("x5u header", lambda: token(x5u="https://evil/cert")),
        ("crit header", lambda: token(crit=["exp"])),
        ("two parts", lambda: "a.b"),
        ("bad base64 header", lambda: "%%%." + token().split(".", 1)[1]),
        (
            "tampered payload",
            lambda: ".".join(
                [token().split(".")[0], token(claims(scope="x")).split(".")[1], token().split(".")[2]]
            ),
        ),
        ("oversized", lambda: "a" * 9000),
        ("padded signature", lambda: token() + "=="),  # the same token spelled twice: one cache entry each
    ],
)
def test_every_bad_token_is_refused(verifier, name, raw):
    v, _ = verifier
    with pytest.raises(AuthenticationError):
        verify(v, raw())


def test_an_unknown_kid_refetches_at_most_once_per_interval(verifier):
    v, fetcher = verifier
    verify(v, token())
    assert fetcher.calls == 1
    v.keys._last_attempt -= 31  # the refetch interval has passed
    for _ in range(5):
        with pytest.raises(AuthenticationError):
            verify(v, token(kid="rotated"))
    assert fetcher.calls == 2  # the first unknown kid refetched; the rest waited for the interval


def test_a_rotated_key_is_picked_up_by_the_refetch(verifier):
    v, fetcher = verifier
    fetcher.jwks = {"keys": [{**PUBLIC, "kid": "k-new"}]}
    assert verify(v, token(kid="k-new")).jti == "j1"


def test_stale_keys_are_served_when_the_refetch_fails(verifier):
    v, fetcher = verifier
    verify(v, token(claims(jti="a")))

    async def broken() -> dict[str, Any]:
        raise ConnectionError("auth server down")

    v.keys._fetch = broken
    assert not asyncio.run(v.keys.refresh())
    assert verify(v, token(claims(jti="b"))).jti == "b"


def test_the_cache_is_bounded(verifier):
    v, _ = verifier
    v.conf = replace(v.conf, verify_cache_size=3)
    for i in range(10):
        verify(v, token(claims(jti=f"j{i}")))
    assert len(v._cache) <= 3


def test_of_overlapping_reloads_the_one_begun_last_wins_whichever_ends_last(monkeypatch):
    # applied in the order they ended, a timer's read begun before `rotatekeys --revoke` but slow to return
    # trusted the revoked key again after the push's read had dropped it (and a policy the same way)
    from gateway.policy import PolicyCache
    from gateway.selectors import Policy

    async def run() -> tuple[bool, frozenset[str]]:
        gate = asyncio.Event()
        documents: list[dict[str, Any]] = [
            {"keys": [EC_PUBLIC]},
            {"keys": []},
        ]  # read before the revocation, and after

        async def fetch() -> dict[str, Any]:
            document = documents.pop(0)
            if document["keys"]:
                await gate.wait()
            return document

        keys = KeySet(fetch, refetch_interval_s=30)
        older = asyncio.ensure_future(keys.refresh())
        await asyncio.sleep(0)
        assert await keys.refresh()
        gate.set()
        assert await older  # a successful read, not applied
        snapshots = [{"c1": Policy(models=frozenset({"m"}))}, {"c1": Policy(models=frozenset())}]
        gate.clear()

        async def db_read(_read: Any) -> dict[str, Policy]:
            snapshot = snapshots.pop(0)
            if snapshot["c1"].models:
                await gate.wait()
            return snapshot

        monkeypatch.setattr("gateway.policy.db_read", db_read)
        policies = PolicyCache()
        older = asyncio.ensure_future(policies.reload())
        await asyncio.sleep(0)
        await policies.reload()
        gate.set()
        await older
        return EC_PUBLIC["kid"] in keys._keys, policies.get("c1").models

    assert asyncio.run(run()) == (False, frozenset())
