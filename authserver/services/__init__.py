"""Writes for the authorization server: clients, tokens and their revocation, signing keys, consents and
users, one module each. Callers import from ``authserver.services``, which names them all."""

from __future__ import annotations

from authserver.models import ADMIN_SCOPES
from authserver.services.clients import (
    CLIENT_EDITABLE,
    CLIENT_SECRET_LENGTH,
    GRANT_ALIASES,
    RegisteredClient,
    client_create,
    client_disable,
    client_enable,
    client_register,
    client_secret_rotate,
    client_update,
)
from authserver.services.consents import consent_grant, consent_withdraw
from authserver.services.signing_families import (
    FAMILY_NOTE_S,
    FAMILY_WANTED_MIN_S,
    signing_algorithms_in_use,
    signing_algorithms_rotated,
    signing_family_notes_forget,
    signing_family_wanted,
    signing_family_window_s,
)
from authserver.services.signing_keys import (
    SIGNING_KEYS_LOCK,
    ResealResult,
    RotationResult,
    signing_key_bootstrap,
    signing_key_revoke,
    signing_key_rotate,
    signing_keys_reseal,
)
from authserver.services.tokens import (
    access_token_deletions_batched,
    access_token_insert,
    access_token_revoke,
    access_tokens_deleted,
    revoked_access_tokens_prune,
    tokens_revoke_by_holder,
    tokens_revoke_for_client,
    tokens_revoke_for_scopes,
    tokens_revoke_for_user,
)
from authserver.services.users import user_deactivated, user_lock, user_unlock

__all__ = [
    "ADMIN_SCOPES",
    "CLIENT_EDITABLE",
    "CLIENT_SECRET_LENGTH",
    "FAMILY_NOTE_S",
    "FAMILY_WANTED_MIN_S",
    "GRANT_ALIASES",
    "SIGNING_KEYS_LOCK",
    "RegisteredClient",
    "ResealResult",
    "RotationResult",
    "access_token_deletions_batched",
    "access_token_insert",
    "access_token_revoke",
    "access_tokens_deleted",
    "client_create",
    "client_disable",
    "client_enable",
    "client_register",
    "client_secret_rotate",
    "client_update",
    "consent_grant",
    "consent_withdraw",
    "revoked_access_tokens_prune",
    "signing_algorithms_in_use",
    "signing_algorithms_rotated",
    "signing_family_notes_forget",
    "signing_family_wanted",
    "signing_family_window_s",
    "signing_key_bootstrap",
    "signing_key_revoke",
    "signing_key_rotate",
    "signing_keys_reseal",
    "tokens_revoke_by_holder",
    "tokens_revoke_for_client",
    "tokens_revoke_for_scopes",
    "tokens_revoke_for_user",
    "user_deactivated",
    "user_lock",
    "user_unlock",
]
