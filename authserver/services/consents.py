"""Consent: what a user allowed a client, remembered, and withdrawn with the tokens it let the client hold."""

from __future__ import annotations

from typing import Any

from django.db import transaction

from audit.services import audit_record
from authserver.models import Client, Consent
from authserver.services.tokens import access_token_deletions_batched, tokens_delete


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
    """Withdraw a user's consent for a client and revoke the tokens, codes and device codes it holds for them
    (recorded and pushed together)."""
    with transaction.atomic(), access_token_deletions_batched():
        Consent.objects.filter(user=user, client=client).delete()
        # the codes and device codes approved and not yet redeemed go too: each would still give a token
        count = tokens_delete(user=user, client=client)
    audit_record(kind="consent.withdrawn", actor=f"user:{user.get_username()}", client_id=client.client_id)
    return count
