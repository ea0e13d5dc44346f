"""``rotatekeys``: start (or advance) a staged signing-key rotation."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from audit.management.commands._arguments import text
from authserver.services import signing_key_revoke, signing_key_rotate


class Command(BaseCommand):
    help = (
        "Publish a new signing key now in every key family in use (the access-token algorithm and "
        "RS256 for ID tokens); each starts signing once it has been published for "
        "PORTCULLIS_KEY_PUBLISH_AHEAD seconds (beat, or running this again, activates it). "
        "--activate-now switches at once; --revoke=KID unpublishes a leaked key at once (replacing it "
        "first if it signs), and gateways drop the tokens it signed."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        action = parser.add_mutually_exclusive_group()
        action.add_argument("--activate-now", action="store_true")
        action.add_argument(
            "--revoke",
            metavar="KID",
            type=text,
            help="unpublish this key at once (it leaked); write --revoke=KID, as a kid may begin with '-'",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        revoke: str | None = options["revoke"]
        if revoke is not None and options["activate_now"]:  # call_command(...) skips the parser's group
            raise CommandError("--activate-now and --revoke exclude each other")
        if revoke is not None:  # "" is a mistake (an empty variable), not a request for a plain rotation
            if not revoke.strip():
                raise CommandError("--revoke needs the kid of the key to revoke")
            try:
                result = signing_key_revoke(revoke, actor="cli:rotatekeys")
            except ValidationError as exc:
                raise CommandError("; ".join(exc.messages)) from None
        else:
            result = signing_key_rotate(
                force=True, activate_now=options["activate_now"], actor="cli:rotatekeys"
            )
        for kid in result.created:
            self.stdout.write(f"published new key {kid}")
        for kid in result.activated:
            self.stdout.write(f"activated key {kid}")
        for kid in result.retired:
            self.stdout.write(f"retired key {kid} (its algorithm no longer signs)")
        for kid in result.removed:
            self.stdout.write(f"removed key {kid}" if revoke is not None else f"removed retired key {kid}")
        if not (result.created or result.activated or result.retired or result.removed):
            self.stdout.write("a pending key is already published; it activates when due")
