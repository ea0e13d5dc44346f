"""What every management command's arguments share: text that is UTF-8, moments, and files to write.

Python decodes a command line with ``surrogateescape``, so a byte that is not UTF-8 reaches a command as a
lone surrogate: writing it to the database or to stdout fails with a traceback, and one stored breaks every
page that shows it. ``text`` refuses it where the arguments are parsed. It lives in the audit app, the one
app every other may import (``[tool.importlinter]``); Django runs no module whose name starts with ``_``.
"""

from __future__ import annotations

import argparse
import os
from datetime import UTC, datetime
from pathlib import Path

from django.core.management.base import CommandError
from django.utils import timezone

from audit.chain import unicode_valid

# Nothing Portcullis records is older than the Unix epoch; the end leaves room for the minutes a report
# reads on either side of its period. Outside these, datetime arithmetic overflows.
MOMENT_MIN = datetime(1970, 1, 1, tzinfo=UTC)
MOMENT_MAX = datetime(9999, 1, 1, tzinfo=UTC)


def text(value: str) -> str:
    """An argparse type: the argument as given, refused when it holds bytes that are not UTF-8."""
    if not unicode_valid(value):
        raise argparse.ArgumentTypeError("not valid UTF-8 text")
    return value


def moment_parse(value: str, option: str) -> datetime:
    """Parse YYYY-MM-DD or an ISO 8601 datetime; without an offset it is UTC. Return it in UTC."""
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise CommandError(
            f"{option}: {value!r} is not a date (YYYY-MM-DD) or an ISO 8601 datetime (2026-11-01T06:00:00Z)"
        ) from None
    utc: datetime | None
    try:
        utc = moment.replace(tzinfo=UTC) if timezone.is_naive(moment) else moment.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+01:00 falls in year 0 in UTC
        utc = None
    if utc is None or not MOMENT_MIN <= utc < MOMENT_MAX:
        raise CommandError(
            f"{option}: {value!r} is out of range: give a moment from {MOMENT_MIN.date()} to before "
            f"{MOMENT_MAX.date()} (UTC)"
        )
    return utc


def file_to_write_check(path: Path, option: str, *, exclusive: bool = False) -> None:
    """Refuse, before any work is done, a file that cannot be written: its folder missing or not writable,
    the path a folder, or (``exclusive``) a file already there."""
    if path.is_dir():
        raise CommandError(f"{option}: {path} is a folder; name a file")
    if exclusive and (path.exists() or path.is_symlink()):
        raise CommandError(f"{option}: {path} exists; choose a new file")
    folder = path.parent
    if not folder.is_dir():
        raise CommandError(f"{option}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise CommandError(f"{option}: {path} cannot be written (permission denied)")
