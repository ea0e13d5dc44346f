"""``setpolicy``: set a client's gateway policy (or the default policy) from the command line."""

from __future__ import annotations

import argparse
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from audit.management.commands._arguments import text
from authserver.models import Client
from gateway.models import ClientPolicy
from gateway.services import policy_set

NO_LIMIT = object()


def _limit(value: str) -> object:
    """A limit: a whole number, or 'none' for no limit (its range is the service's to check)."""
    if value.lower() in {"none", "off", "unlimited"}:
        return NO_LIMIT
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError("give a whole number, or 'none' for no limit") from None


class Command(BaseCommand):
    help = "Set a client's policy (pass --default instead of a client id for the default policy)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("client", nargs="?", type=text, help="client id")
        parser.add_argument("--default", action="store_true", help="set the policy of clients without one")
        parser.add_argument("--models", type=text, help="comma-separated model ids ('' for none)")
        for name in ("rpm", "tpm", "concurrency", "daily-tokens", "max-tokens", "user-rpm", "user-tpm"):
            parser.add_argument(f"--{name}", type=_limit, help="a whole number, or 'none' for no limit")
        parser.add_argument(
            "--allow-ip", action="append", dest="allow_ips", type=text, help="CIDR (repeat); 'any' clears"
        )
        parser.add_argument(
            "--if-absent",
            action="store_true",
            help="set it only if the policy does not exist yet (bin/run's default policy)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["default"] == bool(options["client"]):
            raise CommandError("name a client id, or pass --default")
        client = None
        if options["client"]:
            client = Client.objects.filter(client_id=options["client"]).first()
            if client is None:
                raise CommandError(f"no client {options['client']!r}")
        if options["if_absent"]:
            existing = ClientPolicy.objects.filter(client=client).first()
            if existing is not None:
                self.stdout.write(f"{existing}: exists, unchanged")
                return
        fields: dict[str, Any] = {}
        if options["models"] is not None:
            fields["allowed_models"] = [m.strip() for m in options["models"].split(",") if m.strip()]
        for name in ("rpm", "tpm", "concurrency", "daily_tokens", "max_tokens", "user_rpm", "user_tpm"):
            if options[name] is not None:
                fields[name] = None if options[name] is NO_LIMIT else options[name]
        if options["allow_ips"] is not None:
            fields["allow_ips"] = [] if options["allow_ips"] == ["any"] else options["allow_ips"]
        try:
            row = policy_set(client=client, actor="cli:setpolicy", **fields)
        except ValidationError as exc:
            raise CommandError(
                "; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())
            ) from None
        changes = ", ".join(f"{k}={getattr(row, k)}" for k in sorted(fields))
        self.stdout.write(f"{row}: {changes or 'unchanged'}")
