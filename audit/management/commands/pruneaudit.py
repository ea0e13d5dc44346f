"""``pruneaudit``: archive and prune audit rows older than a date (the audited retention job)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from audit.retention import audit_archive_and_prune


class Command(BaseCommand):
    help = "Archive audit events and usage records older than --before to --archive, then delete them."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--before", required=True, help="a date or ISO datetime (UTC)")
        parser.add_argument("--archive", required=True, help="the JSON-lines file to write (must not exist)")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            before = datetime.fromisoformat(options["before"])
        except ValueError:
            raise CommandError(f"--before {options['before']!r} is not a date") from None
        before = before if before.tzinfo else before.replace(tzinfo=UTC)
        archive = Path(options["archive"])
        try:  # the archive is created exclusively: an existing one is refused before anything is deleted
            result = audit_archive_and_prune(before=before, archive=archive, actor="cli:pruneaudit")
        except FileExistsError:
            raise CommandError(f"{archive} exists; choose a new archive file") from None
        self.stdout.write(
            f"archived and pruned {result.events} events and {result.usage} usage records to {archive} "
            f"(sha256 {result.sha256}); the chain now starts after record {result.base_seq}"
        )
