"""Ingest what the gateway handed off: usage records and audit events, in batches, exactly once.

Entries come from the Redis stream (a consumer group, so a restarted worker resumes where it stopped and
another worker claims what a dead one left) or from the embedded in-process queue. Usage rows are unique
by record id and events by event id, so an entry delivered twice is stored once.

An entry the ingest cannot store never holds back its batch: one that cannot be read (not JSON, not a JSON
object, of no known type, bytes that are not UTF-8), an event whose fields are not of the types a gateway
writes, and a record or event the database refuses are each set aside, acknowledged with the rest, logged,
and recorded by an ``audit.event_refused`` event that names its stream id and the error's class (never its
content). Only a database that is down, or cannot write now (read-only after a failover, shutting
down), makes a batch wait, unacknowledged, for the next run.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from django.db import InterfaceError, OperationalError, connections, router, transaction
from django.db.transaction import TransactionManagementError
from redis.exceptions import OutOfMemoryError

from audit.chain import normalise_ip, storable
from audit.models import UsageRecord
from audit.services import audit_fields_check, audit_record
from audit.sink import STREAM

logger = logging.getLogger(__name__)

GROUP = "ingest"
CLAIM_IDLE_MS = 30_000  # entries a dead consumer held this long are claimed by a live one
BUDGET_S = 1.0  # one ingest run stops reading after this long (beat starts one every second)

# What a database that is down, or a connection lost mid-batch, raises: the batch waits, unacknowledged, and
# is read again. Any other error is the entry's own (a value the database or the ORM refuses, a field of the
# wrong type), and the entry is set aside. A database that is down cannot store the stand-in either: that
# write raises one of these, so a batch is never acknowledged on a wrong guess.
UNAVAILABLE = (OperationalError, InterfaceError, TransactionManagementError)
# The same, said by a SQLSTATE psycopg gives another class: a database that is read-only (25006, a standby
# after a failover: an InternalError), shutting down or starting (57P01-57P03), that closed an idle session
# (57P05), out of connections or other resources (class 53), or a lost connection (class 08). Such a batch
# is not the entry's fault: it waits, and is retried.
UNAVAILABLE_SQLSTATES = frozenset({"25006", "57P01", "57P02", "57P03", "57P05"})
UNAVAILABLE_SQLSTATE_CLASSES = ("08", "53")


def sqlstate(exc: BaseException) -> str | None:
    """The database's SQLSTATE for an error (Django's, or psycopg's it wraps), or None: none came from the
    server (a connection that could not be made, or a pool's timeout)."""
    for error in (exc, exc.__cause__):
        state = getattr(error, "sqlstate", None)
        if isinstance(state, str):
            return state
    return None


def sqlstate_unavailable(exc: BaseException) -> bool:
    """Whether an error's SQLSTATE says the database cannot take the work now, whatever the error's class."""
    state = sqlstate(exc)
    return state is not None and (
        state in UNAVAILABLE_SQLSTATES or state.startswith(UNAVAILABLE_SQLSTATE_CLASSES)
    )


def batch_must_wait(exc: BaseException) -> bool:
    """Whether an error says the database is down or cannot write now (the batch waits, and is read again),
    rather than that it refuses the entry (the entry is set aside). Any OperationalError waits: a deadlock or
    a timeout passes too, and an entry set aside on a wrong guess would be lost."""
    return isinstance(exc, UNAVAILABLE) or sqlstate_unavailable(exc)


_USAGE_FIELDS = {f.name for f in UsageRecord._meta.get_fields()} - {"id"}
_USAGE_COLUMNS = [f for f in UsageRecord._meta.concrete_fields if f.name in _USAGE_FIELDS]


def _when(value: Any) -> datetime:
    return datetime.fromtimestamp(float(value), tz=UTC)


def _usage_row(record: dict[str, Any]) -> UsageRecord:
    # A denied request's model is the client's text: what PostgreSQL cannot hold (NUL, a lone surrogate)
    # is replaced, as in audit events, so the record is stored rather than dropped. COPY takes values as
    # they are, so a batch holding such text falls back to this path.
    fields = {k: storable(v) for k, v in record.items() if k in _USAGE_FIELDS}
    fields["occurred_at"] = _when(record["occurred_at"])
    return UsageRecord(**fields)


def _usage_tuple(record: dict[str, Any]) -> tuple[Any, ...]:
    """A record as the COPY row of ``_USAGE_COLUMNS``, with the values ``_usage_row`` would give the model:
    a field it lacks takes the model's default. The model name is the one field that can be the client's
    raw text (a denied request's): it is made storable here, so such a record cannot push its whole batch
    off COPY onto the ORM's path, four times the worker's CPU."""
    return tuple(
        _when(record["occurred_at"])
        if f.name == "occurred_at"
        else storable(record["model"])
        if f.name == "model" and "model" in record
        else (record[f.name] if f.name in record else f.get_default())
        for f in _USAGE_COLUMNS
    )


def _usage_store(records: list[dict[str, Any]]) -> list[tuple[int, Exception]]:
    """Insert a batch of usage records, skipping any stored already (a replayed hand-off); return the
    records the database refuses, by their place in the batch, with the error.

    On PostgreSQL the batch is COPYed in: a quarter of the worker's CPU per row that ``bulk_create``
    takes (its arrays are built in Python), and less work for the server. COPY takes the values as they
    are, so a batch it refuses (a record stored before, a value the ORM would have prepared first, such
    as an IPv6 zone, or text PostgreSQL cannot hold, which ``_usage_row`` replaces) goes through
    ``bulk_create(ignore_conflicts=True)``, the ORM's own path. A record even that refuses (a value out of
    range, a record id that is not a UUID, a time no datetime holds) is dropped with a log line rather than
    hold back its batch for ever.
    """
    alias = router.db_for_write(UsageRecord)
    db = connections[alias]
    if db.vendor == "postgresql":  # psycopg 3, which the project requires: its cursors COPY
        table = db.ops.quote_name(UsageRecord._meta.db_table)
        columns = ", ".join(db.ops.quote_name(f.column) for f in _USAGE_COLUMNS)
        try:
            with transaction.atomic(using=alias), db.cursor() as cursor:
                with cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                    for record in records:
                        copy.write_row(_usage_tuple(record))
            return []
        except Exception:  # noqa: S110 - psycopg's own too: Django's cursor does not translate COPY's errors
            pass  # the ORM's path below decides, and raises what says the database is down
    try:
        with transaction.atomic(using=alias):
            UsageRecord.objects.using(alias).bulk_create(
                [_usage_row(r) for r in records], ignore_conflicts=True
            )
        return []
    except Exception as exc:
        if batch_must_wait(exc):
            raise
        # one of them is refused: store the others one by one
    refused: list[tuple[int, Exception]] = []
    for index, record in enumerate(records):
        try:
            with transaction.atomic(using=alias):
                UsageRecord.objects.using(alias).bulk_create([_usage_row(record)], ignore_conflicts=True)
        except Exception as exc:
            if batch_must_wait(exc):
                raise
            logger.error(
                "dropping a usage record the database refuses (request %s): %s",
                storable(str(record.get("request_id", "")))[:64],
                type(exc).__name__,
            )
            refused.append((index, exc))
    return refused


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def _entry_read(entry: Mapping[Any, Any]) -> tuple[str, dict[str, Any]]:
    """An entry's type and its JSON object; raise on anything else."""
    fields = {_text(k): v for k, v in entry.items()}  # Redis gives bytes, the local queue str
    kind = _text(fields.get("t"))
    if kind not in ("usage", "event"):
        raise ValueError("an entry is a usage record or an event")
    value = json.loads(fields.get("v") or b"")  # deep nesting is a RecursionError, caught as any other
    if not isinstance(value, dict):
        raise TypeError(f"an entry holds a JSON object, not {type(value).__name__}")
    return kind, value


def _event_fields(event: dict[str, Any]) -> dict[str, Any]:
    """The ``audit_record`` arguments of an event entry, each of the type a gateway writes; raise on any
    other (a text column stores the number 5 as "5", and the chain had hashed the number)."""
    fields: dict[str, Any] = {"kind": event["kind"]}
    for name, default in (("outcome", "denied"), ("actor", ""), ("client_id", ""), ("request_id", "")):
        value = event.get(name)
        fields[name] = default if value is None else value
    audit_fields_check(**fields, data=event.get("data"))
    fields["ip"] = normalise_ip(event.get("ip"))
    fields["data"] = event.get("data") or {}
    fields["occurred_at"] = _when(event["occurred_at"])
    audit_fields_check(event_id=event["event_id"])
    fields["event_id"] = uuid.UUID(event["event_id"])
    return fields


@dataclass
class _Batch:
    """A batch of entries, read one by one: its usage records, and what goes into the chain in the batch's
    order, each as ``audit_record``'s arguments: its events, and a stand-in for each entry set aside."""

    usage: list[dict[str, Any]] = field(default_factory=list)
    usage_ids: list[str | None] = field(default_factory=list)
    events: list[tuple[str | None, dict[str, Any] | None, dict[str, Any]]] = field(default_factory=list)
    event_count: int = 0  # the events' entries, those set aside too

    def read(self, entry: Any, stream_id: str | None) -> None:
        try:
            kind, value = _entry_read(entry)
        except Exception as exc:  # anything at all: one entry must not stop the ingest
            logger.error("a malformed audit stream entry (%s): %s", stream_id or "-", type(exc).__name__)
            self.events.append((stream_id, None, _stand_in(_refusal(stream_id, exc))))
            return
        if kind == "usage":
            self.usage.append(value)
            self.usage_ids.append(stream_id)
            return
        self.event_count += 1
        try:
            self.events.append((stream_id, value, _event_fields(value)))
        except Exception as exc:
            self.events.append((stream_id, None, _stand_in(_event_refused(stream_id, value, exc))))

    def usage_store(self) -> None:
        """Store the usage records, and a stand-in for each the database refuses."""
        for index, exc in _usage_store(self.usage) if self.usage else []:
            record_id = self.usage[index].get("record_id")
            audit_record(**_stand_in(_refusal(self.usage_ids[index], exc, type="usage", record_id=record_id)))


def _refusal(stream_id: str | None, exc: BaseException, **names: Any) -> dict[str, str]:
    """The data of the ``audit.event_refused`` event that stands in for an entry set aside."""
    data = {name: storable(value)[:64] for name, value in names.items() if isinstance(value, str)}
    if stream_id is not None:
        data["stream_id"] = stream_id
    data["error"] = type(exc).__name__
    return data


def _event_refused(stream_id: str | None, event: dict[str, Any], exc: BaseException) -> dict[str, str]:
    data = _refusal(stream_id, exc, kind=event.get("kind"), event_id=event.get("event_id"))
    logger.error(
        "an audit event the database refuses (%s, %s): %s",
        data.get("kind", ""),
        data.get("event_id", ""),
        data["error"],
    )
    return data


def _stand_in(data: dict[str, str]) -> dict[str, Any]:
    return {"kind": "audit.event_refused", "outcome": "failure", "actor": "system", "data": data}


def entries_store(entries: list[Any], ids: list[Any] | None = None) -> tuple[int, int]:
    """Store a batch of stream entries (``ids``, their stream ids, name those set aside); return how many
    usage records and events it held (an entry that cannot be read as either is neither)."""
    batch = _Batch()
    for index, entry in enumerate(entries):
        batch.read(entry, None if ids is None else str(_text(ids[index])))
    try:
        with transaction.atomic():
            batch.usage_store()
            for _stream_id, _event, fields in batch.events:
                audit_record(**fields)
    except Exception as exc:
        if batch_must_wait(exc):
            raise
        _events_one_by_one(batch)  # an event the database refuses: each on its own
    return len(batch.usage), batch.event_count


def _events_one_by_one(batch: _Batch) -> None:
    """A batch whose events the database refused: store its usage records, then each event on its own. One
    the database still refuses cannot hold back its batch (and every later one: the gateways would end up
    refusing requests on a full backlog), nor go unrecorded: an ``audit.event_refused`` event stands in its
    place in the chain, with its kind, its id and the error's class."""
    with transaction.atomic():
        batch.usage_store()
    for stream_id, event, fields in batch.events:
        try:
            with transaction.atomic():
                audit_record(**fields)
        except Exception as exc:
            if batch_must_wait(exc):
                raise
            if event is None:  # a stand-in the database refuses: nothing is acknowledged
                raise
            audit_record(**_stand_in(_event_refused(stream_id, event, exc)))


def _consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def stream_ingest(redis: Any, *, count: int = 500, block_ms: int = 200, budget_s: float = BUDGET_S) -> int:
    """Read, store and acknowledge batches from the stream until it is caught up (a batch comes back short
    of ``count``) or ``budget_s`` has passed; return entries stored.

    A backlog is read batch after batch, so one worker keeps up with whatever its CPU allows rather than
    ``count`` times a fixed number of rounds a second (10 × 500 before, fewer than one gateway process
    hands off at full load). Caught up, it stops: what arrives next waits for the next beat tick, in one
    batch, instead of a trickle of small batches each woken by one record. The first read of new entries
    waits up to ``block_ms`` for one.
    """
    try:
        redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    except Exception as exc:  # BUSYGROUP: the group exists already
        # A Redis at its maxmemory refuses XGROUP CREATE before looking whether the group exists, and
        # nothing else this needs (XAUTOCLAIM, XREADGROUP, XACK, XDEL take no memory to run): that is
        # when the stream most needs draining (a missing group is then XREADGROUP's NOGROUP).
        if "BUSYGROUP" not in str(exc) and not isinstance(exc, OutOfMemoryError):
            raise
    consumer = _consumer_name()
    stored = 0
    _next, claimed, _deleted = redis.xautoclaim(STREAM, GROUP, consumer, CLAIM_IDLE_MS, "0-0", count=count)
    stored += _store_and_ack(redis, claimed)
    own = redis.xreadgroup(GROUP, consumer, {STREAM: "0"}, count=count)  # ours from before a restart
    stored += _store_and_ack(redis, own[0][1] if own else [])
    started = time.monotonic()
    while True:
        fresh = redis.xreadgroup(GROUP, consumer, {STREAM: ">"}, count=count, block=block_ms)
        batch = fresh[0][1] if fresh else []
        stored += _store_and_ack(redis, batch)
        if len(batch) < count or time.monotonic() - started >= budget_s:
            return stored


def _store_and_ack(redis: Any, messages: list[tuple[Any, dict[Any, Any]]]) -> int:
    if not messages:
        return 0
    ids = [message_id for message_id, _fields in messages]
    entries_store([fields for _id, fields in messages], ids)
    pipe = redis.pipeline(transaction=False)
    pipe.xack(STREAM, GROUP, *ids)
    pipe.xdel(STREAM, *ids)
    pipe.execute()
    return len(messages)
