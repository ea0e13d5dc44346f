"""``pruneaudit``: archive and prune audit rows older than a date (the audited retention job)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from audit.management.commands._arguments import file_to_write_check, moment_parse, text
from audit.retention import PruneRefused, audit_archive_and_prune

# The newest 90 days stay in the database unless --force: what the console's reports, the anomaly rules
# and an investigation read first. A cutoff inside them (or in the future, which empties the log) is more
# often a typo than a policy.
RETENTION_MIN = timedelta(days=90)


class Command(BaseCommand):
    help = (
        "Archive audit events and usage records older than --before to --archive, then delete them. "
        f"--before must be at least {RETENTION_MIN.days} days ago unless --force."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--before", required=True, help="a date or ISO datetime (UTC unless an offset)")
        parser.add_argument(
            "--archive", required=True, type=text, help="the JSON-lines file to write (must not exist)"
        )
        parser.add_argument(
            "--force",
            action="store_true",
            help=f"allow a --before less than {RETENTION_MIN.days} days ago, or in the future",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        before = moment_parse(options["before"], "--before")
        latest = timezone.now() - RETENTION_MIN
        if before > latest and not options["force"]:
            raise CommandError(
                f"--before {before.isoformat()} would prune records less than {RETENTION_MIN.days} days old "
                f"(the latest cutoff is {latest.date()}); pass --force if that is meant"
            )
        archive = Path(options["archive"])
        file_to_write_check(archive, "--archive", exclusive=True)  # refused before anything is deleted
        try:  # created exclusively: an archive made meanwhile is refused too, and nothing is deleted
            result = audit_archive_and_prune(before=before, archive=archive, actor="cli:pruneaudit")
        except FileExistsError:
            raise CommandError(f"--archive: {archive} exists; choose a new file") from None
        except PruneRefused as exc:
            raise CommandError(f"{exc} (the archive {archive} was written)") from None
        except OSError as exc:  # written and synced before the delete: a failure leaves every row in place
            raise CommandError(f"--archive: {archive} cannot be written: {exc.strerror}") from None
        self.stdout.write(
            f"archived and pruned {result.events} events and {result.usage} usage records to {archive} "
            f"(sha256 {result.sha256}); the chain now starts after record {result.base_seq}"
        )
