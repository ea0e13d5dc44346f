"""Verifying the audit chain: recompute every hash, check every signed checkpoint, name the first mismatch.

``chain_verify`` reads everything from one snapshot of the database, starts from the base an
archive-and-prune run moved only when the chain itself vouches for that base (its ``audit.pruned``
record, covered by a signed checkpoint), verifies any record still present below it rather than skipping
it, and says how many of the newest records no signature covers yet (those could be cut off unseen) and
when the newest checkpoint was signed. ``checkpoint_age_problem`` says when that is too long ago. It
keeps the hashes of the records checkpoints name and of the last one only, so its memory does not grow
with the chain. ``chain_tail_verify`` is what beat runs before it signs: only the records after the newest
checkpoint, and no pruning record among them but the one a prune is signing as it writes it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from django.db import connection, transaction
from django.db.migrations.recorder import MigrationRecorder
from django.utils import timezone

from audit.chain.checkpoints import Verifier, checkpoint_verifier
from audit.chain.head import chain_head
from audit.chain.links import GENESIS, link_hash
from audit.models import AuditCheckpoint, AuditEvent, ChainHead

PRUNED_KIND = "audit.pruned"  # the record an archive-and-prune run writes, naming the base it moved to


@dataclass
class ChainReport:
    ok: bool
    checked: int
    checkpoints: int
    first_bad_seq: int | None = None
    first_bad_id: int | None = None
    reason: str = ""
    base_seq: int = 0  # records up to this one were archived and pruned
    signed_seq: int | None = None  # the record the newest signed checkpoint covers
    signed_at: datetime | None = None  # when the newest signature was made (the signed time)
    unsigned: int = 0  # records after it: no signature covers them, so cutting them off shows nowhere
    newest_at: datetime | None = None  # when the newest record was written
    oldest_at: datetime | None = None  # when the oldest record still in the chain was written


@dataclass
class _Walk:
    """What recomputing the chain found: how far it got, the hashes of the records the checkpoints name,
    and the pruning records. Only those hashes are kept (and the last one), so memory does not grow with the
    chain's length."""

    start_seq: int
    start_hash: str
    last_seq: int
    last_hash: str
    hashes: dict[int, str] = field(default_factory=dict)
    pruning: list[AuditEvent] = field(default_factory=list)  # every audit.pruned record: one per prune
    newest_at: datetime | None = None
    oldest_at: datetime | None = None

    @property
    def checked(self) -> int:
        return self.last_seq - self.start_seq

    def pruned(self, base_seq: int) -> list[int]:
        """The pruning records that name ``base_seq`` as the base they moved the chain to."""
        return [
            e.seq
            for e in self.pruning
            if e.seq is not None and isinstance(e.data, dict) and e.data.get("base_seq") == base_seq
        ]


def _events(after: int = 0, batch: int = 2000, upto: int | None = None) -> Iterator[AuditEvent]:
    """The records after ``after`` (up to ``upto``) in order, in batches by seq (no server-side cursor):
    inside the verification's snapshot every batch sees the same records."""
    last = after
    records = AuditEvent.objects.all() if upto is None else AuditEvent.objects.filter(seq__lte=upto)
    while True:
        rows = list(records.filter(seq__gt=last).order_by("seq")[:batch])
        if not rows:
            return
        yield from rows
        last = rows[-1].seq or last


def _walk_start(base_seq: int, base_hash: str) -> tuple[int, str]:
    """Where verification starts: the chain's base, unless records at or below it are still there.

    Pruning deletes every record up to the base in the transaction that moves it, so a record at or below
    the base means the base moved some other way (the head row is not append-only): those records are
    verified rather than skipped, from genesis when the first is still there, and the base is reported."""
    first = AuditEvent.objects.filter(seq__isnull=False, seq__lte=base_seq).order_by("seq").first()
    if first is None or first.seq is None:
        return base_seq, base_hash
    return first.seq - 1, GENESIS if first.seq == 1 else first.prev_hash


def _walk(start_seq: int, start_hash: str, keep: frozenset[int]) -> _Walk | ChainReport:
    """Recompute the whole chain after ``start_seq``, keeping the hashes at the seqs in ``keep`` (verify's
    walk; the tail check before signing recomputes a part of it)."""
    return _recompute(start_seq, start_hash, keep=keep)


def _recompute(
    start_seq: int, start_hash: str, *, keep: frozenset[int] = frozenset(), upto: int | None = None
) -> _Walk | ChainReport:
    """Recompute the chain after ``start_seq`` (up to ``upto``); a report when a record is missing or does
    not match."""
    walk = _Walk(start_seq, start_hash, start_seq, start_hash)
    for event in _events(after=start_seq, upto=upto):
        expected = walk.last_seq + 1
        if event.seq != expected:
            reason = f"record {expected} is missing (found {event.seq})"
            return ChainReport(False, walk.checked, 0, expected, event.pk, reason)
        if event.prev_hash != walk.last_hash or event.hash != link_hash(walk.last_hash, event):
            reason = f"record {event.seq} does not match its hash"
            return ChainReport(False, walk.checked, 0, event.seq, event.pk, reason)
        if event.kind == PRUNED_KIND:
            walk.pruning.append(event)
        if expected in keep:
            walk.hashes[expected] = event.hash
        walk.last_seq, walk.last_hash = expected, event.hash
        walk.newest_at = event.occurred_at
        walk.oldest_at = walk.oldest_at or event.occurred_at
    return walk


@contextmanager
def _snapshot() -> Iterator[None]:
    """Run the verification's statements against one view of the database.

    Checkpoints, the head and the records are read in separate statements: a prune or appends committing
    between them would show as a break that is not there ("record 1 is missing" when a prune deletes the
    records the walk was about to read). On PostgreSQL a read-only REPEATABLE READ transaction gives every
    statement the snapshot its first one took; the isolation level can be set only before a transaction's
    first query, so inside a caller's transaction that transaction's own view applies. SQLite (the embedded
    default) reads as before, statement by statement: there a transaction takes the database's write lock
    when it begins (``transaction_mode`` IMMEDIATE), and a verification from the console would hold up
    every token request for as long as it ran."""
    if connection.vendor != "postgresql":
        yield
        return
    fresh = connection.get_autocommit()  # not inside a transaction: the atomic block below begins one
    with transaction.atomic():
        if fresh:
            with connection.cursor() as cursor:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        yield


def chain_verify() -> ChainReport:
    """Recompute the chain and check every checkpoint; report the first record that does not match."""
    with _snapshot():
        return _verify()


def _verify() -> ChainReport:
    # Checkpoints are read first: each was signed after the records it covers were committed, so without a
    # snapshot (inside a caller's transaction at READ COMMITTED) one signed while the chain is being walked
    # still cannot pass for records cut from the chain's end.
    checkpoints = list(AuditCheckpoint.objects.order_by("seq", "pk"))
    head = ChainHead.objects.order_by("pk").first()
    base_seq, base_hash = (head.base_seq, head.base_hash) if head is not None else (0, GENESIS)
    walk = _walk(*_walk_start(base_seq, base_hash), frozenset(c.seq for c in checkpoints))
    if isinstance(walk, ChainReport):
        return walk
    checked = walk.checked
    outside = AuditEvent.objects.filter(seq__isnull=True).order_by("pk").first()
    if outside is not None:
        return ChainReport(
            False, checked, 0, None, outside.pk, f"record id {outside.pk} is outside the chain"
        )
    seq, head_hash = chain_head()
    if seq != walk.last_seq or head_hash != walk.last_hash:
        reason = f"the chain head says {seq} records, found {checked}"
        return ChainReport(False, checked, 0, walk.last_seq + 1, None, reason)
    report = _checkpoints_verify(checkpoints, walk)
    problem = _base_problem(base_seq, walk, report.signed_seq) if report.ok else ""
    if problem:
        report.ok, report.first_bad_seq, report.reason = False, base_seq, problem
    report.base_seq = base_seq
    return report


def _base_problem(base_seq: int, walk: _Walk, signed_seq: int | None) -> str:
    """Why the chain's base cannot be trusted, or "" (genesis, or moved by an archive-and-prune run).

    The head row that holds the base is rewritten on every append, so the base must be vouched for by the
    chain itself: the pruning record that moved it and, once checkpoints are signed, a signature over that
    record (any database writer can append a record that names a base, but cannot sign one)."""
    if base_seq == 0:
        return ""
    if walk.start_seq < base_seq:
        return (
            f"records {walk.start_seq + 1} to {base_seq} are still there, but the chain's base says they "
            "were pruned"
        )
    pruned = walk.pruned(base_seq)
    if not pruned:
        return f"the chain starts after record {base_seq}, but no {PRUNED_KIND} record names that base"
    if signed_seq is not None and signed_seq < pruned[0]:
        return (
            f"the {PRUNED_KIND} record {pruned[0]} that moved the chain's base to {base_seq} is not "
            "covered by a signed checkpoint (an archive-and-prune run signs its own as it writes it; beat "
            "signs no head past one that is not signed)"
        )
    return ""


def _signature_problem(checkpoint: AuditCheckpoint, verifier: Verifier | None) -> tuple[str, dict[str, Any]]:
    """Return why a checkpoint's signature fails ("" when it holds), and what it signed."""
    payload = verifier(checkpoint.signature) if verifier is not None else None
    if payload is None:
        return f"checkpoint at record {checkpoint.seq} has no valid signature", {}
    signed = json.loads(payload)
    if (signed.get("seq"), signed.get("hash")) != (checkpoint.seq, checkpoint.head_hash):
        return f"checkpoint at record {checkpoint.seq} does not match what was signed", signed
    return "", signed


def _checkpoint_problem(
    checkpoint: AuditCheckpoint, verifier: Verifier | None, walk: _Walk
) -> tuple[str, dict[str, Any]]:
    """Return why a checkpoint fails ("" when it holds), and what it signed."""
    problem, signed = _signature_problem(checkpoint, verifier)
    if problem:
        return problem, signed
    if checkpoint.seq > walk.last_seq:
        return (
            f"the chain ends at record {walk.last_seq}, before the signed checkpoint at record "
            f"{checkpoint.seq}: records were cut from its end"
        ), signed
    if checkpoint.seq < walk.start_seq:  # pruning deletes the checkpoints up to the base with the records
        return f"checkpoint at record {checkpoint.seq} is below the chain's base, {walk.start_seq}", signed
    known = walk.start_hash if checkpoint.seq == walk.start_seq else walk.hashes.get(checkpoint.seq)
    if known != checkpoint.head_hash:
        return f"record {checkpoint.seq} differs from the signed checkpoint", signed
    return "", signed


def _checkpoints_verify(checkpoints: list[AuditCheckpoint], walk: _Walk) -> ChainReport:
    verifier = checkpoint_verifier()
    checked = walk.checked
    # The newest signature is the latest signed time of any checkpoint: beat signs an unmoved head again,
    # so several checkpoints can share the newest seq.
    signed_times: list[datetime] = []
    for count, checkpoint in enumerate(checkpoints):
        problem, signed = _checkpoint_problem(checkpoint, verifier, walk)
        if problem:
            return ChainReport(False, checked, count, checkpoint.seq, None, problem)
        if isinstance(signed.get("at"), int):
            signed_times.append(datetime.fromtimestamp(signed["at"], tz=UTC))
    report = ChainReport(True, checked, len(checkpoints), unsigned=checked, newest_at=walk.newest_at)
    report.oldest_at = walk.oldest_at
    if checkpoints:
        report.signed_seq, report.unsigned = checkpoints[-1].seq, walk.last_seq - checkpoints[-1].seq
        report.signed_at = max(signed_times, default=None)
    return report


# --- before a checkpoint is signed ------------------------------------------------------------------------


@dataclass(frozen=True)
class TailCheck:
    """What a new checkpoint may sign: the head, unless ``problem`` says why not."""

    seq: int
    hash: str
    problem: str = ""


def chain_tail_verify(*, pruning: AuditEvent | None = None) -> TailCheck:
    """Verify what a new checkpoint would vouch for beyond the newest one (``checkpoint_sign`` runs this).

    A signature makes what it covers evidence, so the head is signed only once the records after the newest
    checkpoint (after the chain's base, before the first one) recompute and end at the head. Only those are
    read, so beat's job stays cheap however long the chain. And none of them may be an ``audit.pruned``
    record, but ``pruning`` when it names the base the head holds: an archive-and-prune run signs its own
    record in the transaction that writes it, and says which it is. Any other that no signature covers moved
    the base some other way (a database writer who deleted signed history from the chain's start, and
    appended a record that names a base), and signing it would make that erasure verify."""
    with _snapshot():
        return _tail_verify(pruning)


def _tail_verify(pruning: AuditEvent | None) -> TailCheck:
    head = ChainHead.objects.order_by("pk").first()
    if head is None:
        return TailCheck(0, GENESIS)
    start = _tail_start(head)
    if isinstance(start, str):
        return TailCheck(head.seq, head.hash, start)
    start_seq, start_hash, signed = start
    walk = _recompute(start_seq, start_hash, upto=head.seq)
    if isinstance(walk, ChainReport):
        return TailCheck(head.seq, head.hash, walk.reason)
    problem = ""
    if (walk.last_seq, walk.last_hash) != (head.seq, head.hash):
        problem = f"the chain head says it ends at record {head.seq}, but the records end at {walk.last_seq}"
    elif not signed:  # walked from the chain's base: is the base itself vouched for, as verify asks
        problem = _base_problem(head.base_seq, walk, None)
    return TailCheck(head.seq, head.hash, problem or _unsigned_pruning_problem(walk.pruning, head, pruning))


def _unsigned_pruning_problem(records: list[AuditEvent], head: ChainHead, own: AuditEvent | None) -> str:
    """Why a pruning record after the newest checkpoint cannot be signed, or "" (there is none, or it is
    ``own``, the one an archive-and-prune run is signing as it writes it, naming the head's base)."""
    for record in records:
        data = record.data if isinstance(record.data, dict) else {}
        names_base = (data.get("base_seq"), data.get("base_hash")) == (head.base_seq, head.base_hash)
        if not (names_base and own is not None and record.pk == own.pk):
            return (
                f"the {PRUNED_KIND} record {record.seq} after the newest checkpoint was not written by an "
                "archive-and-prune run (a run signs its own record as it writes it): the chain's base was "
                "moved some other way"
            )
    return ""


def _tail_start(head: ChainHead) -> tuple[int, str, bool] | str:
    """Where the tail starts (seq, hash, whether a checkpoint signs it): the newest checkpoint once its
    signature and its record hold, the chain's base when none is signed yet; or why it cannot start."""
    checkpoint = AuditCheckpoint.objects.order_by("-seq", "-pk").first()
    if checkpoint is None:
        return (*_walk_start(head.base_seq, head.base_hash), False)
    problem, _signed = _signature_problem(checkpoint, checkpoint_verifier())
    if problem:
        return problem
    if checkpoint.seq > head.seq:
        return (
            f"the chain head says it ends at record {head.seq}, before the signed checkpoint at record "
            f"{checkpoint.seq}: records were cut from its end"
        )
    record = AuditEvent.objects.filter(seq=checkpoint.seq).first()
    if record is None or record.hash != checkpoint.head_hash:
        return f"record {checkpoint.seq} differs from the signed checkpoint"
    return checkpoint.seq, checkpoint.head_hash, True


def _audit_tables_made() -> datetime | None:
    """When the audit app's first migration was applied: the install's age, which a log emptied whole
    cannot take with it (it lives in Django's own table)."""
    applied: datetime | None = (
        MigrationRecorder.Migration.objects.filter(app="audit")
        .order_by("applied")
        .values_list("applied", flat=True)
        .first()
    )
    return applied


def checkpoint_age_problem(report: ChainReport, *, max_age_s: int, now: datetime | None = None) -> str:
    """Say why the newest signature is too old to vouch for the chain's end, or return "".

    Beat signs the head every ten minutes even when it has not moved, so the newest signature is never much
    older than that while beat runs. An older one means beat stopped, or the newest checkpoints were deleted
    and the records after the one left cut off: nothing else shows that. With no checkpoint at all, the age
    is that of the oldest record, so a fresh install passes until beat has had time to sign; with no record
    either, that of the audit tables (an emptied log, checkpoints and all, had passed as a fresh one)."""
    now = now or timezone.now()
    if report.signed_seq is None:
        if report.oldest_at is None:
            made = _audit_tables_made()
            age = int((now - made).total_seconds()) if made is not None else 0
            if age <= max_age_s:
                return ""
            return (
                f"no checkpoint is signed and the log holds no record, though its tables were made {age} s "
                f"ago, more than the {max_age_s} s allowed: the log was emptied, or beat never ran"
            )
        age = int((now - report.oldest_at).total_seconds())
        if age <= max_age_s:
            return ""
        return (
            f"no checkpoint is signed, and the oldest record was written {age} s ago, more than the "
            f"{max_age_s} s allowed"
        )
    if report.signed_at is None:
        return f"the newest checkpoint, at record {report.signed_seq}, carries no signed time"
    age = int((now - report.signed_at).total_seconds())
    if age <= max_age_s:
        return ""
    return (
        f"the newest checkpoint was signed {age} s ago ({report.signed_at:%Y-%m-%d %H:%M:%S}Z), more than "
        f"the {max_age_s} s allowed: beat has stopped signing, or the newest checkpoints were deleted (and "
        "records after the newest one left could have been cut off unseen)"
    )
