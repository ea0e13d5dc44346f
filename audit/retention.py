"""Retention: the one audited way old audit rows leave the database (archive, then prune).

Rows older than a cutoff are written to a new JSON-lines archive (with its SHA-256; an existing file is
never overwritten), which is on disk before anything is deleted. Then one transaction deletes exactly the
rows the archive holds (with ``portcullis.audit_prune`` set for the deletes alone: the only case the
append-only trigger lets through), moves the chain's base to the last pruned record, records the run as
an audit event naming the count, the archive digest and the new base, and signs a checkpoint over that
event. ``verifyaudit`` trusts a moved base only when a signature covers the record that moved it, so all
of this commits together or not at all: a crash at any point leaves the old chain or the new one, and
both verify.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from django.core import serializers
from django.db import connection, transaction
from django.db.models import Q, QuerySet

from audit.chain import PRUNED_KIND, chain_prune, checkpoint_sign
from audit.models import AuditCheckpoint, AuditEvent, UsageRecord
from audit.services import audit_record


class PruneRefused(Exception):
    """The prune was rolled back: its own record could not be signed."""


@dataclass(frozen=True)
class PruneResult:
    events: int
    usage: int
    archive: Path
    sha256: str
    base_seq: int


RUNS_PER_DELETE = 400  # two parameters a run: 800 and the cutoff stay under SQLite's oldest limit, 999


@dataclass
class _IdRuns:
    """The ids of the rows written to the archive, as runs of consecutive ids (low, high).

    Usage records reach the database late (the ingest, a spool replay), so an old one can commit after
    the archive was read: deleting "older than the cutoff" again, or up to the highest id archived (ids
    are taken in one order and committed in another), would take it unarchived. The rows are archived in
    id order, so a run breaks only where an id was not archived and this stays small."""

    runs: list[list[int]] = field(default_factory=list)

    def add(self, pk: int) -> None:
        if self.runs and self.runs[-1][1] + 1 == pk:
            self.runs[-1][1] = pk
        else:
            self.runs.append([pk, pk])

    def delete(self, queryset: QuerySet[Any]) -> int:
        """Delete the rows of ``queryset`` these ids name; return how many."""
        deleted, per_statement = 0, RUNS_PER_DELETE
        for start in range(0, len(self.runs), per_statement):
            named = Q()
            for low, high in self.runs[start : start + per_statement]:
                named |= Q(pk__range=(low, high))
            deleted += queryset.filter(named).delete()[0]
        return deleted


def audit_archive_and_prune(*, before: datetime, archive: Path, actor: str) -> PruneResult:
    """Archive every audit event and usage record older than ``before`` to ``archive``, then delete them.

    ``archive`` must not exist (FileExistsError): it is the only copy of what is pruned."""
    cutoff = AuditEvent.objects.filter(occurred_at__lt=before, seq__isnull=False).order_by("-seq").first()
    before_seq = (cutoff.seq or 0) + 1 if cutoff is not None else 0
    # Events are bounded by seq, which the chain hands out in commit order: a late old event is chained
    # after the head, so the delete takes exactly the events archived. Usage records are deleted by id.
    events = AuditEvent.objects.filter(seq__lt=before_seq)
    usage = UsageRecord.objects.filter(occurred_at__lt=before)
    usage_archived = _IdRuns()
    sha256 = _archive_write(archive, (events.order_by("seq"), None), (usage.order_by("pk"), usage_archived))
    with transaction.atomic():
        base_seq, base_hash = chain_prune(before_seq=before_seq)
        with _deletes_allowed():
            counts = (events.delete()[0], usage_archived.delete(usage))
            AuditCheckpoint.objects.filter(seq__lte=base_seq).delete()
        pruning = audit_record(
            kind=PRUNED_KIND,
            actor=actor,
            data={
                "events": counts[0],
                "usage_records": counts[1],
                "archive_sha256": sha256,
                "before": before.isoformat(),
                "base_seq": base_seq,
                "base_hash": base_hash,
            },
        )
        if checkpoint_sign(pruning=pruning) is None:
            # Unsigned, its record could never be: beat signs no head past a pruning record no checkpoint
            # covers (a forged one would erase signed history)
            raise PruneRefused(
                "the pruning record could not be signed (no signing key, or the chain does not verify: "
                "see the log); nothing was pruned"
            )
    return PruneResult(counts[0], counts[1], archive, sha256, base_seq)


def _archive_write(archive: Path, *sources: tuple[QuerySet[Any], _IdRuns | None]) -> str:
    """Write the rows to a new file ``archive`` as JSON lines, noting each row's id in its runs if given,
    and sync it to disk; return the file's SHA-256.

    Created exclusively: an earlier archive is the only copy of the rows it holds, so it is never
    overwritten, whoever calls. Synced before the prune commits: otherwise a crash just after it could
    lose the only copy. A write that fails (a full disk) removes the partial file it made, before anything
    was deleted: it would otherwise hold the name for the next run."""
    digest = hashlib.sha256()
    with archive.open("x", encoding="utf-8") as out:
        try:
            for queryset, archived in sources:
                for row in serializers.serialize("python", queryset.iterator()):
                    line = json.dumps(row, default=str, sort_keys=True) + "\n"
                    digest.update(line.encode())
                    out.write(line)
                    if archived is not None:
                        archived.add(row["pk"])
            out.flush()
            os.fsync(out.fileno())
        except BaseException:
            archive.unlink()  # ours (created exclusively above), and nothing was deleted yet
            raise
    directory = os.open(archive.parent, os.O_RDONLY)  # the file's name is on disk only once its directory is
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return digest.hexdigest()


@contextmanager
def _deletes_allowed() -> Iterator[None]:
    """Let the append-only trigger pass deletes in the statements inside, and only those (PostgreSQL).

    ``SET LOCAL`` lasts to the end of the transaction, which goes on to write the pruning record and
    the checkpoint: the setting is switched off again for that, so nothing else the transaction runs
    can delete an audit row. (On an error the transaction rolls back, and the setting with it.)"""
    if connection.vendor != "postgresql":
        yield
        return
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL portcullis.audit_prune = 'on'")
    yield
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL portcullis.audit_prune = 'off'")
