"""Reads for the authorization server: the active signing key and the published key set."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from django.contrib.auth import get_user_model
from django.db import connections, router
from django.db.models import Count, Q, QuerySet
from django.utils import timezone
from jwcrypto import jwk

from authserver.models import AccessToken, Client, Consent, RefreshToken, RevokedAccessToken, SigningKey
from authserver.revocation import REVOKED_PAST_EXP_S, RevocationSnapshot

_ACTIVE_CACHE_S = 5.0  # a rotation reaches every process within this, and the new key is already published
_active_lock = threading.Lock()
_active: dict[tuple[str, bool], tuple[float, SigningKey]] = {}


def active_key_cache_clear() -> None:
    """Forget the cached active keys (the rotation service calls this in its own process)."""
    with _active_lock:
        _active.clear()


def signing_key_active(algorithm: str, *, borrow: bool = False) -> SigningKey:
    """Return the key that signs new tokens with this algorithm, giving the family its first key if it has
    none (see ``services.signing_key_bootstrap``).

    Access tokens ask for ``AUTHSERVER["ACCESS_TOKEN_ALGORITHM"]`` with ``borrow``: while that family's
    first key is still being published (an install that signed with another algorithm until now), the
    active key of another family signs, and the token names its algorithm. ID tokens and audit
    checkpoints ask for ``crypto.ID_TOKEN_ALGORITHM`` and never borrow.
    """
    slot = (algorithm, borrow)
    cached = _active.get(slot)
    if cached is not None and time.monotonic() - cached[0] < _ACTIVE_CACHE_S:
        return cached[1]
    key = (
        SigningKey.objects.filter(state=SigningKey.State.ACTIVE, algorithm=algorithm)
        .order_by("-activated_at")
        .first()
    )
    from authserver.services import signing_family_wanted, signing_key_bootstrap

    if key is None:
        key = signing_key_bootstrap(algorithm, borrow=borrow)
    signing_family_wanted(algorithm)  # the family this process signs with stays in use (key rotation)
    with _active_lock:
        _active[slot] = (time.monotonic(), key)
    return key


@lru_cache(maxsize=16)
def private_jwk_for(kid: str, encrypted: bytes) -> jwk.JWK:
    """Decrypt a key once per process (decrypting and parsing RSA costs milliseconds).

    A key that neither ``PORTCULLIS_KEY_ENCRYPTION_KEY`` nor a previous one opens was encrypted under
    another one (the setting changed, or one replica has another value): the error names the key and the
    ways out, where Fernet's own says only that a signature did not match.
    """
    from cryptography.fernet import InvalidToken

    from authserver.crypto import PrivateKeyUnreadable, private_key_decrypt

    try:
        pem = private_key_decrypt(encrypted)
    except InvalidToken:
        raise PrivateKeyUnreadable(
            f"the signing key {kid} cannot be decrypted with this PORTCULLIS_KEY_ENCRYPTION_KEY: it was "
            "encrypted under another one. Set the key-encryption key it was made with (to change it, "
            "the old value goes in PORTCULLIS_KEY_ENCRYPTION_KEY_PREVIOUS and `bin/manage resealkeys` "
            "moves every key to the new one), or run `bin/manage rotatekeys --activate-now` to sign "
            "with new keys (tokens the old keys signed still verify until they expire)"
        ) from None
    return jwk.JWK.from_pem(pem)


@lru_cache(maxsize=16)
def private_signing_key_for(kid: str, encrypted: bytes) -> Any:
    """The same key as a ``cryptography`` private key, the form PyJWT signs with (kept once per process)."""
    return private_jwk_for(kid, encrypted).get_op_key("sign")


def _client_table_where(db: Any) -> str:
    """``table WHERE client_id = %s``, quoted for this connection: a client looked up by its client id."""
    quote = db.ops.quote_name
    return f"{quote(Client._meta.db_table)} WHERE {quote(Client._meta.get_field('client_id').column)} = %s"


@lru_cache(maxsize=64)
def _client_select(db: Any) -> tuple[str, list[str], list[tuple[int, Any, list[Any]]]]:
    """The SQL, attribute names and value converters of ``client_by_client_id``, built once per connection
    object (the converters belong to it); each thread keeps its own for the life of the process."""
    meta = Client._meta
    fields = meta.concrete_fields
    columns = ", ".join(db.ops.quote_name(f.column) for f in fields)
    sql = f"SELECT {columns} FROM {_client_table_where(db)}"  # noqa: S608 (names from the model, quoted)
    converters = []
    for index, field in enumerate(fields):
        column = field.get_col(meta.db_table)
        found = db.ops.get_db_converters(column) + field.get_db_converters(db)
        if found:
            converters.append((index, column, found))
    return sql, [f.attname for f in fields], converters


def client_lock_shared(client_id: str | None) -> None:
    """Hold the named client's row, shared, until the transaction ends (PostgreSQL's ``FOR SHARE``): a
    change to the client (its grant types, scopes, or its disabling, which revoke what the client may no
    longer hold) waits for the transaction, and one under way holds the transaction here until it commits,
    so the transaction's reads of the client afterwards see it changed. Taken before a grant that consumes
    a code or a refresh token reads anything else: a refresh that read the client before such a change
    committed issued tokens its revocation had not seen (a live refresh token of a grant the client had
    lost). Many transactions may hold one client's row at once. SQLite has no row locks (and serializes its
    writers): nothing to take there."""
    if not isinstance(client_id, str) or "\x00" in client_id:
        return  # none named, or none PostgreSQL text can hold: the grant is refused as it would be
    db = connections[router.db_for_write(Client)]
    if db.vendor != "postgresql":
        return
    with db.cursor() as cursor:
        cursor.execute(f"SELECT 1 FROM {_client_table_where(db)} FOR SHARE", [client_id])  # noqa: S608


def client_by_client_id(client_id: str | None) -> Client | None:
    """Return the client with this client id, or None.

    The token endpoint's hottest read: one SELECT through a cursor, converted the way the ORM converts it,
    without compiling the query each time (about 130 us of CPU here, where ``objects.get`` took 440 us).
    """
    if not isinstance(client_id, str) or "\x00" in client_id:
        return None  # none given, or not one PostgreSQL text can hold (NUL): no client has it
    alias = router.db_for_read(Client)
    db = connections[alias]  # this thread's connection itself: the proxy costs a lookup on every use
    sql, attnames, converters = _client_select(db)
    with db.cursor() as cursor:
        cursor.execute(sql, [client_id])
        row = cursor.fetchone()
    if row is None:
        return None
    values = list(row)
    for index, column, found in converters:
        for convert in found:
            values[index] = convert(values[index], column, db)
    return Client.from_db(alias, attnames, values)


def signing_keys_published(*, now: datetime | None = None) -> list[SigningKey]:
    """Return the keys the JWKS publishes: due pending keys, the active key and unexpired retired keys."""
    now = now or timezone.now()
    return list(
        SigningKey.objects.filter(
            Q(state=SigningKey.State.PENDING, publish_at__lte=now)
            | Q(state=SigningKey.State.ACTIVE)
            | Q(state=SigningKey.State.RETIRED)
        ).order_by("-created_at")
    )


def jwks_get(*, now: datetime | None = None) -> dict[str, Any]:
    """Return the public JWK Set (RFC 7517 §5)."""
    return {"keys": [key.public_jwk for key in signing_keys_published(now=now)]}


def revocations_live(*, since: datetime | None = None) -> RevocationSnapshot:
    """Return what is revoked and still matters: the ids of revoked access tokens a gateway could still
    take (not expired, give or take its clock leeway), only those revoked at or after ``since`` if given,
    and every disabled client."""
    read_at = time.time()
    horizon = timezone.now() - timedelta(seconds=REVOKED_PAST_EXP_S)
    rows = RevokedAccessToken.objects.filter(expires__gt=horizon)
    if since is not None:
        rows = rows.filter(revoked_at__gte=since)
    jtis, newest = [], None
    for jti, expires, revoked_at in rows.values_list("jti", "expires", "revoked_at"):
        jtis.append((str(jti), int(expires.timestamp())))
        newest = revoked_at if newest is None or revoked_at > newest else newest
    return RevocationSnapshot(
        jtis=tuple(jtis),
        clients=frozenset(Client.objects.filter(disabled=True).values_list("client_id", flat=True)),
        read_at=read_at,
        revoked_through=newest,
    )


def token_checksum(token: str) -> str:
    """The SHA-256 checksum an access or refresh token's row keeps (DOT's ``token_checksum``): rows are
    found by it, never by the token."""
    return hashlib.sha256(token.encode()).hexdigest()


def access_token_live(*, token: str, now: datetime | None = None) -> AccessToken | None:
    """Return the row of a live access token this server issued, found by the token itself (its row keeps
    a SHA-256 checksum), with its user and client, or None: unknown, revoked or expired."""
    checksum = token_checksum(token)
    return (
        AccessToken.objects.select_related("user", "application")
        .filter(token_checksum=checksum, expires__gt=now or timezone.now())
        .first()
    )


# --- administration reads (the console and the admin API) -------------------------------------------


def clients_search(*, query: str = "", now: datetime | None = None) -> QuerySet[Client]:
    """Return clients whose name, client id or description contains the query, newest first."""
    clients = Client.objects.order_by("-created")
    if query:
        clients = clients.filter(
            Q(name__icontains=query) | Q(client_id__icontains=query) | Q(description__icontains=query)
        )
    live = Q(accesstoken__expires__gt=now or timezone.now())
    return clients.annotate(live_tokens=Count("accesstoken", filter=live, distinct=True))


def access_tokens_active(
    *, client: Client | None = None, user: Any = None, now: datetime | None = None
) -> QuerySet[AccessToken]:
    """Return the unexpired access tokens, optionally of one client and/or one user, newest first."""
    tokens = AccessToken.objects.select_related("application", "user").filter(
        expires__gt=now or timezone.now()
    )
    if client is not None:
        tokens = tokens.filter(application=client)
    if user is not None:
        tokens = tokens.filter(user=user)
    return tokens.order_by("-created")


def users_search(*, query: str = "", now: datetime | None = None) -> QuerySet[Any]:
    """Return users whose user name or e-mail contains the query, with their consent and token counts."""
    users = get_user_model().objects.order_by("username")
    if query:
        users = users.filter(Q(username__icontains=query) | Q(email__icontains=query))
    return users.annotate(
        consent_count=Count("consents", distinct=True),
        token_count=Count(
            "authserver_accesstoken",
            filter=Q(authserver_accesstoken__expires__gt=now or timezone.now()),
            distinct=True,
        ),
    )


@dataclass(frozen=True)
class ConnectedApp:
    """An app that holds access to a user's account: by a remembered consent, live tokens, or both."""

    client: Client
    scopes: list[tuple[str, str]]  # (scope, plain-words description)
    since: datetime
    live_tokens: int


def connected_apps_for_user(*, user: Any, now: datetime | None = None) -> list[ConnectedApp]:
    """Return the apps that hold access to this user's account, with their scopes in plain words."""
    from django.conf import settings

    now = now or timezone.now()
    described = dict(settings.SCOPES)
    apps: dict[int, dict[str, Any]] = {}
    for consent in Consent.objects.filter(user=user).select_related("client"):
        apps[consent.client.pk] = {
            "client": consent.client,
            "scopes": set(consent.scope.split()),
            "since": consent.granted_at,
            "live": 0,
        }
    # A live refresh token is access too, its access token expired or not (an app approved before its
    # consent was remembered, a device flow's among them, must still be listed, so it can be withdrawn).
    lifetime = timedelta(seconds=settings.REFRESH_TOKEN_LIFETIME_S)
    refresh_tokens = RefreshToken.objects.filter(
        user=user, revoked__isnull=True, created__gt=now - lifetime
    ).select_related("application")
    for refresh in refresh_tokens:
        if refresh.application is not None:
            apps.setdefault(
                refresh.application.pk,
                {"client": refresh.application, "scopes": set(), "since": refresh.created, "live": 0},
            )
    for token in AccessToken.objects.filter(user=user, expires__gt=now).select_related("application"):
        if token.application is None:
            continue
        entry = apps.setdefault(
            token.application.pk,
            {"client": token.application, "scopes": set(), "since": token.created, "live": 0},
        )
        entry["scopes"] |= set(token.scope.split())
        entry["since"] = min(entry["since"], token.created)
        entry["live"] += 1
    return [
        ConnectedApp(
            client=entry["client"],
            scopes=[(scope, described.get(scope, scope)) for scope in sorted(entry["scopes"])],
            since=entry["since"],
            live_tokens=entry["live"],
        )
        for entry in sorted(apps.values(), key=lambda e: e["client"].name.lower())
    ]


def active_key_age_s() -> float:
    """Seconds since the oldest active signing key started signing, so that a family whose rotation is
    stuck shows (0 when there is none yet)."""
    key = SigningKey.objects.filter(state=SigningKey.State.ACTIVE).order_by("activated_at").first()
    if key is None or key.activated_at is None:
        return 0.0
    return (timezone.now() - key.activated_at).total_seconds()
