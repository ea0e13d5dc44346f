"""``verifyaudit``: walk the audit chain and check every signed checkpoint."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from audit.chain import chain_verify


class Command(BaseCommand):
    help = "Verify the audit hash chain and signed checkpoints; name the first record that does not match."

    def handle(self, *args: Any, **options: Any) -> None:
        report = chain_verify()
        if not report.ok:
            raise CommandError(
                f"audit chain BROKEN: {report.reason} (checked {report.checked} records before it)"
            )
        self.stdout.write(
            f"audit chain OK: {report.checked} records, {report.checkpoints} signed checkpoints verified"
        )
