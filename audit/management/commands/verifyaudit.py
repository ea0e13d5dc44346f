"""``verifyaudit``: walk the audit chain and check every signed checkpoint."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from audit.chain import chain_verify


def _utc(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


class Command(BaseCommand):
    help = "Verify the audit hash chain and signed checkpoints; name the first record that does not match."

    def handle(self, *args: Any, **options: Any) -> None:
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
