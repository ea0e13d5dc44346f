"""``setpolicy``: set a client's gateway policy (or the default policy) from the command line."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from authserver.models import Client
from gateway.services import policy_set

NO_LIMIT = object()


def _limit(value: str) -> object:
    """A limit: a whole number, or 'none' for no limit."""
    if value.lower() in {"none", "off", "unlimited"}:
        return NO_LIMIT
    return int(value)


class Command(BaseCommand):
    help = "Set a client's policy (pass --default instead of a client id for the default policy)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("client", nargs="?", help="client id")
        parser.add_argument("--default", action="store_true", help="set the policy of clients without one")
        parser.add_argument("--models", help="comma-separated model ids ('' for none)")
        for name in ("rpm", "tpm", "concurrency", "daily-tokens", "max-tokens", "user-rpm", "user-tpm"):
            parser.add_argument(f"--{name}", type=_limit, help="a whole number, or 'none' for no limit")
        parser.add_argument(
            "--allow-ip", action="append", dest="allow_ips", help="CIDR (repeat); 'any' clears"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["default"] == bool(options["client"]):
            raise CommandError("name a client id, or pass --default")
        client = None
        if options["client"]:
            client = Client.objects.filter(client_id=options["client"]).first()
            if client is None:
                raise CommandError(f"no client {options['client']!r}")
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
