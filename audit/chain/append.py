"""Appending to the audit chain: the one way audit events are written.

Each event is numbered after the head and hashed over the one before it, and the head moves to it, in one
transaction that holds the head's row lock. On PostgreSQL, writers outside a transaction commit in groups:
the events that queue up while one group commits are chained and committed together by the next, and
each writer returns once its own event is committed; a group whose process last left the head where it
still is goes in as one statement that moves the head only from there. A writer inside a transaction
chains its event on that transaction's connection, so the event exists only if the transaction commits.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from django.db import connection, connections, router, transaction

from audit.chain.head import chain_head_create, process_lock
from audit.chain.links import link_hash, storable
from audit.models import AuditEvent, ChainHead


def event_append(event: AuditEvent) -> AuditEvent:
    """Give an unsaved event its place in the chain and save it (the only way events are written)."""
    for name in ("kind", "outcome", "actor", "client_id", "request_id", "data"):
        setattr(event, name, storable(getattr(event, name)))
    if connection.vendor == "sqlite":
        with process_lock:
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
            head = chain_head_create()
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
