"""RFC 9068 access tokens, the published key set, and staged key rotation."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from io import StringIO

import pytest
from cryptography.fernet import Fernet
from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError, call_command
from django.utils import timezone
from jwcrypto import jwk, jws, jwt

from audit.models import AuditEvent
from authserver.crypto import private_key_decrypt
from authserver.models import Client, SigningFamily, SigningKey
from authserver.selectors import active_key_cache_clear, private_jwk_for, private_signing_key_for
from authserver.services import (
    RotationResult,
    signing_family_notes_forget,
    signing_family_window_s,
    signing_key_rotate,
)

pytestmark = pytest.mark.django_db


def _verify(token: str, jwks: dict, alg: str = "ES256") -> tuple[dict, dict]:
    keyset = jwk.JWKSet.from_json(json.dumps(jwks))
    parsed = jwt.JWT(jwt=token, key=keyset, algs=[alg], expected_type="JWS")
    header = json.loads(parsed.header)
    return header, json.loads(parsed.claims)


def test_access_token_is_an_rfc9068_jwt_verifiable_with_the_published_jwks(
    oauth, make_client, client, settings
):
    reg = make_client()
    before = int(timezone.now().timestamp())
    token = oauth.client_credentials(reg).json()["access_token"]
    header, claims = _verify(token, client.get("/.well-known/jwks.json").json())
    key = SigningKey.objects.get(state="active", algorithm="ES256")
    assert header == {"alg": "ES256", "typ": "at+jwt", "kid": key.kid}
    assert claims["iss"] == settings.PORTCULLIS_ISSUER
    assert claims["aud"] == settings.PORTCULLIS_AUDIENCE
    assert claims["sub"] == reg.client.client_id
    assert claims["client_id"] == reg.client.client_id
    assert claims["scope"] == "models.read completions"
    assert claims["exp"] - claims["iat"] == 300
    assert before - 1 <= claims["iat"] <= before + 5
    assert len(claims["jti"]) == 36


def test_private_keys_are_encrypted_at_rest_and_jwks_holds_no_private_part(oauth, make_client, client):
    make_client()
    oauth.client_credentials(make_client())
    keys = SigningKey.objects.all()
    assert sorted(k.algorithm for k in keys) == ["ES256", "RS256"]  # a fresh install starts every family
    for key in keys:
        assert b"PRIVATE KEY" not in bytes(key.private_key_encrypted)
        assert b"PRIVATE KEY" in private_key_decrypt(bytes(key.private_key_encrypted))
    published = client.get("/.well-known/jwks.json").json()["keys"]
    assert published
    assert all(set(k) & {"d", "p", "q", "dp", "dq", "qi"} == set() for k in published)


def test_staged_rotation_publishes_before_signing_and_old_tokens_still_verify(oauth, make_client, client):
    reg = make_client()
    old_token = oauth.client_credentials(reg).json()["access_token"]
    old_kid = SigningKey.objects.get(state="active", algorithm="ES256").kid
    out = StringIO()
    call_command("rotatekeys", stdout=out)
    assert "published new key" in out.getvalue()
    pending = SigningKey.objects.get(state="pending", algorithm="ES256")
    assert pending.kid in {k["kid"] for k in client.get("/.well-known/jwks.json").json()["keys"]}
    active_key_cache_clear()
    still_old = oauth.client_credentials(reg).json()["access_token"]
    assert _verify(still_old, client.get("/.well-known/jwks.json").json())[0]["kid"] == old_kid
    result = signing_key_rotate(now=pending.activate_after + timedelta(seconds=1))
    assert len(result.activated) == 2  # both families, ES256's and RS256's
    assert pending.kid in result.activated
    active_key_cache_clear()
    jwks = client.get("/.well-known/jwks.json").json()
    new_token = oauth.client_credentials(reg).json()["access_token"]
    assert _verify(new_token, jwks)[0]["kid"] == pending.kid
    assert _verify(old_token, jwks)[0]["kid"] == old_kid
    kinds = set(AuditEvent.objects.values_list("kind", flat=True))
    assert {"key.created", "key.activated", "key.retired"} <= kinds


def test_retired_key_is_unpublished_only_after_its_tokens_expired(make_client, oauth, client):
    oauth.client_credentials(make_client())
    old = SigningKey.objects.get(state="active", algorithm="ES256")
    signing_key_rotate(force=True, activate_now=True)
    old.refresh_from_db()
    assert old.state == "retired"
    assert old.remove_after is not None
    assert old.remove_after >= timezone.now() + timedelta(seconds=300)
    signing_key_rotate(now=old.remove_after - timedelta(seconds=1))
    assert old.kid in {k["kid"] for k in client.get("/.well-known/jwks.json").json()["keys"]}
    result = signing_key_rotate(now=old.remove_after + timedelta(seconds=1))
    assert old.kid in result.removed
    assert len(result.removed) == 2  # and the RS256 key retired with it
    assert old.kid not in {k["kid"] for k in client.get("/.well-known/jwks.json").json()["keys"]}


def test_a_key_encryption_key_that_cannot_open_the_signing_key_names_the_key_and_the_way_out(
    make_client, oauth, settings
):
    reg = make_client()
    assert oauth.client_credentials(reg).status_code == 200
    stranded = SigningKey.objects.get(state="active", algorithm="ES256")
    settings.PORTCULLIS_KEY_ENCRYPTION_KEY = Fernet.generate_key().decode()  # changed, nothing re-encrypted
    private_jwk_for.cache_clear()  # a process started since: nothing decrypted yet
    private_signing_key_for.cache_clear()
    with pytest.raises(ImproperlyConfigured, match=f"signing key {stranded.kid} cannot be decrypted") as err:
        oauth.client_credentials(reg)
    assert "rotatekeys --activate-now" in str(err.value)
    assert settings.PORTCULLIS_KEY_ENCRYPTION_KEY not in str(err.value)

    call_command("rotatekeys", "--activate-now", stdout=StringIO())
    active_key_cache_clear()  # on commit in production; the test's transaction never commits
    token = oauth.client_credentials(reg).json()["access_token"]
    kid = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))["kid"]
    assert kid != stranded.kid
    assert SigningKey.objects.get(kid=kid).state == "active"


def test_a_kid_beginning_with_a_dash_is_revoked_with_revoke_equals_kid(make_client, oauth):
    # a kid is a base64url thumbprint: one in 64 begins with "-", which argparse takes for an option after
    # a space ("--revoke -abc": expected one argument); the help and the README write --revoke=KID
    oauth.client_credentials(make_client())
    key = SigningKey.objects.get(state="active", algorithm="ES256")
    SigningKey.objects.filter(pk=key.pk).update(kid="-" + key.kid[1:])
    out = StringIO()
    call_command("rotatekeys", f"--revoke=-{key.kid[1:]}", stdout=out)
    assert f"removed key -{key.kid[1:]}" in out.getvalue()


def test_a_leaked_signing_key_is_replaced_and_unpublished_at_once_with_rotatekeys_revoke(
    make_client, oauth, client
):
    reg = make_client()
    leaked_token = oauth.client_credentials(reg).json()["access_token"]
    leaked = SigningKey.objects.get(state="active", algorithm="ES256")
    id_tokens = SigningKey.objects.get(state="active", algorithm="RS256")
    out = StringIO()
    call_command("rotatekeys", f"--revoke={leaked.kid}", stdout=out)
    assert f"removed key {leaked.kid}" in out.getvalue()
    leaked.refresh_from_db()
    assert leaked.state == "removed"  # not retired: no waiting for its tokens to expire
    replacement = SigningKey.objects.get(state="active", algorithm="ES256")
    assert f"activated key {replacement.kid}" in out.getvalue()
    jwks = client.get("/.well-known/jwks.json").json()
    assert leaked.kid not in {k["kid"] for k in jwks["keys"]}
    with pytest.raises(Exception, match="(?i)key"):
        _verify(leaked_token, jwks)  # what it signed no longer verifies
    active_key_cache_clear()
    assert _verify(oauth.client_credentials(reg).json()["access_token"], jwks)[0]["kid"] == replacement.kid
    id_tokens.refresh_from_db()
    assert id_tokens.state == "active"  # the other family is left alone
    event = AuditEvent.objects.get(kind="key.revoked")
    assert event.data == {"kid": leaked.kid, "alg": "ES256", "was": "active"}
    with pytest.raises(CommandError, match="no published key"):
        call_command("rotatekeys", f"--revoke={leaked.kid}", stdout=StringIO())  # once is all it takes


def test_introspection_answers_inactive_for_a_token_whose_signing_key_was_revoked(make_client, oauth):
    from tests.conftest import basic_auth

    reg, introspector = make_client(), make_client(can_introspect=True, name="Introspector")
    auth = basic_auth(introspector.client.client_id, introspector.client_secret)

    def active(token: str) -> bool:
        response = oauth.http.post("/oauth/introspect/", {"token": token}, HTTP_AUTHORIZATION=auth)
        assert response.status_code == 200
        assert response["Cache-Control"] == "no-store"
        return bool(response.json()["active"])

    leaked_token = oauth.client_credentials(reg).json()["access_token"]
    assert active(leaked_token)
    signing_key_rotate(force=True, activate_now=True)  # an honest rotation: the old key stays published
    active_key_cache_clear()
    assert active(leaked_token)
    leaked = SigningKey.objects.get(kid=json.loads(_b64(leaked_token.split(".")[0]))["kid"])
    call_command("rotatekeys", f"--revoke={leaked.kid}", stdout=StringIO())
    assert not active(leaked_token)  # as every gateway refuses it: "signed by an unknown key"
    active_key_cache_clear()
    assert active(oauth.client_credentials(reg).json()["access_token"])  # the replacement key's


def _b64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def test_beat_rotation_waits_for_the_interval(make_client, oauth, settings):
    oauth.client_credentials(make_client())
    active = SigningKey.objects.get(state="active", algorithm="ES256")
    assert active.activated_at is not None
    assert signing_key_rotate(now=timezone.now()) == RotationResult()
    interval = settings.AUTHSERVER["KEY_ROTATION_INTERVAL_S"]
    result = signing_key_rotate(now=active.activated_at + timedelta(seconds=interval + 1))
    created = SigningKey.objects.filter(kid__in=result.created)
    assert sorted((k.algorithm, k.state) for k in created) == [("ES256", "pending"), ("RS256", "pending")]


def test_a_token_signed_by_an_unpublished_key_does_not_verify(oauth, make_client, client):
    token = oauth.client_credentials(make_client()).json()["access_token"]
    stranger = jwk.JWK.generate(kty="RSA", size=2048)
    forged = jws.JWS(token.split(".")[1].encode())
    forged.add_signature(
        stranger, alg="RS256", protected=json.dumps({"alg": "RS256", "kid": "x", "typ": "at+jwt"})
    )
    with pytest.raises(Exception, match="(?i)key|signature"):
        _verify(forged.serialize(compact=True), client.get("/.well-known/jwks.json").json())


def test_id_token_is_signed_with_the_rotating_key(oauth, make_client, client, alice):
    from tests.conftest import pkce_pair

    client.force_login(alice)
    app = make_client(grants=("authorization-code",), scopes="openid profile models.read")
    verifier, challenge = pkce_pair()
    code = oauth.code_from(oauth.authorize(app.client, challenge=challenge, scope="openid models.read"))
    body = oauth.code_exchange(app, code, verifier).json()
    header, claims = _verify(body["id_token"], client.get("/.well-known/jwks.json").json(), alg="RS256")
    assert header["kid"] == SigningKey.objects.get(state="active", algorithm="RS256").kid
    access_header, _ = _verify(body["access_token"], client.get("/.well-known/jwks.json").json())
    assert access_header["kid"] == SigningKey.objects.get(state="active", algorithm="ES256").kid
    assert claims["aud"] == app.client.client_id
    assert claims["sub"] == str(alice.pk)


@pytest.mark.django_db(transaction=True)
def test_concurrent_first_token_requests_on_a_fresh_install_share_one_key_and_do_not_deadlock(make_client):
    import threading

    from django.db import connection
    from django.test import Client as HttpClient

    from audit.chain import chain_verify
    from tests.conftest import OAuthDriver

    registered = [make_client(name=f"App {i}") for i in range(8)]
    assert not SigningKey.objects.exists()
    statuses: list[int] = []
    start = threading.Barrier(len(registered))

    def first_token(reg) -> None:
        try:
            start.wait()
            statuses.append(OAuthDriver(http=HttpClient()).client_credentials(reg).status_code)
        finally:
            connection.close()

    threads = [threading.Thread(target=first_token, args=(reg,), daemon=True) for reg in registered]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads), "token requests deadlocked"
    assert statuses == [200] * len(registered)
    assert sorted(SigningKey.objects.values_list("algorithm", "state")) == [
        ("ES256", "active"),
        ("RS256", "active"),
    ]
    assert AuditEvent.objects.filter(kind="key.created").count() == 2
    assert AuditEvent.objects.filter(kind="token.issued").count() == len(registered)
    report = chain_verify()
    assert report.ok, report.reason


def test_es256_keys_are_p256_and_published_without_their_private_part(oauth, make_client, client):
    oauth.client_credentials(make_client())
    key = SigningKey.objects.get(state="active", algorithm="ES256")
    published = {k["kid"]: k for k in client.get("/.well-known/jwks.json").json()["keys"]}
    assert published[key.kid] == {**key.public_jwk, "kid": key.kid}
    assert set(published[key.kid]) == {"kty", "crv", "x", "y", "kid", "alg", "use"}
    assert (published[key.kid]["kty"], published[key.kid]["crv"]) == ("EC", "P-256")
    assert (published[key.kid]["alg"], published[key.kid]["use"]) == ("ES256", "sig")
    assert key.kid == jwk.JWK(**published[key.kid]).thumbprint()


def test_rs256_access_tokens_are_one_setting_away_and_share_the_id_token_keys(
    oauth, make_client, client, settings
):
    settings.AUTHSERVER = {**settings.AUTHSERVER, "ACCESS_TOKEN_ALGORITHM": "RS256"}
    token = oauth.client_credentials(make_client()).json()["access_token"]
    header, _ = _verify(token, client.get("/.well-known/jwks.json").json(), alg="RS256")
    key = SigningKey.objects.get(state="active")
    assert (key.algorithm, header["alg"], header["kid"]) == ("RS256", "RS256", key.kid)
    assert len(signing_key_rotate(force=True).created) == 1  # one family in use


def test_each_family_rotates_on_its_own_and_never_retires_the_other(oauth, make_client):
    oauth.client_credentials(make_client())
    first = {k.algorithm: k.kid for k in SigningKey.objects.filter(state="active")}
    assert set(first) == {"ES256", "RS256"}
    result = signing_key_rotate(force=True, activate_now=True)
    assert len(result.activated) == 2
    now_active = {k.algorithm: k.kid for k in SigningKey.objects.filter(state="active")}
    assert set(now_active) == {"ES256", "RS256"}
    for algorithm, kid in first.items():
        old = SigningKey.objects.get(kid=kid)
        assert old.state == "retired"
        assert SigningKey.objects.get(kid=now_active[algorithm]).algorithm == algorithm
    retired = AuditEvent.objects.filter(kind="key.retired").values_list("data", flat=True)
    assert sorted(event["alg"] for event in retired) == ["ES256", "RS256"]


def test_a_fresh_install_publishes_every_family_with_its_first_key_and_each_signs_at_once(
    oauth, make_client, client, alice
):
    from tests.conftest import pkce_pair

    oauth.client_credentials(make_client())  # the first thing it signs is an access token (ES256)
    first = {k.algorithm: k.kid for k in SigningKey.objects.filter(state="active")}
    assert set(first) == {"ES256", "RS256"}
    assert set(first.values()) == {k["kid"] for k in client.get("/.well-known/jwks.json").json()["keys"]}
    client.force_login(alice)
    app = make_client(grants=("authorization-code",), scopes="openid models.read")
    verifier, challenge = pkce_pair()
    code = oauth.code_from(oauth.authorize(app.client, challenge=challenge, scope="openid models.read"))
    id_token = oauth.code_exchange(app, code, verifier).json()["id_token"]
    assert (
        _verify(id_token, client.get("/.well-known/jwks.json").json(), alg="RS256")[0]["kid"]
        == first["RS256"]
    )
    assert SigningKey.objects.count() == 2  # the ID token found its key published since the start


def test_a_client_object_signs_its_id_tokens_with_one_key_even_across_a_rotation(make_client):
    client = make_client().client
    first = client.jwk_key  # DOT reads it for the kid...
    signing_key_rotate(force=True, activate_now=True)
    active_key_cache_clear()
    assert client.jwk_key is first  # ...and again to sign: the same key
    assert Client.objects.get(pk=client.pk).jwk_key.thumbprint() != first.thumbprint()  # the next request


def test_beat_on_a_fresh_install_starts_every_family_signing_at_once():
    result = signing_key_rotate()
    keys = SigningKey.objects.filter(kid__in=result.activated)
    assert sorted((k.algorithm, k.state) for k in keys) == [("ES256", "active"), ("RS256", "active")]
    assert result.created == result.activated


def test_switching_to_rs256_signs_with_the_id_token_family_at_once_and_retires_es256_after(
    oauth, make_client, client, settings
):
    reg = make_client()
    old_token = oauth.client_credentials(reg).json()["access_token"]
    es256 = SigningKey.objects.get(state="active", algorithm="ES256")
    rs256 = SigningKey.objects.get(state="active", algorithm="RS256")  # published since the install
    settings.AUTHSERVER = {**settings.AUTHSERVER, "ACCESS_TOKEN_ALGORITHM": "RS256"}
    active_key_cache_clear()
    jwks = client.get("/.well-known/jwks.json").json()
    new_header, _ = _verify(oauth.client_credentials(reg).json()["access_token"], jwks, alg="RS256")
    assert new_header["kid"] == rs256.kid
    assert signing_key_rotate().retired == ()  # a process signed ES256 moments ago: it may still
    later = timezone.now() + timedelta(seconds=signing_family_window_s() + 1)
    assert signing_key_rotate(now=later).retired == (es256.kid,)  # nobody has, for a rotation interval
    es256.refresh_from_db()
    assert es256.state == "retired"
    assert es256.remove_after is not None
    jwks = client.get("/.well-known/jwks.json").json()
    assert _verify(old_token, jwks)[0]["kid"] == es256.kid  # still published until it has expired
    assert signing_key_rotate(now=es256.remove_after + timedelta(seconds=1)).removed == (es256.kid,)
    assert es256.kid not in {k["kid"] for k in client.get("/.well-known/jwks.json").json()["keys"]}


def test_an_install_upgraded_from_rs256_publishes_its_es256_key_before_it_signs(
    oauth, make_client, client, settings
):
    before = settings.AUTHSERVER
    settings.AUTHSERVER = {**before, "ACCESS_TOKEN_ALGORITHM": "RS256"}  # as every install signed until now
    reg = make_client()
    oauth.client_credentials(reg)
    rs256 = SigningKey.objects.get()
    settings.AUTHSERVER = before  # the upgrade: ES256 by default
    active_key_cache_clear()
    header, _ = _verify(
        oauth.client_credentials(reg).json()["access_token"], {"keys": [rs256.public_jwk]}, "RS256"
    )
    assert header["kid"] == rs256.kid
    es256 = SigningKey.objects.get(algorithm="ES256")
    assert (es256.state, es256.activate_after > timezone.now()) == ("pending", True)
    assert es256.kid in {k["kid"] for k in client.get("/.well-known/jwks.json").json()["keys"]}
    active_key_cache_clear()
    assert _verify(
        oauth.client_credentials(reg).json()["access_token"], {"keys": [rs256.public_jwk]}, "RS256"
    )
    assert SigningKey.objects.filter(algorithm="ES256").count() == 1  # one waiting key, not one a token
    assert signing_key_rotate(now=es256.activate_after + timedelta(seconds=1)).activated == (es256.kid,)
    active_key_cache_clear()
    jwks = client.get("/.well-known/jwks.json").json()
    assert _verify(oauth.client_credentials(reg).json()["access_token"], jwks)[0]["kid"] == es256.kid
    rs256.refresh_from_db()
    assert rs256.state == "active"  # still the ID tokens' key


def test_a_beat_configured_for_another_algorithm_keeps_and_rotates_the_family_the_web_signs_with(
    oauth, make_client, settings
):
    oauth.client_credentials(make_client())  # the web processes sign ES256 (the default)
    settings.AUTHSERVER = {**settings.AUTHSERVER, "ACCESS_TOKEN_ALGORITHM": "RS256"}  # beat's says RS256
    result = signing_key_rotate(force=True, activate_now=True)
    active = {k.algorithm: k.kid for k in SigningKey.objects.filter(state="active")}
    assert set(active) == {"ES256", "RS256"}
    assert active["ES256"] in result.activated  # rotated like any family in use, not retired
    assert signing_key_rotate().retired == ()
    # a night without tokens is not a switch: the family is kept for a rotation interval
    overnight = timezone.now() + timedelta(hours=12)
    assert signing_key_rotate(now=overnight).retired == ()
    assert SigningKey.objects.filter(algorithm="ES256").count() == 2  # no key made and retired each round


def test_a_beat_configured_for_another_algorithm_activates_the_web_families_first_key_in_turn(
    oauth, make_client, settings
):
    rs256_only = {**settings.AUTHSERVER, "ACCESS_TOKEN_ALGORITHM": "RS256"}
    settings.AUTHSERVER = rs256_only  # an install that signed RS256...
    reg = make_client()
    oauth.client_credentials(reg)
    settings.AUTHSERVER = {**rs256_only, "ACCESS_TOKEN_ALGORITHM": "ES256"}  # ...whose web moved to ES256
    active_key_cache_clear()
    oauth.client_credentials(reg)
    es256 = SigningKey.objects.get(algorithm="ES256")
    assert es256.state == "pending"
    settings.AUTHSERVER = rs256_only  # but beat still says RS256
    assert signing_key_rotate().retired == ()
    assert signing_key_rotate(now=es256.activate_after + timedelta(seconds=1)).activated == (es256.kid,)


def test_a_process_records_the_family_it_signs_with_at_most_once_a_minute(oauth, make_client):
    reg = make_client()
    oauth.client_credentials(reg)
    first = SigningFamily.objects.get(algorithm="ES256").wanted_at
    active_key_cache_clear()
    oauth.client_credentials(reg)  # reads the key again, within the minute: no write
    assert SigningFamily.objects.get(algorithm="ES256").wanted_at == first
    signing_family_notes_forget()
    active_key_cache_clear()
    oauth.client_credentials(reg)
    assert SigningFamily.objects.get(algorithm="ES256").wanted_at > first


def test_a_failed_record_costs_the_token_nothing_and_is_tried_again(oauth, make_client, monkeypatch, caplog):
    from django.db import DatabaseError

    def refuse(*args, **kwargs):
        raise DatabaseError("deadlock detected")

    reg = make_client()
    monkeypatch.setattr(SigningFamily.objects, "update_or_create", refuse)
    assert oauth.client_credentials(reg).status_code == 200
    assert "could not record that this process signs with ES256" in caplog.text
    monkeypatch.undo()
    active_key_cache_clear()
    oauth.client_credentials(reg)  # not held back by the minute: the failure was forgotten
    assert SigningFamily.objects.filter(algorithm="ES256").exists()
