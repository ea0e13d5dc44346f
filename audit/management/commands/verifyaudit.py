"""``verifyaudit``: walk the audit chain and check every signed checkpoint (and, if asked, their age)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from audit.chain import ChainReport, chain_verify, checkpoint_age_problem


def _utc(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


class Command(BaseCommand):
    help = "Verify the audit hash chain and signed checkpoints; name the first record that does not match."

    def add_arguments(self, parser: CommandParser) -> None:
        # No default: a restored backup, or a copy verified for an investigation, holds honest checkpoints
        # that are old by then. Where beat runs, pass a few of its ten-minute periods (3600 lets a restart
        # or a deploy pause it for most of an hour): an older newest signature fails.
        parser.add_argument(
            "--max-checkpoint-age",
            type=int,
            metavar="SECONDS",
            help="fail when the newest signed checkpoint is older than this",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        max_age_s: int | None = options["max_checkpoint_age"]
        if max_age_s is not None and max_age_s <= 0:
            raise CommandError("--max-checkpoint-age must be a positive number of seconds")
        report = chain_verify()
        if not report.ok:
            raise CommandError(
                f"audit chain BROKEN: {report.reason} (checked {report.checked} records before it)"
            )
        base = f", after record {report.base_seq} (archived and pruned)" if report.base_seq else ""
        self.stdout.write(
            f"audit chain OK: {report.checked} records{base}, "
            f"{report.checkpoints} signed checkpoints verified"
        )
        self._unsigned(report)
        problem = checkpoint_age_problem(report, max_age_s=max_age_s) if max_age_s is not None else ""
        if problem:
            raise CommandError(f"audit checkpoints STALE: {problem}")

    def _unsigned(self, report: ChainReport) -> None:
        # Records after the newest checkpoint are unsigned: cut from the end with the head moved back, they
        # would not show. How many there are, and how old the signature is, says how much that could hide.
        newest = f" (the newest written {_utc(report.newest_at)})" if report.newest_at else ""
        if report.signed_seq is None:
            self.stdout.write(f"no checkpoint signed yet: none of the {report.unsigned} records is signed")
            return
        signed = f", signed {_utc(report.signed_at)}" if report.signed_at else ""
        self.stdout.write(
            f"the newest checkpoint signs record {report.signed_seq}{signed}; "
            f"{report.unsigned} later records{newest} are not signed yet"
        )
