"""Access and refresh tokens: the fast insert the validator issues with, and revocation (one token, a
client's, a user's), recorded with the deletion and pushed to the gateways once it commits."""

from __future__ import annotations

import calendar
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from django.db import connections, router, transaction
from django.db.models.signals import post_save, pre_save
from django.utils import timezone
from oauth2_provider.models import get_device_grant_model

from audit.services import audit_record
from authserver.models import AccessToken, Client, Grant, RefreshToken, RevokedAccessToken
from authserver.revocation import REVOKED_PAST_EXP_S, revocation_publish

_batch = threading.local()  # the access tokens ``access_token_deletions_batched`` collects in this thread
RECORD_BATCH = 1000  # rows per INSERT of the record: 3 parameters each, well under any driver's limit


def _jti_exp(tokens: list[AccessToken]) -> list[tuple[str, int]]:
    return [(str(t.jti), calendar.timegm(t.expires.utctimetuple())) for t in tokens if t.jti]


def _unredeemed_grants_delete(*, client: Client | None = None, user: Any = None) -> None:
    """Delete the grants not yet redeemed for tokens, of a client or a user or both: the authorization codes
    (Grant) and the device codes a user entered or approved. Each is a token waiting for its redemption (a
    code's exchange, a device's next poll): a revocation that left them let the client redeem them after."""
    codes, devices = Grant.objects.all(), get_device_grant_model().objects.all()
    if client is not None:
        codes, devices = codes.filter(application=client), devices.filter(client_id=client.client_id)
    if user is not None:
        codes, devices = codes.filter(user=user), devices.filter(user=user)
    codes.delete()
    devices.delete()


def tokens_revoke_for_client(*, client: Client, actor: str, reason: str) -> int:
    """Revoke every access and refresh token of a client; push the revocation. Return how many."""
    with transaction.atomic(), access_token_deletions_batched():
        count = tokens_delete(client=client)
    audit_record(
        kind="token.revoked",
        actor=actor,
        client_id=client.client_id,
        data={"reason": reason, "tokens_revoked": count},
    )
    return count


def access_tokens_deleted(tokens: list[AccessToken]) -> None:
    """Record the revocation of deleted access tokens that have not expired, in the deletion's transaction,
    and push it once the deletion commits. The record is what a gateway process that starts later (or a
    Redis restarted empty) learns it from: the pushes reach only the processes running at the time."""
    collecting: list[AccessToken] | None = getattr(_batch, "tokens", None)
    if collecting is not None:  # one deletion of many tokens: recorded and pushed together at its end
        collecting.extend(tokens)
        return
    now = timezone.now()
    pairs = _jti_exp([t for t in tokens if t.expires > now])
    if not pairs:
        return
    RevokedAccessToken.objects.bulk_create(
        [RevokedAccessToken(jti=jti, expires=datetime.fromtimestamp(exp, UTC)) for jti, exp in pairs],
        ignore_conflicts=True,  # two revocations of one token at once both saw its row: one record
        batch_size=RECORD_BATCH,
    )
    transaction.on_commit(lambda: revocation_publish(jtis=pairs))


@contextmanager
def access_token_deletions_batched() -> Iterator[None]:
    """Record the access tokens deleted in the block (inside its transaction) with a few multi-row INSERTs
    and one push at its end, instead of one INSERT and one push per token (a client's 50k tokens). If the
    block raises, nothing is recorded: its transaction rolls the deletion back."""
    outer: list[AccessToken] | None = getattr(_batch, "tokens", None)
    if outer is not None:  # nested: the outer block records them, less what a failing inner block collected
        mark = len(outer)
        try:
            yield
        except BaseException:
            del outer[mark:]  # its savepoint (if any) rolled those deletions back
            raise
        return
    collected: list[AccessToken] = []
    _batch.tokens = collected
    try:
        yield
    finally:
        _batch.tokens = None
    access_tokens_deleted(collected)


def revoked_access_tokens_prune(*, now: datetime | None = None) -> int:
    """Delete the records of revoked access tokens that no gateway would take any more; return how many."""
    horizon = (now or timezone.now()) - timedelta(seconds=REVOKED_PAST_EXP_S)
    count, _ = RevokedAccessToken.objects.filter(expires__lte=horizon).delete()
    return count


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


def tokens_revoke_for_scopes(*, client: Client, scopes: set[str], actor: str) -> int:
    """Revoke a client's access tokens that carry any of ``scopes`` (the scopes an admin took from it), and
    every refresh token it holds if ``offline_access`` is among them; return how many access tokens. A
    refresh of the rest renews only what the client may still ask for (the validator)."""
    now = timezone.now()
    with transaction.atomic(), access_token_deletions_batched():
        live = AccessToken.objects.filter(application=client, expires__gt=now).values_list("pk", "scope")
        carrying = [pk for pk, scope in live.iterator() if scopes.intersection(scope.split())]
        count = 0
        for start in range(0, len(carrying), RECORD_BATCH):
            deleted, _ = AccessToken.objects.filter(pk__in=carrying[start : start + RECORD_BATCH]).delete()
            count += deleted
        refreshes = 0
        if "offline_access" in scopes:
            refreshes = RefreshToken.objects.filter(application=client, revoked__isnull=True).update(
                revoked=now
            )
    if count or refreshes:
        audit_record(
            kind="token.revoked",
            actor=actor,
            client_id=client.client_id,
            data={
                "reason": "scopes removed from the client",
                "scopes": sorted(scopes),
                "tokens_revoked": count,
                "refreshes_revoked": refreshes,
            },
        )
    return count


def tokens_revoke_by_holder(*, client: Client, users: bool, own: bool, actor: str, reason: str) -> int:
    """Revoke a client's tokens held for its users (``users``: the access and refresh tokens a user
    delegated, and the codes and device codes not yet redeemed) and/or its own (``own``: client
    credentials' access tokens, which have no refresh token), recorded; return how many access tokens."""
    count = refreshes = 0
    with transaction.atomic(), access_token_deletions_batched():
        if users:
            refreshes = RefreshToken.objects.filter(
                revoked__isnull=True, application=client, user__isnull=False
            ).update(revoked=timezone.now())
            _total, deleted = AccessToken.objects.filter(application=client, user__isnull=False).delete()
            count += deleted.get(AccessToken._meta.label, 0)
            _unredeemed_grants_delete(client=client)
        if own:
            _total, deleted = AccessToken.objects.filter(application=client, user__isnull=True).delete()
            count += deleted.get(AccessToken._meta.label, 0)
    if count or refreshes:  # nothing held, nothing to record
        audit_record(
            kind="token.revoked",
            actor=actor,
            client_id=client.client_id,
            data={"reason": reason, "tokens_revoked": count, "refreshes_revoked": refreshes},
        )
    return count


def tokens_revoke_for_user(*, user: Any, actor: str, reason: str, client: Client | None = None) -> int:
    """Revoke every access and refresh token a user holds, across clients or at ``client`` only (the
    client's other users, and the user's other clients, keep theirs), recorded; return how many."""
    with transaction.atomic(), access_token_deletions_batched():
        count = tokens_delete(user=user, client=client)
    audit_record(
        kind="token.revoked",
        actor=actor,
        client_id=client.client_id if client is not None else "",
        data={"reason": reason, "user": user.get_username(), "tokens_revoked": count},
    )
    return count


def tokens_delete(*, client: Client | None = None, user: Any = None) -> int:
    """Revoke the access and refresh tokens of a client, of a user (across clients), or of a user at one
    client, and delete their unredeemed codes and device codes, inside the caller's transaction and
    unrecorded (the caller records why: a revocation, a withdrawn consent); return how many access tokens."""
    if client is None and user is None:
        raise ValueError("tokens_delete needs a client, a user or both")  # not every token there is
    held = {"application": client, "user": user}
    held = {field: value for field, value in held.items() if value is not None}
    RefreshToken.objects.filter(revoked__isnull=True, **held).update(revoked=timezone.now())
    _total, deleted = AccessToken.objects.filter(**held).delete()
    _unredeemed_grants_delete(client=client, user=user)
    return deleted.get(AccessToken._meta.label, 0)
