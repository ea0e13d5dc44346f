"""The chain's canonical form: a record hashes as the database gives it back, so an honest record verifies."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from audit.chain import chain_verify, normalise_ip
from audit.ingest import entries_store
from audit.models import AuditEvent
from audit.services import audit_record
from tests.conftest import embedded_sqlite_run

pytestmark = pytest.mark.django_db

# Numbers jsonb gives back otherwise: a float Python writes with an exponent is a decimal integer there
# (1e+16 is 10000000000000000; 1.2345e+20 is 123450000000000000000, not the float's binary value), and a
# decimal has no negative zero. The rest come back as they went in.
NUMBERS = {
    "n": 1e16,
    "big": 1.2345e20,
    "max": 1.7976931348623157e308,
    "neg": -3e17,
    "zero": -0.0,
    "nested": [{"x": [1e22, -0.0]}],
    "small": 1e-7,
    "plain": 1.5,
    "int": 10**30,
}
STORED = {
    "n": 10**16,
    "big": 123450000000000000000,
    "max": int("17976931348623157" + "0" * 292),
    "neg": -3 * 10**17,
    "zero": 0.0,
    "nested": [{"x": [10**22, 0.0]}],
    "small": 1e-7,
    "plain": 1.5,
    "int": 10**30,
}


def test_floats_are_stored_and_hashed_as_jsonb_gives_them_back():
    event = audit_record(kind="gateway.audit_backlog_recovered", data=NUMBERS)
    stored = AuditEvent.objects.get(pk=event.pk).data
    assert stored == STORED
    assert json.dumps(stored["zero"]) == "0.0"  # not -0.0
    assert chain_verify().ok


@pytest.mark.parametrize("ip", ["::102:304", "::c000:207", "::0.2.0.3", "::1:0"])
def test_an_ipv4_compatible_address_verifies_though_postgresql_writes_it_dotted(ip):
    audit_record(kind="login.failed", actor="user:x", ip=ip, data={})
    event = AuditEvent.objects.get()
    assert "." in str(event.ip)  # as PostgreSQL writes it: ::1.2.3.4
    assert chain_verify().ok


@pytest.mark.parametrize(
    ("ip", "stored"),
    [
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("::1", "::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("2001:DB8::7", "2001:db8::7"),
    ],
)
def test_other_addresses_are_stored_as_hashed(ip, stored):
    audit_record(kind="login.failed", ip=ip, data={})
    assert AuditEvent.objects.get().ip == stored
    assert chain_verify().ok


NOT_TEXT = pytest.mark.parametrize(  # a text field of each kind, given a value that is not text
    "fields",
    [{"kind": 5}, {"outcome": 1}, {"actor": ["a", "b"]}, {"request_id": 12345678}],
    ids=["kind", "outcome", "actor", "request_id"],
)


@NOT_TEXT
def test_an_ingested_event_with_a_text_field_that_is_not_text_is_refused_and_the_chain_verifies(fields):
    event = {"kind": "gateway.denied", "event_id": str(uuid.uuid4()), "occurred_at": 1_764_000_000.0}
    audit_record(kind="before", data={})
    entries_store([{"t": "event", "v": json.dumps({**event, **fields})}])
    audit_record(kind="after", data={})
    kinds = list(AuditEvent.objects.order_by("seq").values_list("kind", flat=True))
    assert kinds == ["before", "audit.event_refused", "after"]
    assert AuditEvent.objects.get(kind="audit.event_refused").data["error"] == "TypeError"
    assert chain_verify().ok


@NOT_TEXT
def test_a_text_field_that_is_not_text_is_refused_before_anything_is_written(fields):
    with pytest.raises(TypeError):
        audit_record(**{"kind": "test.event", **fields})
    assert not AuditEvent.objects.exists()


def test_data_that_is_not_a_dict_is_refused_before_anything_is_written():
    with pytest.raises(TypeError):
        audit_record(kind="test.event", data=[1, 2])  # type: ignore[arg-type]
    assert not AuditEvent.objects.exists()


def test_an_ingested_event_with_numbers_jsonb_rewrites_verifies():
    event = {"kind": "gateway.denied", "event_id": str(uuid.uuid4()), "occurred_at": 1_764_000_000.0}
    entries_store([{"t": "event", "v": json.dumps({**event, "data": NUMBERS})}])
    assert AuditEvent.objects.get().data == STORED
    assert chain_verify().ok


@pytest.mark.parametrize("written", ["upper", "hex", "braces"])
def test_an_event_id_in_any_form_uuid_reads_is_hashed_as_the_database_gives_it_back(written):
    event_id = uuid.uuid4()
    text = {"upper": str(event_id).upper(), "hex": event_id.hex, "braces": f"{{{event_id}}}"}[written]
    audit_record(kind="test.event", event_id=text, data={})
    assert (
        audit_record(kind="test.event", event_id=str(event_id), data={}).event_id == event_id
    )  # the same one
    assert AuditEvent.objects.get().event_id == event_id
    assert chain_verify().ok


def test_a_time_in_another_zone_is_hashed_in_utc_as_the_database_gives_it_back():
    when = datetime(2026, 3, 1, 9, 30, tzinfo=ZoneInfo("Europe/Paris"))
    audit_record(kind="test.event", occurred_at=when, data={})
    assert AuditEvent.objects.get().occurred_at == when
    assert chain_verify().ok


def test_an_address_that_is_not_text_is_refused():
    with pytest.raises(TypeError):
        normalise_ip(5)


def test_the_embedded_sqlite_default_stores_these_records_as_hashed(tmp_path):
    """SQLite keeps floats as they are and stores Django's text for an address: the same records verify."""
    code = f"""
from audit.chain import chain_verify
from audit.models import AuditEvent
from audit.services import audit_record
for ip in ("::102:304", "::ffff:192.0.2.7", "fe80::1%eth0"):
    audit_record(kind="login.failed", ip=ip, data={NUMBERS!r})
print(sorted(AuditEvent.objects.values_list("ip", flat=True)))
print(AuditEvent.objects.first().data == {STORED!r})
print(chain_verify().ok)
"""
    result = embedded_sqlite_run(tmp_path, code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-3:] == [
        "['192.0.2.7', '::102:304', 'fe80::1']",
        "True",
        "True",
    ]
