"""The tamper-evident chain: concurrent writers, a tampered row, a deleted row, a broken checkpoint."""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
from collections.abc import Callable
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from audit.chain import chain_head, chain_verify, checkpoint_sign
from audit.models import AuditCheckpoint, AuditEvent, ChainHead
from audit.services import audit_record


def _events(count: int) -> None:
    for i in range(count):
        audit_record(kind="test.event", actor="user:alice", data={"i": i, "note": "x"}, ip="2001:DB8::1")


def _behind_the_apps_back(sql: str, params: list[Any]) -> None:
    """What an attacker with database access does: switch the append-only trigger off and write."""
    with connection.cursor() as cursor:
        cursor.execute("SET session_replication_role = replica")
        cursor.execute(sql, params)
        cursor.execute("SET session_replication_role = DEFAULT")


def _six_writers_in_two_groups(
    monkeypatch: pytest.MonkeyPatch, write: Callable[[int], None]
) -> list[list[int]]:
    """Run write(0) alone, hold its group open until write(1..5) queue behind it, then let all finish.

    Returns what each call of the chain's insert got: the ``i`` of its events, sorted."""
    from audit.chain import append as chain_append

    appender = chain_append.GroupAppender()
    monkeypatch.setattr(chain_append, "_group_append", appender)
    groups: list[list[int]] = []
    first_group_started, release = threading.Event(), threading.Event()
    real_append = chain_append._append

    def recording_append(events: list[AuditEvent]) -> list[AuditEvent]:
        groups.append(sorted(e.data["i"] for e in events))
        if len(groups) == 1:  # hold the first group open until the others have queued behind it
            first_group_started.set()
            release.wait(10)
        return real_append(events)

    monkeypatch.setattr(chain_append, "_append", recording_append)

    def run(i: int) -> None:
        try:
            write(i)
        finally:
            connection.close()

    first = threading.Thread(target=run, args=(0,))
    first.start()
    assert first_group_started.wait(10)
    others = [threading.Thread(target=run, args=(i,)) for i in range(1, 6)]
    for thread in others:
        thread.start()
    deadline = time.monotonic() + 10
    while appender.queued < len(others) and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for thread in [first, *others]:
        thread.join(10)
    return groups


@pytest.mark.django_db
def test_an_ipv6_zone_is_dropped_before_hashing_so_the_chain_still_verifies():
    audit_record(kind="test.event", ip="fe80::1%eth0")
    assert AuditEvent.objects.get().ip == "fe80::1"
    report = chain_verify()
    assert report.ok, report.reason


@pytest.mark.django_db
def test_an_untouched_chain_verifies_with_its_signed_checkpoints():
    _events(5)
    assert checkpoint_sign() is not None
    _events(3)
    assert checkpoint_sign() is not None
    report = chain_verify()
    assert report.ok, report.reason
    # 8, and the creation and activation of the first keys of a fresh install (ES256 and RS256)
    assert report.checked == AuditEvent.objects.count() == 12
    assert report.checkpoints == 2
    out = StringIO()
    call_command("verifyaudit", stdout=out)
    assert "12 records, 2 signed checkpoints" in out.getvalue()


@pytest.mark.django_db
def test_the_database_refuses_updates_and_deletes_of_audit_rows():
    _events(1)
    event = AuditEvent.objects.get()
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        AuditEvent.objects.filter(pk=event.pk).update(actor="user:mallory")
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        AuditEvent.objects.filter(pk=event.pk).delete()


@pytest.mark.django_db
@pytest.mark.parametrize("table", ["audit_auditevent", "audit_usagerecord", "audit_auditcheckpoint"])
def test_the_database_refuses_to_empty_an_audit_table_whole(table):
    # TRUNCATE is not a row operation: it passed the row triggers, and emptied the log checkpoints and all
    _events(1)
    refused = pytest.raises(DatabaseError, match=rf"append-only \(TRUNCATE on {table}\)")
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL portcullis.audit_truncate = 'off'")  # as in every session but the suite's
        with refused, transaction.atomic():
            cursor.execute(f"TRUNCATE {table} CASCADE")
    assert AuditEvent.objects.count() == 1


@pytest.mark.django_db
def test_a_row_edited_behind_the_apps_back_is_named():
    _events(6)
    target = AuditEvent.objects.get(seq=4)
    _behind_the_apps_back("UPDATE audit_auditevent SET actor = %s WHERE id = %s", ["user:mallory", target.pk])
    report = chain_verify()
    assert not report.ok
    assert report.first_bad_seq == 4
    assert report.first_bad_id == target.pk
    with pytest.raises(CommandError, match="record 4 does not match"):
        call_command("verifyaudit")


@pytest.mark.django_db
def test_a_deleted_row_is_found():
    _events(6)
    _behind_the_apps_back("DELETE FROM audit_auditevent WHERE seq = %s", [3])
    report = chain_verify()
    assert not report.ok
    assert report.first_bad_seq == 3
    assert "missing" in report.reason


@pytest.mark.django_db
def test_a_rewritten_tail_is_caught_by_the_signed_checkpoint():
    _events(4)
    checkpoint_sign()
    # An attacker who rewrites a record and recomputes every later hash still cannot forge the checkpoint.
    from audit.chain import link_hash

    rows = list(AuditEvent.objects.order_by("seq"))
    rows[1].actor = "user:mallory"
    prev = rows[0].hash
    for row in rows[1:]:
        row.prev_hash, row.hash = prev, link_hash(prev, row)
        _behind_the_apps_back(
            "UPDATE audit_auditevent SET actor=%s, prev_hash=%s, hash=%s WHERE id=%s",
            [row.actor, row.prev_hash, row.hash, row.pk],
        )
        prev = row.hash
    _behind_the_apps_back("UPDATE audit_chainhead SET hash = %s", [prev])
    report = chain_verify()
    assert not report.ok
    assert "checkpoint" in report.reason


@pytest.mark.django_db
def test_a_forged_checkpoint_signature_is_refused():
    _events(2)
    checkpoint = checkpoint_sign()
    assert checkpoint is not None
    head, payload, _signature = checkpoint.signature.split(".")
    assert json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))["alg"] == "RS256"
    _behind_the_apps_back(
        "UPDATE audit_auditcheckpoint SET signature = %s WHERE id = %s",
        [f"{head}.{payload}.AAAA", checkpoint.pk],
    )
    report = chain_verify()
    assert not report.ok
    assert "no valid signature" in report.reason


@pytest.mark.django_db(transaction=True)
def test_concurrent_writers_do_not_fork_the_chain():
    def write() -> None:
        try:
            _events(25)
        finally:
            connection.close()

    threads = [threading.Thread(target=write) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report = chain_verify()
    assert report.ok, report.reason
    assert report.checked == 100
    assert chain_head()[0] == 100
    assert AuditCheckpoint.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_a_writer_that_left_the_head_where_it_is_appends_in_one_statement():
    from django.test.utils import CaptureQueriesContext

    audit_record(kind="test.event", data={"i": 0})  # the locked path, which notes where it left the head
    with CaptureQueriesContext(connection) as one:
        audit_record(kind="test.event", data={"i": 1})
    assert len(one.captured_queries) == 1
    assert one.captured_queries[0]["sql"].startswith("WITH head AS (UPDATE")
    with transaction.atomic():  # another writer moves the head (as another process would)
        audit_record(kind="test.event", data={"i": 2})
    with CaptureQueriesContext(connection) as moved:
        audit_record(kind="test.event", data={"i": 3})
    assert moved.captured_queries[0]["sql"].startswith("WITH head AS (UPDATE")  # found the head moved
    assert any("FOR UPDATE" in q["sql"] for q in moved.captured_queries[1:])  # and took the locked path
    stored = list(AuditEvent.objects.order_by("seq").values_list("seq", "data"))
    assert stored == [(1, {"i": 0}), (2, {"i": 1}), (3, {"i": 2}), (4, {"i": 3})]
    report = chain_verify()
    assert report.ok, report.reason


CHILD_WRITER = """
import sys
import django
django.setup()
from django.db import transaction
from audit.services import audit_record
inside = sys.argv[1] == "inside"
print("ready", flush=True)
sys.stdin.readline()
for i in range(40):
    if inside:
        with transaction.atomic():
            audit_record(kind="test.child", data={"i": i})
    else:
        audit_record(kind="test.child", data={"i": i})
"""


@pytest.mark.django_db(transaction=True)
def test_processes_writing_at_once_do_not_fork_the_chain():
    """Each process remembers where it left the head, and the others move it: nothing forks or is lost."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import environ_unconfigured

    audit_record(kind="test.event")
    db = connection.settings_dict
    env = environ_unconfigured()
    env.update(
        DJANGO_SETTINGS_MODULE="config.settings",
        DJANGO_DEBUG="true",
        DATABASE_URL=f"postgres://{db['USER']}:{db['PASSWORD']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
    )
    root = Path(__file__).resolve().parents[2]
    with contextlib.ExitStack() as stack:
        children = [
            stack.enter_context(
                subprocess.Popen(
                    [sys.executable, "-c", CHILD_WRITER, mode],
                    cwd=root,
                    env=env,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
            for mode in ("outside", "outside", "inside")  # the last writes as a caller's transaction does
        ]
        for child in children:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
        for child in children:  # all start at once
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        assert [child.wait(60) for child in children] == [0, 0, 0]
    assert AuditEvent.objects.filter(kind="test.child").count() == 120
    report = chain_verify()
    assert report.ok, report.reason
    assert report.checked == 121


@pytest.mark.django_db
def test_archive_and_prune_is_the_one_audited_way_rows_leave_and_the_rest_still_verifies(tmp_path):
    import json as jsonlib
    from datetime import timedelta

    from django.utils import timezone

    old = timezone.now() - timedelta(days=400)
    for i in range(5):
        audit_record(kind="test.old", data={"i": i}, occurred_at=old)
    checkpoint_sign()
    _events(3)
    archive = tmp_path / "audit-2025.jsonl"
    out = StringIO()
    call_command(
        "pruneaudit",
        "--before",
        (timezone.now() - timedelta(days=365)).date().isoformat(),
        "--archive",
        str(archive),
        stdout=out,
    )
    assert "pruned 5 events" in out.getvalue()
    lines = [jsonlib.loads(line) for line in archive.read_text().splitlines()]
    assert [line["fields"]["kind"] for line in lines] == ["test.old"] * 5
    assert not AuditEvent.objects.filter(kind="test.old").exists()
    pruned = AuditEvent.objects.get(kind="audit.pruned")
    assert pruned.data["events"] == 5
    report = chain_verify()
    assert report.ok, report.reason
    with pytest.raises(CommandError, match="exists"):
        call_command("pruneaudit", "--before", "2020-01-01", "--archive", str(archive))


@pytest.mark.django_db(transaction=True)
def test_writers_outside_a_transaction_commit_in_groups_and_each_event_lands_exactly_once(monkeypatch):
    written: dict[int, AuditEvent] = {}

    def write(i: int) -> None:
        written[i] = audit_record(kind="test.event", actor="client:x", data={"i": i})

    groups = _six_writers_in_two_groups(monkeypatch, write)
    assert groups == [[0], [1, 2, 3, 4, 5]]
    for i, event in written.items():
        assert AuditEvent.objects.get(pk=event.pk).data == {"i": i}
    assert sorted(written) == [0, 1, 2, 3, 4, 5]
    assert AuditEvent.objects.filter(kind="test.event").count() == 6
    report = chain_verify()
    assert report.ok, report.reason
    assert report.checked == 6


@pytest.mark.django_db(transaction=True)
def test_a_failed_group_commits_none_of_its_events_and_the_next_writer_still_can(monkeypatch):
    from audit.chain import append as chain_append

    monkeypatch.setattr(chain_append, "_group_append", chain_append.GroupAppender())
    real_append = chain_append._append

    def failing_append(events: list[AuditEvent]) -> list[AuditEvent]:
        raise DatabaseError("the database went away")

    monkeypatch.setattr(chain_append, "_append", failing_append)
    with pytest.raises(DatabaseError):
        audit_record(kind="test.event")
    monkeypatch.setattr(chain_append, "_append", real_append)
    audit_record(kind="test.event")
    assert AuditEvent.objects.count() == 1
    assert chain_verify().ok


@pytest.mark.django_db(transaction=True)
def test_an_event_written_inside_a_transaction_rolls_back_with_it():
    def work_that_fails() -> None:
        with transaction.atomic():
            audit_record(kind="test.event")
            raise RuntimeError("the caller's work failed")

    with pytest.raises(RuntimeError):
        work_that_fails()
    assert not AuditEvent.objects.exists()
    assert chain_head() == (0, "0" * 64)
    audit_record(kind="test.event")
    assert chain_verify().ok


@pytest.mark.django_db(transaction=True)
def test_one_bad_event_in_a_group_fails_only_its_own_writer(monkeypatch):
    outcome: dict[int, str] = {}

    def write(i: int) -> None:
        try:
            kind = "x" * 500 if i == 3 else "test.event"  # longer than the column: the database refuses it
            audit_record(kind=kind, data={"i": i})
            outcome[i] = "committed"
        except DatabaseError:
            outcome[i] = "refused"

    groups = _six_writers_in_two_groups(monkeypatch, write)
    assert groups[:2] == [[0], [1, 2, 3, 4, 5]]  # the five queued writers were grouped; that group failed
    assert outcome == {
        0: "committed",
        1: "committed",
        2: "committed",
        3: "refused",
        4: "committed",
        5: "committed",
    }
    stored = sorted(e.data["i"] for e in AuditEvent.objects.filter(kind="test.event"))
    assert stored == [0, 1, 2, 4, 5]
    assert chain_verify().ok


@pytest.mark.django_db
def test_text_postgresql_cannot_store_is_recorded_with_a_replacement_character():
    event = audit_record(kind="test.event", actor="user:a\x00b", data={"grant_type": "a\x00b", "s": "\ud800"})
    stored = AuditEvent.objects.get(pk=event.pk)
    assert stored.actor == "user:a\ufffdb"
    assert stored.data == {"grant_type": "a\ufffdb", "s": "?"}
    assert chain_verify().ok


@pytest.mark.django_db(transaction=True)
def test_a_group_of_events_gets_each_rows_primary_key_in_order():
    from audit.chain import append as chain_append

    events = [
        AuditEvent(kind="test.event", outcome="success", data={"i": i}, occurred_at=timezone.now())
        for i in range(5)
    ]
    chain_append._append(events)
    for event in events:
        stored = AuditEvent.objects.get(pk=event.pk)
        assert (stored.seq, stored.hash, stored.data) == (event.seq, event.hash, event.data)
        assert not event._state.adding
    first = events[0].seq
    assert first is not None
    assert [e.seq for e in events] == list(range(first, first + 5))
    assert chain_verify().ok


@pytest.mark.parametrize("returning", [True, False], ids=["returning", "sqlite-before-3.35"])
def test_the_embedded_sqlite_default_chains_and_verifies(tmp_path, returning):
    """The embedded default writes the chain on SQLite (no row locks, no FOR UPDATE): it must verify."""
    from tests.conftest import embedded_sqlite_run

    code = (
        "from audit.services import audit_record\n"
        "first = [audit_record(kind='test.event', data={'i': i}, ip='2001:DB8::1') for i in range(3)]\n"
        "assert [e.seq for e in first] == [1, 2, 3], first\n"
        "from audit.models import AuditEvent\n"
        "assert [AuditEvent.objects.get(pk=e.pk).seq for e in first] == [1, 2, 3]\n"
        "call_command('verifyaudit')\n"
    )
    result = embedded_sqlite_run(tmp_path, code, returning=returning)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "audit chain OK: 3 records" in result.stdout


# --- the chain's base and its tail: what the head row, which is not append-only, could otherwise hide ---


def _head_set(**columns: Any) -> None:
    """What any role that can write the database does: the head row has no append-only trigger."""
    assignments = ", ".join(f"{name} = %s" for name in columns)
    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE audit_chainhead SET {assignments}", list(columns.values()))  # noqa: S608


def _delete_as_pruning_does(sql: str, params: list[Any]) -> None:
    """What any role can do too: set the variable the append-only trigger lets deletes through on."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL portcullis.audit_prune = 'on'")
        cursor.execute(sql, params)
        cursor.execute("SET LOCAL portcullis.audit_prune = 'off'")


def _record(seq: int) -> AuditEvent:
    return AuditEvent.objects.get(seq=seq)


@pytest.mark.django_db
def test_a_base_moved_over_an_edited_record_does_not_hide_it():
    _events(6)
    assert checkpoint_sign() is not None
    target = _record(3)
    _behind_the_apps_back("UPDATE audit_auditevent SET actor = %s WHERE id = %s", ["user:mallory", target.pk])
    _head_set(base_seq=3, base_hash=target.hash)
    report = chain_verify()
    assert not report.ok
    assert (report.first_bad_seq, report.first_bad_id) == (3, target.pk)
    with pytest.raises(CommandError, match="record 3 does not match its hash"):
        call_command("verifyaudit")


@pytest.mark.django_db
def test_a_base_moved_over_records_that_are_still_there_is_reported():
    _events(6)
    _head_set(base_seq=3, base_hash=_record(3).hash)
    report = chain_verify()
    assert not report.ok
    assert report.reason == "records 1 to 3 are still there, but the chain's base says they were pruned"


def _pruned_without_the_job() -> None:
    """Six records, a checkpoint, then records 1 to 3 deleted and the base moved as pruning does it, but not
    by the pruning job (no audit.pruned record)."""
    _events(6)
    assert checkpoint_sign() is not None
    base_hash = _record(3).hash
    _delete_as_pruning_does("DELETE FROM audit_auditevent WHERE seq <= %s", [3])
    _head_set(base_seq=3, base_hash=base_hash)


@pytest.mark.django_db
def test_records_deleted_from_the_start_without_a_pruning_record_are_reported():
    _pruned_without_the_job()
    report = chain_verify()
    assert not report.ok
    assert report.first_bad_seq == 3
    assert report.reason == "the chain starts after record 3, but no audit.pruned record names that base"


@pytest.mark.django_db
def test_a_pruning_record_no_checkpoint_signs_does_not_vouch_for_the_base():
    _pruned_without_the_job()
    forged = audit_record(kind="audit.pruned", actor="cli:pruneaudit", data={"base_seq": 3})
    report = chain_verify()
    assert not report.ok
    assert f"audit.pruned record {forged.seq} that moved the chain's base to 3 is not" in report.reason


@pytest.mark.django_db
def test_a_prune_signs_its_pruning_record_so_the_moved_base_verifies_at_once(tmp_path):
    from datetime import timedelta

    from audit.retention import audit_archive_and_prune

    for i in range(5):
        audit_record(kind="test.old", data={"i": i}, occurred_at=timezone.now() - timedelta(days=400))
    _events(2)
    assert checkpoint_sign() is not None
    result = audit_archive_and_prune(
        before=timezone.now() - timedelta(days=365), archive=tmp_path / "old.jsonl", actor="test"
    )
    assert result.base_seq == 5
    pruned = AuditEvent.objects.get(kind="audit.pruned")
    assert pruned.data["base_hash"] == ChainHead.objects.get().base_hash
    assert AuditCheckpoint.objects.filter(seq__gte=pruned.seq).exists()  # signed by the prune itself
    report = chain_verify()
    assert report.ok, report.reason
    assert report.base_seq == 5
    out = StringIO()
    call_command("verifyaudit", stdout=out)
    assert f"{report.checked} records, after record 5 (archived and pruned)" in out.getvalue()


@pytest.mark.django_db
def test_records_cut_from_the_end_below_a_signed_checkpoint_are_named_as_such():
    _events(6)
    assert checkpoint_sign() is not None
    head = checkpoint_sign()  # the first one created the keys, which wrote records of their own
    assert head is not None
    _delete_as_pruning_does("DELETE FROM audit_auditevent WHERE seq > %s", [7])
    _head_set(seq=7, hash=_record(7).hash)
    report = chain_verify()
    assert not report.ok
    assert report.first_bad_seq == head.seq
    assert report.reason == (
        f"the chain ends at record 7, before the signed checkpoint at record {head.seq}: "
        "records were cut from its end"
    )


@pytest.mark.django_db
def test_verifyaudit_says_how_many_of_the_newest_records_no_checkpoint_signs_yet():
    out = StringIO()
    _events(2)
    call_command("verifyaudit", stdout=out)
    assert "no checkpoint signed yet: none of the 2 records is signed" in out.getvalue()
    checkpoint = checkpoint_sign()
    assert checkpoint is not None
    _events(3)
    report = chain_verify()
    assert report.ok, report.reason
    assert (report.signed_seq, report.unsigned) == (2, AuditEvent.objects.count() - 2)
    assert report.signed_at is not None
    assert abs((report.signed_at - checkpoint.created_at).total_seconds()) < 2
    assert report.newest_at == AuditEvent.objects.order_by("-seq")[0].occurred_at
    out = StringIO()
    call_command("verifyaudit", stdout=out)
    assert f"the newest checkpoint signs record 2, signed {report.signed_at:%Y-%m-%d %H:%M:%S}Z" in (
        out.getvalue()
    )
    assert f"; {report.unsigned} later records (the newest written " in out.getvalue()


# --- whose keys a checkpoint's signature may come from ---


def _rewrite_from(seq: int) -> dict[int, str]:
    """Edit record ``seq``, recompute its hash, every later one and the head's; return the new hashes."""
    from audit.chain import link_hash

    rows = list(AuditEvent.objects.order_by("seq"))
    rows[seq - 1].actor = "user:mallory"
    prev, hashes = rows[seq - 2].hash, dict[int, str]()
    for row in rows[seq - 1 :]:
        row.prev_hash, row.hash = prev, link_hash(prev, row)
        _behind_the_apps_back(
            "UPDATE audit_auditevent SET actor=%s, prev_hash=%s, hash=%s WHERE id=%s",
            [row.actor, row.prev_hash, row.hash, row.pk],
        )
        prev = hashes[row.seq or 0] = row.hash
    _head_set(hash=prev)
    return hashes


@pytest.mark.parametrize("how", ["a key row added", "a published key's public part replaced"])
@pytest.mark.django_db
def test_a_checkpoint_signed_with_an_attackers_own_key_is_refused(how):
    from cryptography.fernet import Fernet
    from jwcrypto import jwk, jws

    from authserver.checkpoints import CHECKPOINT_TYPE
    from authserver.models import SigningKey

    _events(4)
    checkpoint = checkpoint_sign()
    assert checkpoint is not None
    hashes = _rewrite_from(2)
    mallory = jwk.JWK.generate(kty="RSA", size=2048)
    kid = mallory.thumbprint() if how == "a key row added" else checkpoint.kid
    public = {**mallory.export_public(as_dict=True), "kid": kid, "alg": "RS256", "use": "sig"}
    if how == "a key row added":  # sealed with a key-encryption key of the attacker's, not ours
        sealed = Fernet(Fernet.generate_key()).encrypt(mallory.export_to_pem(private_key=True, password=None))
        now = timezone.now()
        SigningKey.objects.create(
            kid=kid,
            public_jwk=public,
            private_key_encrypted=sealed,
            state=SigningKey.State.REMOVED,
            publish_at=now,
            activate_after=now,
        )
    else:
        SigningKey.objects.filter(kid=kid).update(public_jwk=public)
    forged = jws.JWS(json.dumps({"seq": checkpoint.seq, "hash": hashes[checkpoint.seq], "at": 1}).encode())
    forged.add_signature(
        mallory, alg="RS256", protected=json.dumps({"alg": "RS256", "kid": kid, "typ": CHECKPOINT_TYPE})
    )
    _behind_the_apps_back(
        "UPDATE audit_auditcheckpoint SET head_hash = %s, signature = %s WHERE id = %s",
        [hashes[checkpoint.seq], forged.serialize(compact=True), checkpoint.pk],
    )
    report = chain_verify()
    assert not report.ok
    assert report.reason == f"checkpoint at record {checkpoint.seq} has no valid signature"


@pytest.mark.django_db
def test_a_checkpoint_signed_by_a_key_since_rotated_out_and_removed_still_verifies():
    from datetime import timedelta

    from django.conf import settings

    from authserver.models import SigningKey
    from authserver.selectors import active_key_cache_clear
    from authserver.services import signing_key_rotate

    _events(2)
    old = checkpoint_sign()
    assert old is not None
    signing_key_rotate(force=True, activate_now=True)
    retired_for = int(settings.AUTHSERVER["ACCESS_TOKEN_LIFETIME_S"]) + 180  # past its remove_after
    removed = signing_key_rotate(now=timezone.now() + timedelta(seconds=retired_for))
    assert old.kid in removed.removed
    assert SigningKey.objects.get(kid=old.kid).state == SigningKey.State.REMOVED
    active_key_cache_clear()
    new = checkpoint_sign()
    assert new is not None
    assert new.kid != old.kid
    report = chain_verify()
    assert report.ok, report.reason
    assert report.checkpoints == 2


@pytest.mark.django_db
def test_an_ipv4_mapped_address_is_stored_as_its_ipv4_and_the_chain_still_verifies():
    event = audit_record(kind="test.mapped", ip="::ffff:192.0.2.7")  # from a dual-stack listener
    assert AuditEvent.objects.get(pk=event.pk).ip == "192.0.2.7"
    report = chain_verify()
    assert report.ok, report.reason  # hashed '::ffff:c000:207', stored '::ffff:192.0.2.7': "does not match"
