"""Writes for the authorization server: clients, signing keys, consents and revocation."""

from __future__ import annotations

import calendar
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from axes.utils import reset as axes_reset
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import DatabaseError, connection, connections, router, transaction
from django.db.models import QuerySet
from django.db.models.signals import post_save, pre_save
from django.utils import timezone
from oauth2_provider.generators import generate_client_id
from oauth2_provider.models import get_device_grant_model

from audit.services import audit_record
from authserver.crypto import (
    ID_TOKEN_ALGORITHM,
    SIGNING_ALGORITHMS,
    private_key_encrypt,
    signing_key_generate,
)
from authserver.models import (
    ADMIN_SCOPES,
    AccessToken,
    Client,
    Consent,
    RefreshToken,
    SigningFamily,
    SigningKey,
)
from authserver.revocation import keys_changed_publish, revocation_publish
from authserver.selectors import active_key_cache_clear

logger = logging.getLogger(__name__)

CLIENT_SECRET_LENGTH = 128
SIGNING_KEYS_LOCK = 0x6B657973  # PostgreSQL advisory lock id ("keys") held while keys are created or rotated
GRANT_ALIASES = {
    "authorization-code": Client.GRANT_AUTHORIZATION_CODE,
    "client-credentials": Client.GRANT_CLIENT_CREDENTIALS,
    "device-code": "urn:ietf:params:oauth:grant-type:device_code",
}


@dataclass(frozen=True)
class RegisteredClient:
    client: Client
    client_secret: str | None  # shown once, never stored in clear


def client_register(
    *,
    name: str,
    grant_types: list[str],
    public: bool = False,
    redirect_uris: list[str] | None = None,
    scopes: list[str] | None = None,
    owner: Any = None,
    description: str = "",
    logo_url: str = "",
    can_introspect: bool = False,
    actor: str = "system",
) -> RegisteredClient:
    """Create a client; return it with its secret in clear (the only time it exists in clear)."""
    grants = [GRANT_ALIASES.get(g, g) for g in grant_types]
    secret = None if public else secrets.token_urlsafe(96)[:CLIENT_SECRET_LENGTH]
    client = Client(
        name=name,
        client_id=generate_client_id(),
        client_type=Client.CLIENT_PUBLIC if public else Client.CLIENT_CONFIDENTIAL,
        authorization_grant_type=grants[0] if grants else "",
        grant_types=grants,
        redirect_uris=" ".join(redirect_uris or []),
        allowed_scopes=" ".join(scopes or ["models.read", "completions", "embeddings"]),
        user=owner,
        description=description,
        logo_url=logo_url,
        can_introspect=can_introspect,
        algorithm=Client.RS256_ALGORITHM,
        client_secret=secret or "",
    )
    client.full_clean(exclude=["client_secret"])
    client.save()
    audit_record(
        kind="client.created",
        actor=actor,
        client_id=client.client_id,
        data={"name": name, "grant_types": grants, "public": public, "scope": client.allowed_scopes},
    )
    return RegisteredClient(client=client, client_secret=secret)


def _jti_exp(tokens: list[AccessToken]) -> list[tuple[str, int]]:
    return [(str(t.jti), calendar.timegm(t.expires.utctimetuple())) for t in tokens if t.jti]


def tokens_revoke_for_client(*, client: Client, actor: str, reason: str) -> int:
    """Revoke every access and refresh token of a client; push the revocation. Return how many."""
    with transaction.atomic():
        access = list(AccessToken.objects.filter(application=client))
        RefreshToken.objects.filter(application=client, revoked__isnull=True).update(revoked=timezone.now())
        AccessToken.objects.filter(application=client).delete()
    audit_record(
        kind="token.revoked",
        actor=actor,
        client_id=client.client_id,
        data={"reason": reason, "tokens_revoked": len(access)},
    )
    return len(access)


def client_disable(*, client: Client, actor: str) -> None:
    """Disable a client: it can do nothing more, and every token it holds stops working at once."""
    client.disabled = True
    client.save(update_fields=["disabled", "updated"])
    transaction.on_commit(lambda: revocation_publish(clients=[client.client_id]))
    tokens_revoke_for_client(client=client, actor=actor, reason="client disabled")
    audit_record(kind="client.disabled", actor=actor, client_id=client.client_id)


def client_enable(*, client: Client, actor: str) -> None:
    """Re-enable a disabled client."""
    client.disabled = False
    client.save(update_fields=["disabled", "updated"])
    transaction.on_commit(lambda: revocation_publish(restored_clients=[client.client_id]))
    audit_record(kind="client.enabled", actor=actor, client_id=client.client_id)


def access_tokens_deleted(tokens: list[AccessToken]) -> None:
    """Push the revocation of deleted access tokens once the deletion commits."""
    pairs = _jti_exp(tokens)
    if pairs:
        transaction.on_commit(lambda: revocation_publish(jtis=pairs))


@lru_cache(maxsize=64)
def _access_token_insert_sql(db: Any) -> tuple[str, list[Any], bool]:
    """The INSERT of ``access_token_insert``, built once per connection object."""
    meta = AccessToken._meta
    fields = [f for f in meta.concrete_fields if not f.primary_key]
    quote = db.ops.quote_name
    columns = ", ".join(quote(f.column) for f in fields)
    values = ", ".join(["%s"] * len(fields))
    table = quote(meta.db_table)
    sql = f"INSERT INTO {table} ({columns}) VALUES ({values})"  # noqa: S608 (names from the model, quoted)
    returning = db.features.can_return_columns_from_insert  # not SQLite before 3.35: lastrowid
    return sql + (f" RETURNING {quote(meta.pk.column)}" if returning else ""), fields, returning


def access_token_insert(token: AccessToken) -> AccessToken:
    """Insert a new access-token row as ``save()`` would, without compiling the INSERT for every token.

    Every field is prepared by the field itself (``pre_save``: timestamps and the checksum), the database
    is the one DOT writes tokens to, an error inside a transaction marks it for rollback as ``save()``
    does, and the save signals go out when something listens. The ORM's save was about a sixth of the
    token endpoint's CPU.
    """
    alias = router.db_for_write(AccessToken)
    db = connections[alias]  # this thread's connection itself: the proxy costs a lookup on every use
    listened = pre_save.has_listeners(AccessToken) or post_save.has_listeners(AccessToken)
    if listened:
        pre_save.send(sender=AccessToken, instance=token, raw=False, using=alias, update_fields=None)
    sql, fields, returning = _access_token_insert_sql(db)
    params = [f.get_db_prep_save(f.pre_save(token, True), db) for f in fields]
    with transaction.mark_for_rollback_on_error(using=alias), db.cursor() as cursor:
        cursor.execute(sql, params)
        token.pk = cursor.fetchone()[0] if returning else cursor.lastrowid
    token._state.adding, token._state.db = False, alias
    if listened:
        post_save.send(
            sender=AccessToken, instance=token, created=True, update_fields=None, raw=False, using=alias
        )
    return token


def consent_grant(*, user: Any, client: Client, scopes: list[str]) -> Consent:
    """Remember that the user allowed these scopes for this client (merged with earlier consent)."""
    consent, created = Consent.objects.get_or_create(user=user, client=client, defaults={"scope": ""})
    merged = sorted(set(consent.scope.split()) | set(scopes))
    consent.scope = " ".join(merged)
    consent.save()
    audit_record(
        kind="consent.granted",
        actor=f"user:{user.get_username()}",
        client_id=client.client_id,
        data={"scope": " ".join(scopes)},
    )
    return consent


def consent_withdraw(*, user: Any, client: Client) -> int:
    """Withdraw a user's consent for a client and revoke the tokens it holds for them."""
    with transaction.atomic():
        Consent.objects.filter(user=user, client=client).delete()
        RefreshToken.objects.filter(user=user, application=client, revoked__isnull=True).update(
            revoked=timezone.now()
        )
        count, _ = AccessToken.objects.filter(user=user, application=client).delete()
    audit_record(kind="consent.withdrawn", actor=f"user:{user.get_username()}", client_id=client.client_id)
    return count


# --- signing keys -----------------------------------------------------------------------------------


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
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [SIGNING_KEYS_LOCK])


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


# --- administration (the console and the admin API call these) --------------------------------------


def _scopes_check(scopes: list[str], *, is_admin_client: bool) -> None:
    """Refuse unknown scopes, and admin scopes for a client not marked administrative."""
    known = set(settings.SCOPES) | ADMIN_SCOPES
    unknown = sorted(set(scopes) - known)
    if unknown:
        raise ValidationError({"scopes": [f"unknown scopes: {', '.join(unknown)}"]})
    if not is_admin_client and ADMIN_SCOPES.intersection(scopes):
        raise ValidationError({"scopes": ["admin scopes are only for clients marked administrative"]})


def client_create(
    *,
    name: str,
    grant_types: list[str],
    public: bool = False,
    redirect_uris: list[str] | None = None,
    scopes: list[str] | None = None,
    description: str = "",
    logo_url: str = "",
    can_introspect: bool = False,
    is_admin_client: bool = False,
    actor: str,
) -> RegisteredClient:
    """Register a client for an admin: check its scopes, then create it (secret returned once)."""
    if not grant_types:
        raise ValidationError({"grant_types": ["choose at least one grant type"]})
    _scopes_check(scopes or [], is_admin_client=is_admin_client)
    with transaction.atomic():
        registered = client_register(
            name=name,
            grant_types=grant_types,
            public=public,
            redirect_uris=redirect_uris,
            scopes=scopes or None,
            description=description,
            logo_url=logo_url,
            can_introspect=can_introspect,
            actor=actor,
        )
        if is_admin_client:
            registered.client.is_admin_client = True
            registered.client.full_clean(exclude=["client_secret"])  # not for a public client: rolled back
            registered.client.save(update_fields=["is_admin_client", "updated"])
            audit_record(
                kind="client.changed",
                actor=actor,
                client_id=registered.client.client_id,
                data={"changed": ["is_admin_client"]},
            )
    return registered


CLIENT_EDITABLE = (
    "name",
    "description",
    "logo_url",
    "redirect_uris",
    "allowed_scopes",
    "grant_types",
    "can_introspect",
    "is_admin_client",
)


def client_update(*, client: Client, actor: str, **fields: Any) -> Client:
    """Change a client's editable fields (validated like a new client) and audit what changed."""
    unknown = set(fields) - set(CLIENT_EDITABLE)
    if unknown:
        raise ValidationError({"client": [f"unknown fields: {', '.join(sorted(unknown))}"]})
    if "grant_types" in fields:
        fields["grant_types"] = [GRANT_ALIASES.get(g, g) for g in fields["grant_types"]]
        if not fields["grant_types"]:
            raise ValidationError({"grant_types": ["choose at least one grant type"]})
    changed = [name for name, value in fields.items() if getattr(client, name) != value]
    for name in changed:
        setattr(client, name, fields[name])
    if "grant_types" in changed:
        client.authorization_grant_type = client.grant_types[0]
    _scopes_check(client.scope_list(), is_admin_client=client.is_admin_client)
    client.full_clean(exclude=["client_secret"])
    if changed:
        client.save()
        audit_record(
            kind="client.changed", actor=actor, client_id=client.client_id, data={"changed": changed}
        )
    return client


def client_secret_rotate(*, client: Client, actor: str) -> str:
    """Give a confidential client a new secret; return it in clear (the only time it exists in clear).

    The old secret stops working at once; tokens already issued stay valid until they expire or are
    revoked (revoke them separately if the old secret leaked).
    """
    if client.client_type != Client.CLIENT_CONFIDENTIAL:
        raise ValidationError({"client": ["a public client has no secret"]})
    secret = secrets.token_urlsafe(96)[:CLIENT_SECRET_LENGTH]
    client.client_secret = secret  # DOT hashes it on save (CLIENT_SECRET_HASHER)
    client.save()
    audit_record(kind="client.secret_rotated", actor=actor, client_id=client.client_id)
    return secret


def access_token_revoke(*, token: AccessToken, actor: str) -> None:
    """Revoke one access token (and the refresh token issued with it); the deletion pushes it."""
    client_id = token.application.client_id if token.application else ""
    jti = str(token.jti or "")
    with transaction.atomic():
        RefreshToken.objects.filter(access_token=token, revoked__isnull=True).update(revoked=timezone.now())
        token.delete()
    audit_record(
        kind="token.revoked",
        actor=actor,
        client_id=client_id,
        data={"reason": "revoked by an admin", "jti": jti},
    )


def tokens_revoke_for_user(*, user: Any, actor: str, reason: str, client: Client | None = None) -> int:
    """Revoke every access and refresh token a user holds, across clients or at ``client`` only (the
    client's other users, and the user's other clients, keep theirs); return how many. The device codes
    the user entered or approved go too: each was a token waiting for its device's next poll."""
    at = {} if client is None else {"application": client}
    with transaction.atomic():
        RefreshToken.objects.filter(user=user, revoked__isnull=True, **at).update(revoked=timezone.now())
        count, _ = AccessToken.objects.filter(user=user, **at).delete()
        devices = get_device_grant_model().objects.filter(user=user)
        (devices if client is None else devices.filter(client_id=client.client_id)).delete()
    audit_record(
        kind="token.revoked",
        actor=actor,
        client_id=client.client_id if client is not None else "",
        data={"reason": reason, "user": user.get_username(), "tokens_revoked": count},
    )
    return count


def user_lock(*, user: Any, actor: str) -> None:
    """Lock a user out: no sign-in, and every token they hold is revoked at once."""
    if actor == f"user:{user.get_username()}":
        raise ValidationError({"user": ["you cannot lock yourself out"]})
    user.is_active = False
    user.save(update_fields=["is_active"])
    audit_record(kind="user.locked", actor=actor, data={"user": user.get_username()})
    tokens_revoke_for_user(user=user, actor=actor, reason="user locked")


def user_unlock(*, user: Any, actor: str) -> None:
    """Unlock a user: allow sign-in again and clear their failed-login lockouts (django-axes)."""
    user.is_active = True
    user.save(update_fields=["is_active"])
    axes_reset(username=user.get_username())
    audit_record(kind="user.unlocked", actor=actor, data={"user": user.get_username()})
