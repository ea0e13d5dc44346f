"""``createclient``: register an OAuth client and print its id and, once, its secret."""

from __future__ import annotations

import json
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from audit.management.commands._arguments import text
from authserver.services import GRANT_ALIASES, client_create


class Command(BaseCommand):
    help = "Register an OAuth client; prints the client id and, once, the client secret."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--name", required=True, type=text)
        parser.add_argument("--grant", action="append", required=True, choices=sorted(GRANT_ALIASES))
        parser.add_argument("--public", action="store_true", help="a public client (no secret; PKCE)")
        parser.add_argument("--redirect-uri", action="append", default=[], dest="redirect_uris", type=text)
        parser.add_argument(
            "--post-logout-redirect-uri",
            action="append",
            default=[],
            dest="post_logout_redirect_uris",
            type=text,
            help="where OIDC RP-initiated logout (/oauth/logout/) may send the user back; repeatable",
        )
        parser.add_argument("--scope", default="models.read completions embeddings", type=text)
        parser.add_argument("--introspect", action="store_true", help="may call the introspection endpoint")
        parser.add_argument("--json", action="store_true", help="print only a JSON object")

    def handle(self, *args: Any, **options: Any) -> None:
        if not options["name"].strip():  # the console's form requires a name too: it is what users see
            raise CommandError("--name: give the client a name")
        try:  # client_create, as the console and the admin API: known scopes only, no admin scope
            registered = client_create(
                name=options["name"],
                grant_types=options["grant"],
                public=options["public"],
                redirect_uris=options["redirect_uris"],
                post_logout_redirect_uris=options["post_logout_redirect_uris"],
                scopes=options["scope"].split(),
                can_introspect=options["introspect"],
                actor="cli:createclient",
            )
        except ValidationError as exc:
            raise CommandError(
                "; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())
            ) from None
        client_id, secret = registered.client.client_id, registered.client_secret
        if options["json"]:
            self.stdout.write(json.dumps({"client_id": client_id, "client_secret": secret}))
            return
        self.stdout.write(f"client_id:     {client_id}")
        if secret:
            self.stdout.write(f"client_secret: {secret}")
            self.stdout.write("The secret is shown only now; it is stored hashed.")
