"""``demo``: set up the embedded demo (an admin and two clients) and print how to try it."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from authserver.models import Client
from authserver.services import client_register


def _credentials_read(path: Path) -> dict[str, str]:
    """The credentials an earlier run kept (none on the first): a file that is not them stops the command."""
    try:
        creds = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8, or not JSON
        raise CommandError(f"{path} cannot be read ({exc}); move it away to make new demo clients") from None
    if not isinstance(creds, dict) or not all(isinstance(v, str) for v in creds.values()):
        raise CommandError(f"{path} is not the demo's credentials; move it away to make new demo clients")
    return creds


def _credentials_write(path: Path, creds: dict[str, str]) -> None:
    """Write the credentials readable by this user alone, from the first byte (not chmod-ed after)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        os.fchmod(fd, 0o600)  # a file an older version left 0644 is made private before it is rewritten
        out.write(json.dumps(creds, indent=2))


class Command(BaseCommand):
    help = "Create the demo admin and clients (once) and print the URLs, login and a curl for a token."

    def handle(self, *args: Any, **options: Any) -> None:
        path = Path(settings.VAR_DIR) / "demo-credentials.json"
        creds = _credentials_read(path)
        user_model = get_user_model()
        if not user_model.objects.filter(username="admin").exists():
            creds["admin_password"] = secrets.token_urlsafe(12)
            user_model.objects.create_superuser("admin", "admin@example.com", creds["admin_password"])
        if not Client.objects.filter(client_id=creds.get("service_client_id", "-")).exists():
            service = client_register(
                name="Demo service", grant_types=["client-credentials"], can_introspect=True, actor="cli:demo"
            )
            creds["service_client_id"] = service.client.client_id
            creds["service_client_secret"] = service.client_secret or ""
        if not Client.objects.filter(client_id=creds.get("cli_client_id", "-")).exists():
            cli = client_register(
                name="Demo CLI",
                grant_types=["device-code", "authorization-code"],
                public=True,
                redirect_uris=["http://127.0.0.1:8765/callback"],
                scopes=["models.read", "completions", "embeddings", "offline_access", "openid", "profile"],
                actor="cli:demo",
            )
            creds["cli_client_id"] = cli.client.client_id
        _credentials_write(path, creds)
        self._print(creds)

    def _print(self, creds: dict[str, str]) -> None:
        base = settings.PORTCULLIS_ISSUER
        lines = [
            "",
            "Portcullis is starting (embedded default: SQLite, no Redis, one process).",
            f"  Console:      {base}/console/",
            f"  Admin login:  admin / {creds.get('admin_password', '(set before; see the file below)')}",
            f"  Discovery:    {base}/.well-known/oauth-authorization-server",
            f"  Demo service client: {creds['service_client_id']}",
            f"  Demo CLI client (public, device flow): {creds['cli_client_id']}",
            "",
            "Get an access token (client credentials):",
            f"  curl -s -u '{creds['service_client_id']}:{creds.get('service_client_secret', '')}' \\",
            f"       -d grant_type=client_credentials -d 'scope=models.read completions' {base}/oauth/token/",
            "",
            f"(credentials are kept in {Path(settings.VAR_DIR) / 'demo-credentials.json'}; demo use only)",
            "",
        ]
        self.stdout.write("\n".join(lines))
