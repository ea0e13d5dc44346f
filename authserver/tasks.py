"""Celery tasks of the authorization server."""

from __future__ import annotations

from celery import shared_task

from authserver.services import revoked_access_tokens_prune, signing_key_rotate


@shared_task(
    name="authserver.tasks.signing_keys_rotate_task", autoretry_for=(ConnectionError,), max_retries=3
)
def signing_keys_rotate_task() -> dict[str, list[str]]:
    """Advance the staged signing-key rotation (idempotent; beat runs it every few minutes)."""
    result = signing_key_rotate()
    return result.as_dict()


@shared_task(name="authserver.tasks.revoked_tokens_prune_task")
def revoked_tokens_prune_task() -> int:
    """Delete the records of revoked access tokens that have expired (beat runs it hourly)."""
    return revoked_access_tokens_prune()
