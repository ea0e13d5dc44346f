"""Beat signs the chain head only once what the signature would vouch for verifies.

A signature makes what it covers evidence: signing a head over records that do not verify, or over an
``audit.pruned`` record that no archive-and-prune run wrote, would make erased history verify.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import transaction
from django.utils import timezone

from audit.chain import chain_verify, checkpoint_sign
from audit.chain import verify as chain_verify_module
from audit.chain.checkpoints import REFUSED_KIND
from audit.models import AuditCheckpoint, AuditEvent, ChainHead, UsageRecord
from audit.retention import audit_archive_and_prune
from audit.services import audit_record
from tests.audit.test_chain import _behind_the_apps_back, _delete_as_pruning_does, _events, _head_set, _record
from tests.audit.test_chain_verify import _committed_elsewhere

NOT_BY_A_PRUNE = "was not written by an archive-and-prune run"


def _history_erased(*, checkpoints_too: bool = False) -> None:
    """Six records signed; then, as a database writer, records 1 to 3 deleted and the base moved past them
    as a prune would (and the checkpoints deleted too, if asked)."""
    _events(6)
    assert checkpoint_sign() is not None
    base_hash = _record(3).hash
    _delete_as_pruning_does("DELETE FROM audit_auditevent WHERE seq <= %s", [3])
    if checkpoints_too:
        _delete_as_pruning_does("DELETE FROM audit_auditcheckpoint", [])
    _head_set(base_seq=3, base_hash=base_hash)


def _forged_pruning_record() -> AuditEvent:
    """The pruning record a careful forger appends: it names the base the head holds, hash and all."""
    head = ChainHead.objects.get()
    data = {"events": 3, "usage_records": 0, "base_seq": head.base_seq, "base_hash": head.base_hash}
    return audit_record(kind="audit.pruned", actor="cli:pruneaudit", data=data)


def _refusals() -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(kind=REFUSED_KIND).order_by("seq"))


@pytest.mark.parametrize("checkpoints_too", [False, True], ids=["checkpoints-kept", "checkpoints-deleted"])
@pytest.mark.django_db(transaction=True)
def test_beat_does_not_sign_a_pruning_record_written_after_signed_history_was_erased(checkpoints_too, caplog):
    _history_erased(checkpoints_too=checkpoints_too)
    forged = _forged_pruning_record()
    checkpoints = AuditCheckpoint.objects.count()
    with caplog.at_level(logging.ERROR, logger="audit.chain.checkpoints"):
        assert checkpoint_sign() is None  # beat's run, ten minutes later
        assert checkpoint_sign() is None  # and every run after it
    assert AuditCheckpoint.objects.count() == checkpoints
    refusals = _refusals()
    assert len(refusals) == 2
    assert (refusals[0].outcome, refusals[0].actor) == ("failure", "system")
    assert refusals[0].data["head_seq"] == forged.seq
    assert (
        f"the audit.pruned record {forged.seq} after the newest checkpoint {NOT_BY_A_PRUNE}"
        in (refusals[0].data["reason"])
    )
    assert f"the chain head at record {forged.seq} was not signed" in caplog.text
    assert NOT_BY_A_PRUNE in caplog.text
    if not checkpoints_too:  # what the forger wanted: the erased records' signature to vouch for the rest
        report = chain_verify()
        assert not report.ok
        assert f"audit.pruned record {forged.seq} that moved the chain's base to 3 is not" in report.reason
        with pytest.raises(CommandError, match="is not covered by a signed checkpoint"):
            call_command("verifyaudit", "--max-checkpoint-age", "3600", stdout=StringIO())


@pytest.mark.parametrize("written", ["before-the-transaction", "by-another-transaction-meanwhile"])
@pytest.mark.django_db(transaction=True)
def test_a_pruning_record_the_signing_transaction_did_not_write_is_not_signed(written):
    """Signing from inside a transaction (as a prune does) passes only the pruning record it wrote itself."""
    _history_erased()
    forged = _forged_pruning_record() if written == "before-the-transaction" else None
    with transaction.atomic():
        # the transaction writes (so it has an id), but not the audit chain: that would take the head's lock
        UsageRecord.objects.create(
            request_id="r1", occurred_at=timezone.now(), client_id="c", endpoint="chat", status=200
        )
        if forged is None:
            _committed_elsewhere(_forged_pruning_record)
            forged = AuditEvent.objects.get(kind="audit.pruned")
        assert checkpoint_sign() is None
    assert _refusals()[0].data["head_seq"] == forged.seq
    assert NOT_BY_A_PRUNE in _refusals()[0].data["reason"]


def _old_records_pruned(tmp_path: Path) -> AuditEvent:
    old = timezone.now() - timedelta(days=400)
    for i in range(5):
        audit_record(kind="test.old", data={"i": i}, occurred_at=old)
    _events(2)
    assert checkpoint_sign() is not None
    audit_archive_and_prune(
        before=timezone.now() - timedelta(days=365), archive=tmp_path / "old.jsonl", actor="test"
    )
    return AuditEvent.objects.get(kind="audit.pruned")


@pytest.mark.django_db(transaction=True)
def test_a_prune_signs_its_own_pruning_record_and_beat_signs_on_after_it(tmp_path):
    pruned = _old_records_pruned(tmp_path)
    assert AuditCheckpoint.objects.filter(seq__gte=pruned.seq).exists()  # signed in the prune's transaction
    _events(3)
    signed = checkpoint_sign()
    assert signed is not None
    assert signed.seq == ChainHead.objects.get().seq
    report = chain_verify()
    assert report.ok, report.reason
    assert (report.base_seq, report.unsigned) == (5, 0)
    assert _refusals() == []


@pytest.mark.django_db(transaction=True)
def test_a_prune_signs_its_own_pruning_record_when_no_checkpoint_was_signed_before(tmp_path):
    old = timezone.now() - timedelta(days=400)
    for i in range(5):
        audit_record(kind="test.old", data={"i": i}, occurred_at=old)
    _events(2)
    audit_archive_and_prune(
        before=timezone.now() - timedelta(days=365), archive=tmp_path / "old.jsonl", actor="test"
    )
    pruned = AuditEvent.objects.get(kind="audit.pruned")
    assert AuditCheckpoint.objects.filter(seq__gte=pruned.seq).exists()
    assert chain_verify().ok
    assert _refusals() == []


def _tampered(how: str) -> str:
    """Tamper with the records after the newest checkpoint; return what the refusal says."""
    _events(4)
    signed = checkpoint_sign()
    assert signed is not None
    _events(3)
    head = ChainHead.objects.get()
    if how == "edited":
        target = _record(head.seq - 1)
        _behind_the_apps_back(
            "UPDATE audit_auditevent SET actor = %s WHERE id = %s", ["user:mallory", target.pk]
        )
        return f"record {target.seq} does not match its hash"
    if how == "cut-from-the-end":
        _delete_as_pruning_does("DELETE FROM audit_auditevent WHERE seq > %s", [head.seq - 2])
        return f"the chain head says it ends at record {head.seq}, but the records end at {head.seq - 2}"
    if how == "rewound-past-the-checkpoint":
        _delete_as_pruning_does("DELETE FROM audit_auditevent WHERE seq > %s", [signed.seq - 1])
        _head_set(seq=signed.seq - 1, hash=_record(signed.seq - 1).hash)
        return f"before the signed checkpoint at record {signed.seq}: records were cut from its end"
    if how == "forged-checkpoint":
        AuditCheckpoint.objects.create(seq=head.seq, head_hash=head.hash, kid="k", signature="e30.e30.e30")
        return f"checkpoint at record {head.seq} has no valid signature"
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how", ["edited", "cut-from-the-end", "rewound-past-the-checkpoint", "forged-checkpoint"]
)
@pytest.mark.django_db
def test_records_after_the_newest_checkpoint_that_do_not_verify_are_not_signed(how, caplog):
    said = _tampered(how)
    checkpoints = AuditCheckpoint.objects.count()
    with caplog.at_level(logging.ERROR, logger="audit.chain.checkpoints"):
        assert checkpoint_sign() is None
    assert AuditCheckpoint.objects.count() == checkpoints
    refusal = _refusals()[0]
    assert said in refusal.data["reason"]
    assert said in caplog.text
    assert not chain_verify().ok  # and verify says so too, whatever beat does


@pytest.mark.django_db
def test_beat_reads_only_the_records_after_the_newest_checkpoint(monkeypatch):
    _events(5)
    assert checkpoint_sign() is not None  # the first one creates the signing keys, which writes records
    newest = checkpoint_sign()
    assert newest is not None
    _events(3)
    real_events, read = chain_verify_module._events, list[tuple[int, int]]()

    def counted(after: int = 0, batch: int = 2000, upto: int | None = None) -> Any:
        rows = list(real_events(after, batch, upto))
        read.append((after, len(rows)))
        yield from rows

    monkeypatch.setattr(chain_verify_module, "_events", counted)
    signed = checkpoint_sign()
    assert signed is not None
    assert read == [(newest.seq, signed.seq - newest.seq)]
    assert signed.seq - newest.seq == 3


@pytest.mark.django_db
def test_a_pruning_record_that_does_not_name_the_heads_base_is_not_signed_even_by_its_own_transaction():
    """All in the test's one transaction, so the record is this transaction's own, as a prune's is; but a
    prune's record names the base it moved the head to, hash and all, and this one does not."""
    _history_erased()
    forged = audit_record(kind="audit.pruned", actor="cli:pruneaudit", data={"base_seq": 3})
    assert checkpoint_sign() is None
    assert _refusals()[0].data["head_seq"] == forged.seq
    assert NOT_BY_A_PRUNE in _refusals()[0].data["reason"]


@pytest.mark.django_db
def test_verify_keeps_only_the_hashes_checkpoints_name_not_one_per_record(monkeypatch):
    _events(10)
    assert checkpoint_sign() is not None  # the first one creates the signing keys, which writes records
    assert checkpoint_sign() is not None
    _events(5)
    real_walk, walks = chain_verify_module._walk, list[Any]()

    def kept(*args: Any) -> Any:
        walks.append(real_walk(*args))
        return walks[-1]

    monkeypatch.setattr(chain_verify_module, "_walk", kept)
    report = chain_verify()
    assert report.ok, report.reason
    head = ChainHead.objects.get()
    assert (report.checked, report.checkpoints) == (head.seq, 2)
    signed = {c.seq: c.head_hash for c in AuditCheckpoint.objects.all()}
    assert walks[0].hashes == signed  # two, of 15 and more records: memory does not grow with the chain
    assert (walks[0].last_seq, walks[0].last_hash) == (head.seq, head.hash)
