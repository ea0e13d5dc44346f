"""Changing the key-encryption key: the previous one still opens the signing keys until ``resealkeys`` has
sealed every one under the new key, and then nothing needs it: tokens sign and audit checkpoints verify."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from cryptography.fernet import Fernet, InvalidToken
from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError, call_command
from django.utils import timezone

from audit.chain import chain_verify, checkpoint_sign
from audit.models import AuditEvent
from authserver.models import SigningKey
from authserver.selectors import active_key_cache_clear, private_jwk_for, private_signing_key_for
from authserver.services import signing_key_rotate


def _restart() -> None:
    """What a process started with the new settings holds: nothing decrypted, no active key cached."""
    active_key_cache_clear()
    private_jwk_for.cache_clear()
    private_signing_key_for.cache_clear()


def _kek_change(settings: Any, *, keep_previous: bool) -> str:
    old = settings.PORTCULLIS_KEY_ENCRYPTION_KEY
    new = Fernet.generate_key().decode()
    settings.PORTCULLIS_KEY_ENCRYPTION_KEY = new
    settings.PORTCULLIS_KEY_ENCRYPTION_KEYS_PREVIOUS = [old] if keep_previous else []
    _restart()
    return new


def _opens_with(kek: str, key: SigningKey) -> bool:
    try:
        Fernet(kek.encode()).decrypt(bytes(key.private_key_encrypted))
    except InvalidToken:
        return False
    return True


@pytest.mark.django_db
def test_a_changed_key_encryption_key_with_the_previous_one_kept_signs_on_and_resealkeys_retires_it(
    make_client, oauth, settings
):
    reg = make_client()
    assert oauth.client_credentials(reg).status_code == 200
    signed_before = checkpoint_sign()  # RS256, by the first key
    assert signed_before is not None
    # a removed key too: checkpoints it signed must keep verifying after the old value is dropped
    signing_key_rotate(force=True, activate_now=True)
    later = timezone.now() + timedelta(seconds=int(settings.AUTHSERVER["ACCESS_TOKEN_LIFETIME_S"]) + 180)
    assert signed_before.kid in signing_key_rotate(now=later).removed
    active_key_cache_clear()
    kids = set(SigningKey.objects.values_list("kid", flat=True))
    assert len(kids) == 4  # two families, each with a removed and an active key

    new = _kek_change(settings, keep_previous=True)
    assert oauth.client_credentials(reg).status_code == 200  # the previous key opens the active one
    assert not any(_opens_with(new, key) for key in SigningKey.objects.all())

    out = StringIO()
    call_command("resealkeys", stdout=out)
    assert "4 resealed, 0 already under the current key, 0 unreadable" in out.getvalue()
    assert all(_opens_with(new, key) for key in SigningKey.objects.all())
    event = AuditEvent.objects.get(kind="key.resealed")
    assert (event.outcome, event.actor) == ("success", "cli:resealkeys")
    assert set(event.data["resealed"]) == kids
    assert event.data["unreadable"] == []

    settings.PORTCULLIS_KEY_ENCRYPTION_KEYS_PREVIOUS = []  # dropped, and every process restarted
    _restart()
    assert oauth.client_credentials(reg).status_code == 200
    assert checkpoint_sign() is not None
    report = chain_verify()
    assert report.ok, report.reason
    assert report.checkpoints == 2  # the one the removed key signed under the old value, and a new one

    again = StringIO()
    call_command("resealkeys", stdout=again)
    assert "0 resealed, 4 already under the current key, 0 unreadable" in again.getvalue()
    assert AuditEvent.objects.filter(kind="key.resealed").count() == 1  # nothing changed: nothing recorded


@pytest.mark.django_db
def test_resealkeys_names_a_key_no_configured_key_encryption_key_opens_and_reseals_the_rest(
    make_client, oauth, settings
):
    assert oauth.client_credentials(make_client()).status_code == 200
    stranded = SigningKey.objects.get(algorithm="ES256")
    stranded.private_key_encrypted = Fernet(Fernet.generate_key()).encrypt(b"sealed by another deployment")
    stranded.save()
    new = _kek_change(settings, keep_previous=True)

    unreadable = f"1 key\\(s\\) open with no configured key-encryption key: {stranded.kid}"
    with pytest.raises(CommandError, match=unreadable):
        call_command("resealkeys", stdout=StringIO())
    other = SigningKey.objects.get(algorithm="RS256")
    assert _opens_with(new, other)  # resealed all the same
    event = AuditEvent.objects.get(kind="key.resealed")
    assert event.outcome == "failure"
    assert (event.data["resealed"], event.data["unreadable"]) == ([other.kid], [stranded.kid])


@pytest.mark.django_db
def test_without_the_previous_key_encryption_key_the_error_says_where_it_goes(make_client, oauth, settings):
    reg = make_client()
    assert oauth.client_credentials(reg).status_code == 200
    _kek_change(settings, keep_previous=False)
    with pytest.raises(ImproperlyConfigured, match="PORTCULLIS_KEY_ENCRYPTION_KEY_PREVIOUS") as err:
        oauth.client_credentials(reg)
    assert "resealkeys" in str(err.value)
