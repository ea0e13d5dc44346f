"""A file spool for the audit records a stopping gateway process could not hand off to Redis.

A gateway process holds in memory what Redis has not taken (Redis down, or refusing writes at
``maxmemory``). When it stops in that state (a deploy, a scale-down, a restart during a Redis outage), those
records would go with it. Instead it writes them to a spool file before it exits, and the next gateway
process to start on the same directory adopts the file: its records go to the head of that process's
queue and are handed off first, and the file is deleted once Redis has taken every one of them.

- **Written whole or not at all.** A spool is written to a temporary name, flushed to disk (``fsync``) and
  then renamed, so a reader sees only complete files; the directory is flushed too, so the name survives
  a power loss. Files are readable by their owner only.
- **One adopter per file.** A process adopts a file by taking an exclusive ``flock`` on it, held until
  the file's records are handed off; the lock goes with a process that dies (even by SIGKILL), and its
  files are then adopted again. A gateway looks for files at its start and every few seconds after (so a
  file that a process stopping during a rolling deploy leaves behind is found by one still running), and
  only while Redis takes its records and it has room: files of at most ``limit`` records at a time, so one
  process does not take in every replica's spool at once and fill its own buffer.
- **A file that cannot be parsed is set aside,** renamed to end in ``.set-aside`` (kept whole for a person
  to read, and logged once, not at every look), and the scan says so, for the caller to audit. A file that
  cannot be opened, locked or read (the disk, or a network file system, failing) is logged once per process
  and left where it is, for a later look.
- **A half-written spool is recovered.** A temporary file older than ``STALE_TMP_S`` was left by a
  process that died while it wrote (its write takes milliseconds): it is renamed into the spool and adopted
  as any other, without its last record if that was cut off mid-way. (A writer stalled for that long, in a
  frozen container or on a hung network file system, would find its file gone: it then logs its records
  as lost, though they are in the spool.)
- **Replays are harmless.** A record adopted twice (a process that stopped after handing off part of a
  spool spools the rest again) carries its id, and the ingest stores each id once.

What a process holds when it is killed outright (SIGKILL, the machine lost) is still lost: only a stop
writes the spool.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

PREFIX = "audit-"
SUFFIX = ".jsonl"
TEMPORARY = ".tmp"  # a spool being written
SET_ASIDE = ".set-aside"
STALE_TMP_S = 600.0  # a temporary file this old was left by a process that died while writing it
_reported: set[Path] = set()  # files this process could not open, lock, read, recover or set aside


@dataclass
class Adopted:
    """A spool file this process has locked and read; its lock is held until ``spool_release``."""

    path: Path
    fd: int
    records: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Scan:
    """What one look at the spool directory found: files adopted, and the names of those set aside,
    recovered from a dead writer, or cut short."""

    adopted: list[Adopted] = field(default_factory=list)
    set_aside: list[str] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)  # temporary files a dead writer left, renamed in
    cut_short: list[str] = field(default_factory=list)  # adopted without a last record cut off mid-way


def spool_write(directory: Path, records: list[dict[str, str]]) -> Path:
    """Write records (stream fields: ``t`` and ``v``) to a new spool file, durably; return its path."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    name = f"{PREFIX}{time.time_ns():020d}-{os.getpid()}-{os.urandom(4).hex()}"
    temporary = directory / f"{name}{TEMPORARY}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            for record in records:
                out.write(json.dumps({"t": record["t"], "v": record["v"]}, separators=(",", ":")) + "\n")
            out.flush()
            os.fsync(out.fileno())
        path = directory / f"{name}{SUFFIX}"
        os.rename(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    try:
        _directory_sync(directory)
    except OSError:  # the file is whole and named; only its name's survival of a power loss is in doubt
        logger.warning("the audit spool directory %s could not be flushed to disk", directory)
    return path


def spool_adopt(directory: Path, limit: int) -> Scan:
    """Lock and read the spool files in the directory that no other process holds, oldest first, as many
    as hold ``limit`` records at most (and the first one whatever it holds, so that a large file is not
    left for ever). A file that cannot be parsed is set aside; a temporary file a dead writer left is
    recovered first."""
    scan = Scan()
    try:
        listing = list(directory.glob(f"{PREFIX}*"))
    except OSError:
        logger.exception("the audit spool directory %s could not be listed", directory)
        return scan
    _reported.intersection_update(listing)  # a file gone is logged again if it comes back
    recovered = _recover(sorted(path for path in listing if path.suffix == TEMPORARY))
    scan.recovered = [path.name for path in recovered]
    paths = sorted([path for path in listing if path.suffix == SUFFIX] + recovered)
    records = 0
    taken: int | None = None
    try:
        for path in paths:
            taken = _lock(path)
            if taken is None:
                continue
            spooled = _read_locked(path, taken, scan)
            if spooled is None:  # set aside (closed after the rename: no one reads it meanwhile), or left
                os.close(taken)
                taken = None
                continue
            if scan.adopted and records + len(spooled.records) > limit:
                os.close(taken)  # no room for it: left (unlocked) for the next look, here or elsewhere
                taken = None
                break
            scan.adopted.append(spooled)
            taken = None
            records += len(spooled.records)
    except BaseException:  # a scan that fails keeps nothing locked: every file is there for the next one
        if taken is not None:
            os.close(taken)
        for adopted in scan.adopted:
            os.close(adopted.fd)
        raise
    return scan


def _read_locked(path: Path, fd: int, scan: Scan) -> Adopted | None:
    """Read a locked spool file; None when it could not be read (set aside if it is damaged). A last record
    cut off mid-way (its writer died while writing it: a whole spool ends with a line break) is dropped,
    and the records before it are adopted."""
    try:
        with open(fd, "rb", closefd=False) as file:
            lines = file.read().split(b"\n")
        tail = lines.pop()  # empty when the file ends with a line break, as a whole spool does
        records = [_record(line) for line in lines if line.strip()]
        if tail.strip():
            try:
                records.append(_record(tail))
            except Exception:
                logger.warning(
                    "the audit spool file %s ends in a record cut off mid-way (%d bytes), dropped; %d kept",
                    path,
                    len(tail),
                    len(records),
                )
                scan.cut_short.append(path.name)
        return Adopted(path=path, fd=fd, records=records)
    except OSError:  # the disk or the network file system failed, not the file: looked at again later
        _report_once(path, "read")
    except Exception:  # damaged, or not ours: any parse error (a nesting too deep for json included)
        if _set_aside(path):
            scan.set_aside.append(path.name)
    return None


def spool_release(adopted: Adopted) -> None:
    """Delete a spool file whose records are all handed off, and let go of its lock (never raises: a file
    that cannot be deleted is logged, and its records, handed off, may be handed off again)."""
    try:
        adopted.path.unlink(missing_ok=True)
    except OSError:
        logger.exception("the handed-off audit spool file %s could not be deleted", adopted.path)
    finally:
        os.close(adopted.fd)


def _recover(temporaries: list[Path]) -> list[Path]:
    """Rename into the spool the temporary files that writers which died left behind; return their paths."""
    recovered = []
    now = time.time()
    for temporary in temporaries:
        try:
            if now - temporary.stat().st_mtime < STALE_TMP_S:
                continue  # being written
            path = temporary.with_suffix(SUFFIX)
            os.rename(temporary, path)
        except FileNotFoundError:  # renamed by its writer, or recovered by another process
            continue
        except OSError:
            _report_once(temporary, "recovered")
            continue
        logger.warning("the audit spool file %s was left half-written by a stopped process; recovered", path)
        recovered.append(path)
    return recovered


def _set_aside(path: Path) -> bool:
    """Rename a spool file that cannot be parsed out of the spool (called while its parse error is being
    handled, which the log shows); return whether it could be."""
    try:
        os.rename(path, path.with_name(path.name + SET_ASIDE))
    except OSError:
        _report_once(path, "read nor set aside")
        return False
    logger.exception(
        "the audit spool file %s could not be parsed; set aside as %s%s", path, path.name, SET_ASIDE
    )
    return True


def _report_once(path: Path, what: str) -> None:
    """Log a file that cannot be dealt with, once per process (the directory is looked at every few
    seconds)."""
    if path not in _reported:
        _reported.add(path)
        logger.exception("the audit spool file %s could not be %s; it is left where it is", path, what)


def _lock(path: Path) -> int | None:
    """Open and lock a spool file; None when it is gone, another process holds it, or it cannot be."""
    try:
        fd = os.open(path, os.O_RDWR)  # for writing too: NFS emulates flock with fcntl, which needs it
    except FileNotFoundError:  # another process handed it off and deleted it
        return None
    except OSError:
        _report_once(path, "opened")
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # Locked after its owner deleted it (between our listing and our lock): the path is gone or names
        # another file now, and what this descriptor reads was handed off already.
        if os.stat(path).st_ino != os.fstat(fd).st_ino:
            raise FileNotFoundError(path)
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        return None
    except OSError:
        _report_once(path, "locked")
        os.close(fd)
        return None
    return fd


def _record(line: bytes) -> dict[str, str]:
    fields = json.loads(line)
    if not isinstance(fields["t"], str) or not isinstance(fields["v"], str):
        raise TypeError("a spooled record's fields are strings")
    return {"t": fields["t"], "v": fields["v"]}


def _directory_sync(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
