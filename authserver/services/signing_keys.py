"""Signing keys: the first key of a family, the staged rotation (published, active, retired, removed) and
the revocation of a key that leaked. Creation and activation are serialised across processes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.fernet import InvalidToken
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from audit.locks import advisory_xact_lock
from audit.services import audit_record
from authserver.crypto import private_key_encrypt, private_key_reseal, signing_key_generate
from authserver.models import SigningKey
from authserver.revocation import keys_changed_publish
from authserver.selectors import active_key_cache_clear
from authserver.services.signing_families import signing_algorithms_in_use, signing_algorithms_rotated

SIGNING_KEYS_LOCK = 0x6B657973  # PostgreSQL advisory lock id ("keys") held while keys are created or rotated


def _key_create(*, algorithm: str, now: datetime, publish_ahead_s: int, actor: str) -> SigningKey:
    pem, public, kid = signing_key_generate(algorithm)
    key = SigningKey.objects.create(
        kid=kid,
        algorithm=algorithm,
        public_jwk=public,
        private_key_encrypted=private_key_encrypt(pem),
        state=SigningKey.State.PENDING,
        publish_at=now,
        activate_after=now + timedelta(seconds=publish_ahead_s),
    )
    audit_record(
        kind="key.created",
        actor=actor,
        data={"kid": kid, "alg": algorithm, "activate_after": key.activate_after.isoformat()},
    )
    transaction.on_commit(keys_changed_publish)
    return key


def _retire_after_s() -> int:
    conf = settings.AUTHSERVER
    # A retired key stays published until every token it signed has expired, plus clock leeway.
    return int(conf["ACCESS_TOKEN_LIFETIME_S"]) + 120


def _keys_retire(keys: QuerySet[SigningKey], *, now: datetime, actor: str) -> tuple[str, ...]:
    """Retire the keys (locked as they are read); return their ids."""
    retired = []
    for old in keys.select_for_update():
        old.state = SigningKey.State.RETIRED
        old.retired_at = now
        old.remove_after = now + timedelta(seconds=_retire_after_s())
        old.save()
        audit_record(
            kind="key.retired",
            actor=actor,
            data={"kid": old.kid, "alg": old.algorithm, "remove_after": old.remove_after.isoformat()},
        )
        retired.append(old.kid)
    transaction.on_commit(active_key_cache_clear)
    return tuple(retired)


def _key_activate(*, key: SigningKey, now: datetime, actor: str) -> None:
    family = SigningKey.objects.filter(state=SigningKey.State.ACTIVE, algorithm=key.algorithm)
    _keys_retire(family.exclude(pk=key.pk), now=now, actor=actor)
    key.state = SigningKey.State.ACTIVE
    key.activated_at = now
    key.save()
    audit_record(kind="key.activated", actor=actor, data={"kid": key.kid, "alg": key.algorithm})


def _signing_keys_lock() -> None:
    """Serialise key creation and activation across processes until the transaction ends (PostgreSQL).

    Without it, every concurrent first token request of a fresh install created and activated a key of
    its own: the row locks taken on the active key lock nothing while there is none.
    """
    advisory_xact_lock(SIGNING_KEYS_LOCK)


def signing_key_bootstrap(algorithm: str, *, borrow: bool = False) -> SigningKey:
    """Give a key family its first key and return the key that signs for it now.

    On a fresh install (no key signs yet) every family in use gets its first key at once, and it signs at
    once: nobody caches a JWKS yet, and from then on every family in use has a published key. A family
    that starts later (the access-token algorithm changed, or an install that signed RS256 upgraded) has
    its first key published ahead like any new key: with ``borrow`` (access tokens) the other family's
    active key signs until beat activates it. Without ``borrow`` (ID tokens must be RS256, which every
    install signs with from its start) a family with no signing key has its waiting key, or a new one,
    sign at once, since nothing else can.
    """
    with transaction.atomic():
        _signing_keys_lock()
        active = SigningKey.objects.select_for_update().filter(state=SigningKey.State.ACTIVE)
        existing = active.filter(algorithm=algorithm).first()
        if existing:
            return existing
        now = timezone.now()
        other = active.order_by("-activated_at").first()  # None: a fresh install
        pending = _first_pending(algorithm)
        if borrow and other is not None and (pending is None or pending.activate_after > now):
            if pending is None:
                ahead = int(settings.AUTHSERVER["KEY_PUBLISH_AHEAD_S"])
                _key_create(algorithm=algorithm, now=now, publish_ahead_s=ahead, actor="system")
            return other
        families = signing_algorithms_in_use() if other is None else ()
        for family in dict.fromkeys((algorithm, *families)):
            key = _first_pending(family) or _key_create(
                algorithm=family, now=now, publish_ahead_s=0, actor="system"
            )
            _key_activate(key=key, now=now, actor="system")
            if family == algorithm:
                signing = key
        return signing


def _first_pending(algorithm: str) -> SigningKey | None:
    return (
        SigningKey.objects.filter(state=SigningKey.State.PENDING, algorithm=algorithm)
        .order_by("created_at")
        .first()
    )


@dataclass(frozen=True)
class RotationResult:
    created: tuple[str, ...] = ()
    activated: tuple[str, ...] = ()
    retired: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, list[str]]:
        """The result as the admin API and the Celery task report it."""
        return {name: list(getattr(self, name)) for name in ("created", "activated", "retired", "removed")}


def _family_rotate(
    algorithm: str, *, now: datetime, force: bool, activate_now: bool, actor: str
) -> tuple[str | None, str | None]:
    conf = settings.AUTHSERVER
    family = SigningKey.objects.filter(algorithm=algorithm)
    active = family.select_for_update().filter(state=SigningKey.State.ACTIVE).first()
    pending = _first_pending(algorithm)
    created = activated = None
    due = (
        active is None
        or (active.activated_at or now) + timedelta(seconds=int(conf["KEY_ROTATION_INTERVAL_S"])) <= now
    )
    if pending is None and (force or due):
        ahead = 0 if activate_now else int(conf["KEY_PUBLISH_AHEAD_S"])
        pending = _key_create(algorithm=algorithm, now=now, publish_ahead_s=ahead, actor=actor)
        created = pending.kid
    if pending is not None and (activate_now or pending.activate_after <= now):
        _key_activate(key=pending, now=now, actor=actor)
        activated = pending.kid
    return created, activated


def signing_key_rotate(
    *, now: datetime | None = None, force: bool = False, activate_now: bool = False, actor: str = "system"
) -> RotationResult:
    """Advance the staged rotation of every key family in use: publish a new key, activate it once
    published long enough, retire the old one and unpublish retired keys once every token they signed has
    expired. A family no longer in use (the access-token algorithm was changed, and no process has asked
    for it within ``signing_family_window_s()``) has its keys retired."""
    now = now or timezone.now()
    created, activated = [], []
    with transaction.atomic():
        _signing_keys_lock()
        in_use = signing_algorithms_rotated(now)
        # Nothing signs yet (a fresh install): first keys sign at once, as nobody has a JWKS to refresh.
        fresh = not SigningKey.objects.filter(state=SigningKey.State.ACTIVE).exists()
        for algorithm in in_use:
            new, switched = _family_rotate(
                algorithm, now=now, force=force, activate_now=activate_now or fresh, actor=actor
            )
            created += [new] if new else []
            activated += [switched] if switched else []
        unused = SigningKey.objects.filter(
            state__in=[SigningKey.State.PENDING, SigningKey.State.ACTIVE]
        ).exclude(algorithm__in=in_use)
        signing = set(
            SigningKey.objects.filter(state=SigningKey.State.ACTIVE).values_list("algorithm", flat=True)
        )
        if not signing >= set(in_use):
            unused = unused.none()  # a family in use is still publishing its first key: the old one signs
        retired = _keys_retire(unused, now=now, actor=actor)
        removed = []
        for old in SigningKey.objects.filter(state=SigningKey.State.RETIRED, remove_after__lte=now):
            old.state = SigningKey.State.REMOVED
            old.removed_at = now
            old.save()
            removed.append(old.kid)
            audit_record(kind="key.removed", actor=actor, data={"kid": old.kid, "alg": old.algorithm})
    return RotationResult(
        created=tuple(created), activated=tuple(activated), retired=retired, removed=tuple(removed)
    )


def signing_key_revoke(kid: str, *, actor: str, now: datetime | None = None) -> RotationResult:
    """Unpublish a key at once, for a key that leaked: a retired key waits until every token it signed has
    expired, which is what a thief needs. A key that signs is first replaced in its family (its pending key,
    or a new one, signs from now, as ``--activate-now``). Gateways are told to refresh their key sets, and
    drop the tokens they had verified with it (``gateway.auth``): tokens it signed are refused from then on,
    honest ones too (they live minutes; their clients get new ones)."""
    now = now or timezone.now()
    created = activated = None
    with transaction.atomic():
        _signing_keys_lock()
        key = SigningKey.objects.select_for_update().filter(kid=kid).first()
        if key is None or key.state == SigningKey.State.REMOVED:
            raise ValidationError({"kid": [f"no published key has the id {kid}"]})
        was = key.state
        if was == SigningKey.State.ACTIVE:
            created, activated = _family_rotate(
                key.algorithm, now=now, force=True, activate_now=True, actor=actor
            )
            key.refresh_from_db()  # retired by the activation
        key.state = SigningKey.State.REMOVED
        key.removed_at = now
        key.save()
        audit_record(kind="key.revoked", actor=actor, data={"kid": kid, "alg": key.algorithm, "was": was})
        transaction.on_commit(active_key_cache_clear)
        transaction.on_commit(keys_changed_publish)
    return RotationResult(
        created=(created,) if created else (), activated=(activated,) if activated else (), removed=(kid,)
    )


@dataclass(frozen=True)
class ResealResult:
    resealed: tuple[str, ...] = ()
    current: tuple[str, ...] = ()  # already sealed under the current key-encryption key
    unreadable: tuple[str, ...] = ()  # opened by no key-encryption key this process has


def signing_keys_reseal(*, actor: str) -> ResealResult:
    """Seal every signing key's private part under the current key-encryption key, the step that lets the
    previous one (``PORTCULLIS_KEY_ENCRYPTION_KEY_PREVIOUS``) be dropped. Every key, removed ones included:
    audit checkpoints keep verifying only against keys whose sealed private part opens
    (``authserver.checkpoints``). A key no configured key opens is left as it is and reported."""
    resealed, current, unreadable = [], [], []
    with transaction.atomic():
        _signing_keys_lock()
        for key in SigningKey.objects.select_for_update().order_by("created_at", "pk"):
            try:
                sealed = private_key_reseal(bytes(key.private_key_encrypted))
            except InvalidToken:
                unreadable.append(key.kid)
                continue
            if sealed is None:
                current.append(key.kid)
                continue
            key.private_key_encrypted = sealed
            key.save(update_fields=["private_key_encrypted"])
            resealed.append(key.kid)
        if resealed or unreadable:
            audit_record(
                kind="key.resealed",
                actor=actor,
                outcome="success" if not unreadable else "failure",
                data={"resealed": resealed, "unreadable": unreadable, "current": len(current)},
            )
        transaction.on_commit(active_key_cache_clear)
    return ResealResult(resealed=tuple(resealed), current=tuple(current), unreadable=tuple(unreadable))
