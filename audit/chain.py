"""The tamper-evident chain over audit events, and its signed checkpoints.

Every event commits to the one before it: ``hash = SHA-256(previous hash + canonical event)``, with a
gap-free sequence number. Writers lock the single ``ChainHead`` row (and, for SQLite, a process lock), so
concurrent writers cannot fork the chain. On PostgreSQL, writers outside a transaction commit in groups:
the events that queue up while one group commits are chained and committed together by the next, and
each writer returns once its own event is committed; a group whose process last left the head where it
still is goes in as one statement that moves the head only from there. A trigger refuses UPDATE and
DELETE on the audit tables. A beat job signs the head with the active signing key; ``verifyaudit``
recomputes the chain, checks every checkpoint signature, and names the first record that does not match.
It starts from the base an archive-and-prune run moved only when the chain itself vouches for that base,
and says how many of the newest records no signature covers yet (those could be cut off unseen).

The audit app imports no other app: the signer and the public keys are registered by the authorization
server (``checkpoint_keys_register``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from django.db import connection, connections, router, transaction

from audit.models import AuditCheckpoint, AuditEvent, ChainHead

GENESIS = "0" * 64
HEAD_CREATE_LOCK = 0x61756469  # PostgreSQL advisory lock id ("audi") taken only to create the head
_process_lock = threading.Lock()  # SQLite has no row locks; the embedded default is one process

Signer = Callable[[bytes], tuple[str, str]]  # payload -> (kid, compact JWS)
Verifier = Callable[[str], bytes | None]  # compact JWS -> payload if the signature verifies, else None
_keys: dict[str, Any] = {}


def checkpoint_keys_register(*, signer: Signer, verifier: Verifier) -> None:
    """Let the key owner (the authorization server) sign and verify checkpoints."""
    _keys["signer"], _keys["verifier"] = signer, verifier


def canonical(event: AuditEvent) -> bytes:
    """The exact bytes an event's hash covers."""
    return json.dumps(
        {
            "seq": event.seq,
            "occurred_at": event.occurred_at.isoformat(),
            "kind": event.kind,
            "outcome": event.outcome,
            "actor": event.actor,
            "client_id": event.client_id,
            "ip": event.ip,
            "request_id": event.request_id,
            "data": event.data,
            "event_id": str(event.event_id) if event.event_id else None,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        default=str,
    ).encode()


def link_hash(prev_hash: str, event: AuditEvent) -> str:
    """Return the chain hash of an event that follows ``prev_hash``."""
    return hashlib.sha256(prev_hash.encode() + canonical(event)).hexdigest()


@lru_cache(maxsize=4096)  # the same few addresses write most events; parsing one costs ~10 us
def normalise_ip(ip: str | None) -> str | None:
    """Store IPs the way the database returns them, so the hash survives a round trip: an IPv6 zone, which
    ``inet`` does not keep, is dropped, and an IPv4-mapped address (a dual-stack listener's) is its IPv4
    address (Python wrote ``::ffff:c000:207`` where the database gives back ``::ffff:192.0.2.7``, and the
    record then failed verification)."""
    if not ip:
        return None
    address = ipaddress.ip_address(ip.split("%", 1)[0])
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return str(mapped or address)


def storable(value: Any) -> Any:
    """The value with what PostgreSQL cannot store in text or JSON (NUL, lone surrogates) replaced.

    Attacker input reaches events (a grant type, a username, a client id): it must be recorded, not
    turn the write into an error."""
    if isinstance(value, str):
        if "\x00" in value:
            value = value.replace("\x00", "\ufffd")
        try:
            value.encode()
        except UnicodeEncodeError:
            value = value.encode(errors="replace").decode()
        return value
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [storable(v) for v in value]
    return value


def event_append(event: AuditEvent) -> AuditEvent:
    """Give an unsaved event its place in the chain and save it (the only way events are written)."""
    for name in ("kind", "outcome", "actor", "client_id", "request_id", "data"):
        setattr(event, name, storable(getattr(event, name)))
    if connection.vendor == "sqlite":
        with _process_lock:
            return _append([event])[0]
    if connection.in_atomic_block:
        # The caller's transaction decides whether the event exists, so it is chained on its connection.
        # No process lock on top of the head's row lock: a writer holding the row in an outer transaction
        # would deadlock against one holding that lock and waiting for the row.
        return _append([event])[0]
    return _group_append.append(event)


@dataclass(frozen=True)
class _Statements:
    """The three statements every append runs, with the event fields in column order; and on PostgreSQL
    the one statement that does all three when the head is where this process last left it."""

    head_lock: str
    insert: str  # "INSERT ... VALUES " : one row placeholder per event follows, then ``returning``
    row: str
    returning: str
    head_update: str
    fields: list[Any]
    moved_insert: str  # "WITH head AS (UPDATE ...) INSERT ... VALUES " : rows follow, then ``moved_tail``
    moved_row: str
    moved_tail: str


@lru_cache(maxsize=64)
def _statements(db: Any) -> _Statements:
    """Built once per connection object from the models. Every writer runs them, and the ORM compiled them
    on every call: about a third of the token endpoint's audit cost."""
    quote = db.ops.quote_name
    head, events = ChainHead._meta, AuditEvent._meta
    fields = [f for f in events.concrete_fields if not f.primary_key]
    lock = " FOR UPDATE" if db.features.has_select_for_update else ""
    head_table, head_pk = quote(head.db_table), quote(head.pk.column)
    seq, digest = quote(head.get_field("seq").column), quote(head.get_field("hash").column)
    columns = ", ".join(quote(f.column) for f in fields)
    # S608: every name below comes from the models and is quoted; values always travel as parameters.
    head_lock = f"SELECT {head_pk}, {seq}, {digest} FROM {head_table} ORDER BY {head_pk} LIMIT 1{lock}"  # noqa: S608
    head_update = f"UPDATE {head_table} SET {seq} = %s, {digest} = %s WHERE {head_pk} = %s"  # noqa: S608
    # The rows come as a VALUES list joined to the head's update, so their types are not the table's: each
    # value is cast, to text for character columns (a cast to varchar(n) would cut a long value short
    # where the insert refuses it, and the hash covers the whole value).
    types = [f.db_type(db) or "text" for f in fields]
    casts = ["text" if "char" in column_type else column_type for column_type in types]
    moved_insert = (
        f"WITH head AS (UPDATE {head_table} SET {seq} = %s, {digest} = %s "  # noqa: S608
        f"WHERE {head_pk} = %s AND {seq} = %s AND {digest} = %s RETURNING {head_pk}) "
        f"INSERT INTO {quote(events.db_table)} ({columns}) SELECT rows.* FROM (VALUES "
    )
    event_seq = quote(events.get_field("seq").column)
    moved_tail = f") AS rows CROSS JOIN head RETURNING {quote(events.pk.column)}, {event_seq}"
    return _Statements(
        head_lock=head_lock,
        insert=f"INSERT INTO {quote(events.db_table)} ({columns}) VALUES ",  # noqa: S608
        row="(" + ", ".join(["%s"] * len(fields)) + ")",
        # SQLite before 3.35 has no RETURNING: rows are then inserted one by one, each read back by lastrowid
        returning=(
            f" RETURNING {quote(events.pk.column)}, {quote(events.get_field('seq').column)}"
            if db.features.can_return_rows_from_bulk_insert
            else ""
        ),
        head_update=head_update,
        fields=fields,
        moved_insert=moved_insert,
        moved_row="(" + ", ".join(f"CAST(%s AS {cast})" for cast in casts) + ")",
        moved_tail=moved_tail,
    )


# Where this process last left the chain head, committed: (head row's pk, seq, hash). A writer outside a
# transaction on PostgreSQL tries one statement that moves the head from there and inserts its events;
# when another process (or a transaction of this one) moved the head since, that statement changes
# nothing and the locked path runs. A stale value costs one statement, never a fork: the update's WHERE
# decides under the row's lock.
_head_seen: tuple[int, int, str] | None = None


def _chain(
    events: list[AuditEvent], seq: int, prev: str, sql: _Statements, db: Any
) -> tuple[list[Any], int, str]:
    """Number and hash the events after (seq, prev); return their insert parameters in row order, and the
    last event's seq and hash (where the head goes)."""
    params: list[Any] = []
    for event in events:
        seq += 1
        event.seq, event.prev_hash = seq, prev
        event.hash = prev = link_hash(prev, event)
        params.extend(f.get_db_prep_save(f.pre_save(event, True), db) for f in sql.fields)
    return params, seq, prev


def _saved(events: list[AuditEvent], ids: dict[Any, Any], alias: str) -> None:
    for event in events:
        event.pk = ids[event.seq]
        event._state.adding, event._state.db = False, alias


def _append_where_seen(events: list[AuditEvent], db: Any, sql: _Statements) -> bool:
    """Chain and insert the events in one statement if the head is where this process last saw it."""
    global _head_seen
    seen = _head_seen
    if seen is None:
        return False
    head_pk, seq, prev = seen
    params, last_seq, last_hash = _chain(events, seq, prev, sql, db)
    statement = sql.moved_insert + ", ".join([sql.moved_row] * len(events)) + sql.moved_tail
    with db.cursor() as cursor:
        cursor.execute(statement, [last_seq, last_hash, head_pk, seq, prev, *params])
        ids = {number: pk for pk, number in cursor.fetchall()}
    if not ids:  # the head moved: nothing was written
        return False
    _head_seen = (head_pk, last_seq, last_hash)
    _saved(events, ids, db.alias)
    return True


def _append(events: list[AuditEvent]) -> list[AuditEvent]:
    """Chain and insert events in order: in one statement when this process knows where the head is (on
    PostgreSQL, outside a transaction), else in one transaction that holds the head's row lock."""
    global _head_seen
    alias = router.db_for_write(AuditEvent)
    db = connections[alias]  # this thread's connection itself: the proxy costs a lookup on every use
    sql = _statements(db)
    outside = db.vendor == "postgresql" and not db.in_atomic_block
    if outside and _append_where_seen(events, db, sql):
        return events
    with transaction.atomic(using=alias), db.cursor() as cursor:
        cursor.execute(sql.head_lock)
        row = cursor.fetchone()
        if row is None:
            head = _head_create()
            row = (head.pk, head.seq, head.hash)
        head_pk, seq, prev = row
        params, last_seq, last_hash = _chain(events, seq, prev, sql, db)
        if sql.returning:
            cursor.execute(sql.insert + ", ".join([sql.row] * len(events)) + sql.returning, params)
            ids = {number: pk for pk, number in cursor.fetchall()}  # by seq: RETURNING promises no order
        else:
            ids, width = {}, len(sql.fields)
            for index, event in enumerate(events):
                cursor.execute(sql.insert + sql.row, params[index * width : (index + 1) * width])
                ids[event.seq] = cursor.lastrowid
        _saved(events, ids, alias)
        cursor.execute(sql.head_update, [last_seq, last_hash, head_pk])
    if outside:  # committed: the next writer of this process starts from here
        _head_seen = (head_pk, last_seq, last_hash)
    return events


@dataclass(eq=False)
class _Waiter:
    event: AuditEvent
    woken: threading.Event = field(default_factory=threading.Event)
    lead: bool = False  # woken to commit the next group rather than because its event is committed
    error: BaseException | None = None


class GroupAppender:
    """Group commit: one writer at a time chains and commits everything queued so far (PostgreSQL).

    Chaining serialises on the head's row lock, and a transaction per event (lock, insert, update the
    head, commit) capped the token endpoint at its round trips. A writer that finds no group in flight
    commits its own event; writers arriving meanwhile queue, and when a group commits, the oldest waiter
    is woken to commit the next one. Every event is committed by exactly one group, in queue order, and
    its writer returns (or gets the group's error) only after that commit.
    """

    def __init__(self, max_group: int = 256) -> None:
        self.max_group = max_group
        self._lock = threading.Lock()
        self._queue: list[_Waiter] = []
        self._committing = False

    @property
    def queued(self) -> int:
        """How many writers wait for the group in flight to commit."""
        with self._lock:
            return len(self._queue)

    def append(self, event: AuditEvent) -> AuditEvent:
        """Return the event once it is chained and committed."""
        waiter = _Waiter(event)
        with self._lock:
            self._queue.append(waiter)
            waiter.lead = not self._committing
            self._committing = True
        if not waiter.lead:
            waiter.woken.wait()
        if waiter.lead:
            self._commit_next_group()
        if waiter.error is not None:
            raise waiter.error
        return event

    def _commit_next_group(self) -> None:
        with self._lock:
            group, self._queue = self._queue[: self.max_group], self._queue[self.max_group :]
        try:
            self._commit(group)
        finally:
            with self._lock:
                if self._queue:
                    self._queue[0].lead = True
                    self._queue[0].woken.set()
                else:
                    self._committing = False
            for waiter in group:
                waiter.lead = False
                waiter.woken.set()

    @staticmethod
    def _commit(group: list[_Waiter]) -> None:
        """Commit the group; if it fails, each event alone, so one bad event fails only its own writer."""
        try:
            _append([w.event for w in group])
            return
        except Exception as exc:
            if len(group) == 1:
                group[0].error = exc
                return
        except BaseException as exc:  # interrupted: nothing is committed, every writer hears of it
            for waiter in group:
                waiter.error = exc
            raise
        for waiter in group:
            event = waiter.event
            event.pk, event._state.adding = None, True  # the rolled-back insert may have numbered it
            try:
                _append([event])
            except Exception as exc:
                waiter.error = exc


_group_append = GroupAppender()


def _head_create() -> ChainHead:
    """Create the chain head of a fresh install, once, even when its first writers race."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:  # held until the transaction ends, so the loser sees the head
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [HEAD_CREATE_LOCK])
        existing = ChainHead.objects.select_for_update().order_by("pk").first()
        if existing is not None:
            return existing
    head = ChainHead.objects.create()
    return ChainHead.objects.select_for_update().get(pk=head.pk)


def chain_head() -> tuple[int, str]:
    """Return the current (seq, hash) of the chain."""
    head = ChainHead.objects.order_by("pk").first()
    return (head.seq, head.hash) if head is not None else (0, GENESIS)


def checkpoint_sign(*, now: float | None = None) -> AuditCheckpoint | None:
    """Sign the current chain head with the active key (beat runs this); None when nothing to sign."""
    signer: Signer | None = _keys.get("signer")
    seq, head_hash = chain_head()
    if signer is None or seq == 0:
        return None
    payload = json.dumps({"seq": seq, "hash": head_hash, "at": int(now or time.time())}).encode()
    kid, signature = signer(payload)
    return AuditCheckpoint.objects.create(seq=seq, head_hash=head_hash, kid=kid, signature=signature)


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
    signed_at: datetime | None = None  # when that checkpoint was signed (the signed time)
    unsigned: int = 0  # records after it: no signature covers them, so cutting them off shows nowhere
    newest_at: datetime | None = None  # when the newest record was written


@dataclass
class _Walk:
    """What recomputing the chain found: each record's hash, and the pruning records that name the base."""

    start_seq: int
    start_hash: str
    hashes: dict[int, str] = field(default_factory=dict)
    pruned: list[int] = field(default_factory=list)
    newest_at: datetime | None = None

    @property
    def last_seq(self) -> int:
        return self.start_seq + len(self.hashes)

    @property
    def last_hash(self) -> str:
        return self.hashes.get(self.last_seq, self.start_hash)


def _events(after: int = 0, batch: int = 2000) -> Iterator[AuditEvent]:
    last = after
    while True:
        rows = list(AuditEvent.objects.filter(seq__gt=last).order_by("seq")[:batch])
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


def _walk(start_seq: int, start_hash: str, base_seq: int) -> _Walk | ChainReport:
    """Recompute the chain after ``start_seq``; a report when a record is missing or does not match."""
    walk = _Walk(start_seq, start_hash)
    prev, expected = start_hash, start_seq + 1
    for event in _events(after=start_seq):
        checked = len(walk.hashes)
        if event.seq != expected:
            reason = f"record {expected} is missing (found {event.seq})"
            return ChainReport(False, checked, 0, expected, event.pk, reason)
        if event.prev_hash != prev or event.hash != link_hash(prev, event):
            reason = f"record {event.seq} does not match its hash"
            return ChainReport(False, checked, 0, event.seq, event.pk, reason)
        if (
            event.kind == PRUNED_KIND
            and isinstance(event.data, dict)
            and event.data.get("base_seq") == base_seq
        ):
            walk.pruned.append(event.seq)
        walk.hashes[event.seq] = prev = event.hash
        walk.newest_at, expected = event.occurred_at, expected + 1
    return walk


def chain_verify() -> ChainReport:
    """Recompute the chain and check every checkpoint; report the first record that does not match."""
    # Checkpoints are read first: each was signed after the records it covers were committed, so one
    # signed while the chain is being walked cannot pass for records cut from the chain's end.
    checkpoints = list(AuditCheckpoint.objects.order_by("seq"))
    head = ChainHead.objects.order_by("pk").first()
    base_seq, base_hash = (head.base_seq, head.base_hash) if head is not None else (0, GENESIS)
    walk = _walk(*_walk_start(base_seq, base_hash), base_seq)
    if isinstance(walk, ChainReport):
        return walk
    checked = len(walk.hashes)
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
    if not walk.pruned:
        return f"the chain starts after record {base_seq}, but no {PRUNED_KIND} record names that base"
    if signed_seq is not None and signed_seq < walk.pruned[0]:
        return (
            f"the {PRUNED_KIND} record {walk.pruned[0]} that moved the chain's base to {base_seq} is not "
            "covered by a signed checkpoint yet (beat signs one every few minutes; verify again after it)"
        )
    return ""


def _checkpoint_problem(
    checkpoint: AuditCheckpoint, verifier: Verifier | None, walk: _Walk
) -> tuple[str, dict[str, Any]]:
    """Return why a checkpoint fails ("" when it holds), and what it signed."""
    payload = verifier(checkpoint.signature) if verifier is not None else None
    if payload is None:
        return f"checkpoint at record {checkpoint.seq} has no valid signature", {}
    signed = json.loads(payload)
    if (signed.get("seq"), signed.get("hash")) != (checkpoint.seq, checkpoint.head_hash):
        return f"checkpoint at record {checkpoint.seq} does not match what was signed", signed
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
    verifier: Verifier | None = _keys.get("verifier")
    checked = len(walk.hashes)
    signed: dict[str, Any] = {}
    for count, checkpoint in enumerate(checkpoints):
        problem, signed = _checkpoint_problem(checkpoint, verifier, walk)
        if problem:
            return ChainReport(False, checked, count, checkpoint.seq, None, problem)
    report = ChainReport(True, checked, len(checkpoints), unsigned=checked, newest_at=walk.newest_at)
    if checkpoints:
        report.signed_seq, report.unsigned = checkpoints[-1].seq, walk.last_seq - checkpoints[-1].seq
        if isinstance(signed.get("at"), int):
            report.signed_at = datetime.fromtimestamp(signed["at"], tz=UTC)
    return report


def chain_prune(*, before_seq: int) -> tuple[int, str]:
    """Move the chain's base past the records an archive-and-prune run removes (the caller deletes)."""
    with _process_lock, transaction.atomic():
        head = ChainHead.objects.select_for_update().order_by("pk").first()
        last = AuditEvent.objects.filter(seq__lt=before_seq).order_by("-seq").first()
        if head is None or last is None or last.seq is None:
            return (head.base_seq, head.base_hash) if head is not None else (0, GENESIS)
        head.base_seq, head.base_hash = last.seq, last.hash
        head.save(update_fields=["base_seq", "base_hash"])
        return head.base_seq, head.base_hash
