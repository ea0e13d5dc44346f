"""Clients: registration, the administrators' changes, a new secret, and disabling one at once."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from oauth2_provider.generators import generate_client_id

from audit.services import audit_record
from authserver.models import ADMIN_SCOPES, Client, origin_errors, redirect_uri_errors
from authserver.revocation import revocation_publish
from authserver.services.tokens import (
    tokens_revoke_by_holder,
    tokens_revoke_for_client,
    tokens_revoke_for_scopes,
)

CLIENT_SECRET_LENGTH = 128
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
    allowed_origins: list[str] | None = None,
    post_logout_redirect_uris: list[str] | None = None,
    scopes: list[str] | None = None,
    owner: Any = None,
    description: str = "",
    logo_url: str = "",
    can_introspect: bool = False,
    actor: str = "system",
) -> RegisteredClient:
    """Create a client; return it with its secret in clear (the only time it exists in clear)."""
    grants = [GRANT_ALIASES.get(g, g) for g in grant_types]
    if uri_errors := redirect_uri_errors(redirect_uris or []):  # before they are joined with spaces
        raise ValidationError({"redirect_uris": uri_errors})
    if uri_errors := redirect_uri_errors(post_logout_redirect_uris or []):
        raise ValidationError({"post_logout_redirect_uris": uri_errors})
    if bad_origins := origin_errors(allowed_origins or []):
        raise ValidationError({"allowed_origins": bad_origins})
    secret = None if public else secrets.token_urlsafe(96)[:CLIENT_SECRET_LENGTH]
    client = Client(
        name=name,
        client_id=generate_client_id(),
        client_type=Client.CLIENT_PUBLIC if public else Client.CLIENT_CONFIDENTIAL,
        authorization_grant_type=grants[0] if grants else "",
        grant_types=grants,
        redirect_uris=" ".join(redirect_uris or []),
        allowed_origins=" ".join(allowed_origins or []),
        post_logout_redirect_uris=" ".join(post_logout_redirect_uris or []),
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
    allowed_origins: list[str] | None = None,
    post_logout_redirect_uris: list[str] | None = None,
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
            allowed_origins=allowed_origins,
            post_logout_redirect_uris=post_logout_redirect_uris,
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
    "allowed_origins",
    "post_logout_redirect_uris",  # where RP-initiated logout may send the user back (space-separated)
    "allowed_scopes",
    "grant_types",
    "can_introspect",
    "is_admin_client",
)


def client_update(*, client: Client, actor: str, **fields: Any) -> Client:
    """Change a client's editable fields (validated like a new client) and audit what changed. Tokens that
    carry a scope the client may no longer ask for are revoked at once (a refresh renews only the rest), and
    so are the tokens of a grant it may no longer use (``_grants_lost``)."""
    unknown = set(fields) - set(CLIENT_EDITABLE)
    if unknown:
        raise ValidationError({"client": [f"unknown fields: {', '.join(sorted(unknown))}"]})
    if "grant_types" in fields:
        fields["grant_types"] = [GRANT_ALIASES.get(g, g) for g in fields["grant_types"]]
        if not fields["grant_types"]:
            raise ValidationError({"grant_types": ["choose at least one grant type"]})
    changed = [name for name, value in fields.items() if getattr(client, name) != value]
    before = _scopes_held(client)
    grants_before = _grants_of(client)
    for name in changed:
        setattr(client, name, fields[name])
    if "grant_types" in changed:
        client.authorization_grant_type = client.grant_types[0]
    _scopes_check(client.scope_list(), is_admin_client=client.is_admin_client)
    client.full_clean(exclude=["client_secret"])
    if changed:
        removed = before - _scopes_held(client)
        with transaction.atomic():
            client.save()
            audit_record(
                kind="client.changed", actor=actor, client_id=client.client_id, data={"changed": changed}
            )
            if removed:
                tokens_revoke_for_scopes(client=client, scopes=removed, actor=actor)
            users, own = _grants_lost(grants_before, _grants_of(client))
            if users or own:
                tokens_revoke_by_holder(
                    client=client, users=users, own=own, actor=actor, reason="grant types narrowed"
                )
    return client


USER_GRANTS = frozenset({Client.GRANT_AUTHORIZATION_CODE, GRANT_ALIASES["device-code"]})


def _grants_of(client: Client) -> frozenset[str]:
    """The grants a client may use, as ``Client.allows_grant_type`` reads them."""
    return frozenset(client.grant_types or [client.authorization_grant_type])


def _grants_lost(before: frozenset[str], after: frozenset[str]) -> tuple[bool, bool]:
    """Whether a change of grant types takes away every grant a user delegates by (the authorization code
    and the device flow: their users' tokens go, refresh tokens included, which a remaining client-credentials
    grant would otherwise have let be refreshed for ever), and whether it takes away client credentials (the
    client's own tokens go). Taking one user grant while the other stays revokes nothing: a token does not
    say which of the two issued it."""
    users = bool(before & USER_GRANTS) and not after & USER_GRANTS
    own = Client.GRANT_CLIENT_CREDENTIALS in before and Client.GRANT_CLIENT_CREDENTIALS not in after
    return users, own


def _scopes_held(client: Client) -> set[str]:
    """The scopes a client's tokens may carry: its own, and admin scopes only while it is administrative."""
    return {scope for scope in client.scope_list() if client.may_ask_for([scope])}


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
