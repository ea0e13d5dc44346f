"""``python manage.py auditreport``: build an audit report over any period; print, write or store it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from audit.management.commands._arguments import file_to_write_check, moment_parse, text
from audit.reports import FORMATS, ReportPeriodError, period_check, report_build, report_render, report_save

ACTOR = "system"  # a shell on the server: there is no signed-in user to name


class Command(BaseCommand):
    help = (
        "Build an audit report over [--since, --until) (UTC unless an offset is given; --until defaults to "
        "now) and print it, write it to --out, and with --store also save it as a stored report."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--since", required=True, help="start, included: YYYY-MM-DD or ISO 8601")
        parser.add_argument("--until", help="end, excluded: YYYY-MM-DD or ISO 8601 (default: now)")
        parser.add_argument("--format", choices=FORMATS, default="html", help="html (default), csv or json")
        parser.add_argument("--out", metavar="FILE", type=text, help="write the report to FILE, not stdout")
        parser.add_argument("--store", action="store_true", help="also save it (listed in the console)")

    def handle(self, *args: Any, **options: Any) -> None:
        since = moment_parse(options["since"], "--since")
        until = moment_parse(options["until"], "--until") if options["until"] else timezone.now()
        try:
            period_check(since, until)
        except ReportPeriodError:
            raise CommandError(
                f"--since ({since.isoformat()}) must be before --until ({until.isoformat()})"
            ) from None
        out = Path(options["out"]) if options["out"] else None
        if out is not None:  # before --store saves a report that the write would then fail to deliver
            file_to_write_check(out, "--out")
        data = report_build(since=since, until=until, kind="custom", created_by=ACTOR)
        content = report_render(data, options["format"])
        if options["store"]:
            report = report_save(data=data, fmt=options["format"], created_by=ACTOR)
            # stderr, so a report printed to stdout stays clean for a pipe
            self.stderr.write(f"Stored report {report.pk} ({report.filename()}).", style_func=str)
        if out is None:
            self.stdout.write(content, ending="" if content.endswith("\n") else "\n")
            return
        try:
            out.write_text(content, encoding="utf-8")
        except OSError as exc:
            raise CommandError(f"--out: {out} cannot be written: {exc.strerror}") from None
        self.stdout.write(f"Wrote the {options['format']} report to {out}.")
