"""Verifying the chain: one snapshot for the whole walk, and how old the newest signature may be."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import connection, transaction
from django.utils import timezone

from audit.chain import chain_verify, checkpoint_age_problem, checkpoint_sign
from audit.chain import verify as chain_verify_module
from audit.models import AuditEvent
from audit.retention import audit_archive_and_prune
from audit.services import audit_record


def _events(count: int, **fields: Any) -> None:
    for i in range(count):
        audit_record(kind="test.event", actor="user:alice", data={"i": i}, **fields)


def _committed_elsewhere(work: Callable[[], Any]) -> None:
    """Run ``work`` on a connection of its own and wait until it has committed (as another process would)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    if errors:
        raise errors[0]


@pytest.mark.parametrize(
    ("what", "seam"),
    [("a prune", "_walk"), ("appends", "chain_head")],
    ids=["prune-before-the-walk", "appends-before-the-head-is-read"],
)
@pytest.mark.django_db(transaction=True)
def test_writes_committed_while_the_chain_is_verified_do_not_show_as_a_break(
    tmp_path, monkeypatch, what, seam
):
    if connection.vendor != "postgresql":
        pytest.skip("SQLite (the embedded default) is verified statement by statement, without a snapshot")
    old = timezone.now() - timedelta(days=400)
    _events(5, occurred_at=old)
    _events(2)
    assert checkpoint_sign() is not None
    records = AuditEvent.objects.count()

    def write() -> None:
        if what == "a prune":  # deletes records 1 to 5, moves the base, records and signs the prune
            before = timezone.now() - timedelta(days=365)
            audit_archive_and_prune(before=before, archive=tmp_path / "old.jsonl", actor="test")
        else:
            _events(3)

    real, calls = getattr(chain_verify_module, seam), list[str]()

    def committed_first(*args: Any) -> Any:  # the other writer commits between two of verify's statements
        calls.append(seam)
        _committed_elsewhere(write)
        return real(*args)

    monkeypatch.setattr(chain_verify_module, seam, committed_first)
    report = chain_verify()
    assert calls == [seam]
    assert report.ok, report.reason  # before: "record 1 is missing (found 6)", "the chain head says ..."
    assert (report.checked, report.base_seq) == (records, 0)  # the chain as it was when verify began
    monkeypatch.undo()
    report = chain_verify()  # the next run sees what was committed meanwhile, and it verifies too
    assert report.ok, report.reason
    if what == "a prune":
        assert report.base_seq == 5
    else:
        assert report.checked == records + 3


@pytest.mark.django_db
def test_verify_inside_a_callers_transaction_uses_that_transaction():
    _events(3)
    with transaction.atomic():
        audit_record(kind="test.uncommitted")
        report = chain_verify()
    assert report.ok, report.reason
    assert report.checked == 4


# --- how old the newest signature may be ---


def _verifyaudit(*args: str) -> str:
    out = StringIO()
    call_command("verifyaudit", *args, stdout=out)
    return out.getvalue()


def _checkpoints_delete_from(pk: int) -> None:
    """What a writer of the database can do: delete the newest checkpoints (letting the trigger pass)."""
    with transaction.atomic(), connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SET LOCAL portcullis.audit_prune = 'on'")
        cursor.execute("DELETE FROM audit_auditcheckpoint WHERE id >= %s", [pk])


@pytest.mark.django_db
def test_verifyaudit_fails_when_the_newest_checkpoint_is_older_than_allowed():
    _events(3)
    assert checkpoint_sign(now=time.time() - 7200) is not None  # beat stopped two hours ago
    assert "audit chain OK" in _verifyaudit()  # without the option the age is reported, never failed on
    with pytest.raises(CommandError, match=r"STALE: the newest checkpoint was signed 720[01] s ago") as err:
        _verifyaudit("--max-checkpoint-age", "3600")
    assert "more than the 3600 s allowed" in str(err.value)


@pytest.mark.django_db
def test_verifyaudit_passes_when_the_newest_signature_is_recent_even_if_the_head_did_not_move():
    _events(3)
    assert checkpoint_sign() is not None  # the first creates the signing keys, which writes records
    recent = checkpoint_sign()
    old = checkpoint_sign(now=time.time() - 7200)  # the same head again, with an older signed time
    assert recent is not None
    assert old is not None
    assert (old.seq, old.pk) == (recent.seq, recent.pk + 1)  # which of the two sorts last by seq is moot
    out = _verifyaudit("--max-checkpoint-age", "3600")
    assert "audit chain OK" in out
    assert "3 signed checkpoints verified" in out


@pytest.mark.django_db
def test_deleting_the_newest_checkpoints_shows_once_a_maximum_age_is_asked_for():
    _events(3)
    old = checkpoint_sign(now=time.time() - 7200)
    recent = checkpoint_sign()
    assert old is not None
    assert recent is not None
    _checkpoints_delete_from(recent.pk)
    assert "audit chain OK" in _verifyaudit()  # the chain still holds together: nothing else shows it
    with pytest.raises(CommandError, match=r"signed 720[01] s ago .* newest checkpoints were deleted"):
        _verifyaudit("--max-checkpoint-age", "3600")


@pytest.mark.django_db
def test_with_no_checkpoint_the_oldest_records_age_counts():
    _events(2, occurred_at=timezone.now() - timedelta(hours=2))
    assert "audit chain OK" in _verifyaudit("--max-checkpoint-age", "10800")  # beat has had 3 h: not yet
    with pytest.raises(CommandError, match=r"no checkpoint is signed, and the oldest record was written 72"):
        _verifyaudit("--max-checkpoint-age", "3600")


@pytest.mark.django_db
def test_an_empty_chain_passes_on_a_fresh_install_but_not_on_one_whose_log_was_emptied():
    # a role past the triggers empties the log (checkpoints and all): it had passed as a new one
    from django.db.migrations.recorder import MigrationRecorder

    assert "audit chain OK: 0 records" in _verifyaudit("--max-checkpoint-age", "3600")
    made = MigrationRecorder.Migration.objects.filter(app="audit")
    made.update(applied=timezone.now() - timedelta(days=30))
    assert "audit chain OK: 0 records" in _verifyaudit()  # without the option: reported, never failed on
    with pytest.raises(CommandError, match=r"the log holds no record, though its tables were made 2592"):
        _verifyaudit("--max-checkpoint-age", "3600")


@pytest.mark.parametrize("value", ["0", "-5"])
@pytest.mark.django_db
def test_a_maximum_age_that_is_not_positive_is_refused(value):
    with pytest.raises(CommandError, match="must be a positive number of seconds"):
        _verifyaudit("--max-checkpoint-age", value)


@pytest.mark.django_db
def test_the_age_is_measured_from_the_newest_signed_time():
    _events(2)
    signed_at = time.time() - 600
    assert checkpoint_sign(now=signed_at) is not None
    report = chain_verify()
    assert report.ok, report.reason
    assert report.signed_at is not None
    now = report.signed_at + timedelta(seconds=900)
    assert checkpoint_age_problem(report, max_age_s=900, now=now) == ""
    problem = checkpoint_age_problem(report, max_age_s=899, now=now)
    signed = rf"\({report.signed_at:%Y-%m-%d %H:%M:%S}Z\)"
    assert re.match(rf"the newest checkpoint was signed 900 s ago {signed}, more than the 899 s", problem)
