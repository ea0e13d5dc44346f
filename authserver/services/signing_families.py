"""Signing-key families (one per algorithm): which ones this process signs with, and which ones rotation
keeps because some process wanted them lately. The record of what this process noted is per process."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

from django.conf import settings
from django.db import DatabaseError, transaction
from django.utils import timezone

from authserver.crypto import ID_TOKEN_ALGORITHM, SIGNING_ALGORITHMS
from authserver.models import SigningFamily

logger = logging.getLogger(__name__)


def signing_algorithms_in_use() -> tuple[str, ...]:
    """The key families this process signs with: ID tokens' RS256 and the access-token algorithm."""
    return tuple(dict.fromkeys((settings.AUTHSERVER["ACCESS_TOKEN_ALGORITHM"], ID_TOKEN_ALGORITHM)))


FAMILY_NOTE_S = 60.0  # a process records that it wants a key family at most this often
FAMILY_WANTED_MIN_S = 900  # a family stays in use this long after the last process wanted it, at least
_family_noted: dict[str, float] = {}


def signing_family_wanted(algorithm: str) -> None:
    """Record (at most once a minute per process) that this process signs, or wants to sign, with a family.

    Key rotation keeps every family some process wanted within a rotation interval in use, not only
    those its own settings name: a beat whose ``PORTCULLIS_ACCESS_TOKEN_ALG`` differs from the web
    processes' would otherwise retire the family they sign with, and they would bootstrap it again, a new
    key each round. Best effort: one row per family, never the key rows rotation locks, and a failure
    (a lock timeout, a lost connection) is logged and retried with the next token, never the token's.
    """
    now = time.monotonic()
    if now - _family_noted.get(algorithm, -FAMILY_NOTE_S) < FAMILY_NOTE_S:
        return
    _family_noted[algorithm] = now
    try:
        with transaction.atomic():  # a savepoint inside a caller's transaction: a failure stays here
            SigningFamily.objects.update_or_create(
                algorithm=algorithm, defaults={"wanted_at": timezone.now()}
            )
    except DatabaseError:
        _family_noted.pop(algorithm, None)
        logger.warning("could not record that this process signs with %s", algorithm, exc_info=True)


def signing_family_notes_forget() -> None:
    """Forget what this process recorded (tests; a process that must record again at once)."""
    _family_noted.clear()


def signing_family_window_s() -> int:
    """How long a family stays in use after the last process wanted it: a rotation interval, at least
    ``FAMILY_WANTED_MIN_S``, so that traffic that pauses (a night, a weekend) does not retire it."""
    return max(int(settings.AUTHSERVER["KEY_ROTATION_INTERVAL_S"]), FAMILY_WANTED_MIN_S)


def signing_algorithms_rotated(now: datetime | None = None) -> tuple[str, ...]:
    """The families rotation keeps: this process's, and those another process wanted within the window."""
    now = now or timezone.now()
    wanted = (
        SigningFamily.objects.filter(
            wanted_at__gt=now - timedelta(seconds=signing_family_window_s()), algorithm__in=SIGNING_ALGORITHMS
        )
        .order_by("algorithm")
        .values_list("algorithm", flat=True)
    )
    return tuple(dict.fromkeys((*signing_algorithms_in_use(), *wanted)))
