"""Ingest what the gateway handed off: usage records and audit events, in batches, exactly once.

Entries come from the Redis stream (a consumer group, so a restarted worker resumes where it stopped and
another worker claims what a dead one left) or from the embedded in-process queue. Usage rows are unique
by request id and events by event id, so an entry delivered twice is stored once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from datetime import UTC, datetime
from typing import Any

from django.db import DatabaseError, DataError, IntegrityError, connections, router, transaction

from audit.chain import storable
from audit.models import UsageRecord
from audit.services import audit_record
from audit.sink import STREAM

logger = logging.getLogger(__name__)

GROUP = "ingest"
CLAIM_IDLE_MS = 30_000  # entries a dead consumer held this long are claimed by a live one
BUDGET_S = 1.0  # one ingest run stops reading after this long (beat starts one every second)

# What a database that is up says of one event it will never store (a database that is down raises other
# errors, and the batch waits for it).
REFUSED = (DataError, IntegrityError, ValueError, TypeError, KeyError, OverflowError)

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


def _usage_store(records: list[dict[str, Any]]) -> None:
    """Insert a batch of usage records, skipping any stored already (a replayed hand-off).

    On PostgreSQL the batch is COPYed in: a quarter of the worker's CPU per row that ``bulk_create``
    takes (its arrays are built in Python), and less work for the server. COPY takes the values as they
    are, so a batch it refuses (a record stored before, a value the ORM would have prepared first, such
    as an IPv6 zone, or text PostgreSQL cannot hold, which ``_usage_row`` replaces) goes through
    ``bulk_create(ignore_conflicts=True)``, the ORM's own path. A record even that refuses is dropped
    with a log line rather than hold back its batch for ever.
    """
    alias = router.db_for_write(UsageRecord)
    db = connections[alias]
    if db.vendor == "postgresql":  # psycopg 3, which the project requires: its cursors COPY
        from psycopg import Error as PsycopgError  # Django's cursor does not translate COPY's errors

        table = db.ops.quote_name(UsageRecord._meta.db_table)
        columns = ", ".join(db.ops.quote_name(f.column) for f in _USAGE_COLUMNS)
        try:
            with transaction.atomic(using=alias), db.cursor() as cursor:
                with cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                    for record in records:
                        copy.write_row(_usage_tuple(record))
            return
        except (DatabaseError, PsycopgError, ValueError, TypeError, KeyError):
            pass  # the ORM's path below decides
    try:
        with transaction.atomic(using=alias):
            UsageRecord.objects.using(alias).bulk_create(
                [_usage_row(r) for r in records], ignore_conflicts=True
            )
        return
    except (DatabaseError, ValueError, TypeError, KeyError):
        pass  # one of them is refused: store the others one by one
    for record in records:
        try:
            with transaction.atomic(using=alias):
                UsageRecord.objects.using(alias).bulk_create([_usage_row(record)], ignore_conflicts=True)
        except (DatabaseError, ValueError, TypeError, KeyError) as exc:
            logger.error(
                "dropping a usage record the database refuses (request %s): %s",
                str(record.get("request_id", ""))[:64],
                type(exc).__name__,
            )


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def entries_store(entries: list[dict[Any, Any]]) -> tuple[int, int]:
    """Store a batch of stream entries; return (usage records, events) in the batch."""
    usage: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    for raw_entry in entries:
        entry = {_text(k): v for k, v in raw_entry.items()}  # Redis gives bytes, the local queue str
        kind, raw = _text(entry.get("t")), entry.get("v") or b""
        try:
            value = json.loads(raw)
        except (TypeError, ValueError):
            logger.error("dropping a malformed audit stream entry")
            continue
        (usage if kind == "usage" else events).append(value)
    try:
        with transaction.atomic():
            if usage:
                _usage_store(usage)
            for event in events:
                _event_store(event)
    except REFUSED:
        if not events:
            raise
        _events_one_by_one(usage, events)
    return len(usage), len(events)


def _event_store(event: dict[str, Any]) -> None:
    audit_record(
        kind=event["kind"],
        outcome=event.get("outcome", "denied"),
        actor=event.get("actor", ""),
        client_id=event.get("client_id", ""),
        ip=event.get("ip"),
        request_id=event.get("request_id", ""),
        data=event.get("data") or {},
        occurred_at=_when(event["occurred_at"]),
        event_id=event["event_id"],
    )


def _events_one_by_one(usage: list[dict[str, Any]], events: list[dict[str, Any]]) -> None:
    """A batch whose events the database refused: store its usage records, then each event on its own. One
    the database still refuses cannot hold back its batch (and every later one: the gateways would end up
    refusing requests on a full backlog), nor go unrecorded: an ``audit.event_refused`` event stands in its
    place in the chain, with its kind, its id and the error's class."""
    if usage:
        with transaction.atomic():
            _usage_store(usage)
    for event in events:
        try:
            with transaction.atomic():
                _event_store(event)
        except REFUSED as exc:
            kind = storable(str(event.get("kind", "")))[:100]
            event_id = storable(str(event.get("event_id", "")))[:64]
            logger.error(
                "an audit event the database refuses (%s, %s): %s", kind, event_id, type(exc).__name__
            )
            audit_record(
                kind="audit.event_refused",
                outcome="failure",
                actor="system",
                data={"kind": kind, "event_id": event_id, "error": type(exc).__name__},
            )


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
        if "BUSYGROUP" not in str(exc):
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
    entries_store([fields for _id, fields in messages])
    ids = [message_id for message_id, _fields in messages]
    pipe = redis.pipeline(transaction=False)
    pipe.xack(STREAM, GROUP, *ids)
    pipe.xdel(STREAM, *ids)
    pipe.execute()
    return len(messages)
