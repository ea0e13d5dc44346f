"""A database that cannot write now (read-only after a failover to a standby, shutting down, a lost
connection) makes the batch wait, unacknowledged, and is not logged as dropping records it does not drop;
a record the database refuses for itself still is."""

from __future__ import annotations

import logging

import psycopg
import pytest
from django.db import DatabaseError, IntegrityError, InternalError, OperationalError, connection

from audit.ingest import batch_must_wait, entries_store
from audit.models import AuditEvent, UsageRecord
from tests.audit.test_ingest import entry, record
from tests.config.test_database_unavailable import _wrapped


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's read-only transactions")
@pytest.mark.django_db(transaction=True)
def test_a_read_only_database_makes_the_batch_wait_without_a_dropping_line_and_it_is_stored_after(caplog):
    batch = [entry(record()) for _ in range(3)]
    with connection.cursor() as cursor:  # what a standby promoted from, or ALTER DATABASE ... read_only, does
        cursor.execute("SET default_transaction_read_only = on")
    try:
        with caplog.at_level(logging.ERROR, logger="audit.ingest"), pytest.raises(InternalError) as raised:
            entries_store(batch, ["1-0", "1-1", "1-2"])
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET default_transaction_read_only")
    assert raised.value.__cause__.sqlstate == "25006"  # type: ignore[union-attr]
    assert "dropping" not in caplog.text
    assert "refuses" not in caplog.text
    assert UsageRecord.objects.count() == 0
    assert not AuditEvent.objects.filter(kind="audit.event_refused").exists()
    assert entries_store(batch, ["1-0", "1-1", "1-2"]) == (3, 0)  # read again once writable: all stored
    assert UsageRecord.objects.count() == 3
    assert not AuditEvent.objects.filter(kind="audit.event_refused").exists()


@pytest.mark.parametrize(
    ("exc", "unavailable"),
    [
        (_wrapped(InternalError, psycopg.errors.ReadOnlySqlTransaction("read-only")), True),  # 25006
        (_wrapped(OperationalError, psycopg.errors.AdminShutdown("terminating")), True),  # 57P01
        (_wrapped(OperationalError, psycopg.errors.CannotConnectNow("starting up")), True),  # 57P03
        (_wrapped(DatabaseError, psycopg.errors.ConnectionFailure("lost")), True),  # class 08
        (psycopg.errors.ReadOnlySqlTransaction("read-only"), True),  # psycopg's own (COPY)
        (_wrapped(IntegrityError, psycopg.errors.UniqueViolation("duplicate")), False),
        (_wrapped(DatabaseError, psycopg.errors.NumericValueOutOfRange("out of range")), False),
        (ValueError("a record id that is not a UUID"), False),
    ],
)
def test_read_only_shutting_down_and_lost_connections_are_unavailable_and_a_refused_value_is_not(
    exc, unavailable
):
    assert batch_must_wait(exc) is unavailable
