"""``resealkeys``: seal every signing key under the current key-encryption key (after changing it)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from authserver.services import signing_keys_reseal


class Command(BaseCommand):
    help = (
        "Seal every signing key's private part under PORTCULLIS_KEY_ENCRYPTION_KEY. To change that key: "
        "move its old value to PORTCULLIS_KEY_ENCRYPTION_KEY_PREVIOUS, set the new one, restart, run "
        "this, then drop the previous value and restart again. Fails, naming them, if some key is sealed "
        "under a key-encryption key that neither setting holds."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        result = signing_keys_reseal(actor="cli:resealkeys")
        for kid in result.resealed:
            self.stdout.write(f"resealed key {kid}")
        self.stdout.write(
            f"{len(result.resealed)} resealed, {len(result.current)} already under the current key, "
            f"{len(result.unreadable)} unreadable"
        )
        if result.unreadable:
            raise CommandError(
                f"{len(result.unreadable)} key(s) open with no configured key-encryption key: "
                f"{', '.join(result.unreadable)}. Put the key-encryption key they were sealed with in "
                "PORTCULLIS_KEY_ENCRYPTION_KEY_PREVIOUS and run this again; until then they cannot sign, "
                "and audit checkpoints they signed do not verify"
            )
