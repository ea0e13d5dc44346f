"""Archive and prune: the deletes, the base, the pruning record and its checkpoint commit as one."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from audit import retention
from audit.chain import chain_head, chain_verify, checkpoint_sign
from audit.models import AuditCheckpoint, AuditEvent, ChainHead, UsageRecord
from audit.services import audit_record


def _old_and_new() -> None:
    """Five records older than a year, two new ones, and a checkpoint signed over them all."""
    old = timezone.now() - timedelta(days=400)
    for i in range(5):
        audit_record(kind="test.old", data={"i": i}, occurred_at=old)
    for i in range(2):
        audit_record(kind="test.new", data={"i": i})
    assert checkpoint_sign() is not None


def _prune(archive: Path) -> retention.PruneResult:
    before = timezone.now() - timedelta(days=365)
    return retention.audit_archive_and_prune(before=before, archive=archive, actor="test")


def _state() -> tuple[Any, ...]:
    head = ChainHead.objects.get()
    checkpoints = list(AuditCheckpoint.objects.order_by("pk").values_list("pk", flat=True))
    return chain_head(), (head.base_seq, head.base_hash), AuditEvent.objects.count(), checkpoints


@pytest.mark.parametrize("failing", ["audit_record", "checkpoint_sign"])
@pytest.mark.django_db(transaction=True)
def test_a_prune_that_fails_after_its_deletes_deletes_nothing_and_the_chain_still_verifies(
    tmp_path, monkeypatch, failing
):
    _old_and_new()
    before = _state()
    deleted_when_it_failed: list[bool] = []

    def fail(**kwargs: Any) -> None:  # as a crash would, or the database going away mid-prune
        deleted_when_it_failed.append(not AuditEvent.objects.filter(kind="test.old").exists())
        raise DatabaseError("the connection was lost")

    monkeypatch.setattr(retention, failing, fail)
    with pytest.raises(DatabaseError, match="the connection was lost"):
        _prune(tmp_path / "old.jsonl")
    assert deleted_when_it_failed == [True]  # it failed after the deletes had run
    assert _state() == before  # and none of them, nor the base's move, was kept
    assert AuditEvent.objects.filter(kind="test.old").count() == 5
    assert not AuditEvent.objects.filter(kind="audit.pruned").exists()
    report = chain_verify()
    assert report.ok, report.reason
    assert report.base_seq == 0
    monkeypatch.undo()  # run again: the prune goes through, and the chain verifies from its new base
    result = _prune(tmp_path / "again.jsonl")
    assert (result.events, result.base_seq) == (5, 5)
    report = chain_verify()
    assert report.ok, report.reason
    assert report.base_seq == 5


@pytest.mark.django_db
def test_the_trigger_lets_through_the_prunes_deletes_and_nothing_after_them(tmp_path, monkeypatch):
    if connection.vendor != "postgresql":
        pytest.skip("the append-only trigger is PostgreSQL's")
    _old_and_new()
    real_record, attempts = retention.audit_record, list[str]()

    def record_after_trying_a_delete(**kwargs: Any) -> AuditEvent:
        try:
            with transaction.atomic():
                AuditEvent.objects.filter(kind="test.new").delete()
            attempts.append("deleted")
        except DatabaseError as exc:
            attempts.append("refused" if "append-only" in str(exc) else str(exc))
        return real_record(**kwargs)

    monkeypatch.setattr(retention, "audit_record", record_after_trying_a_delete)
    _prune(tmp_path / "old.jsonl")
    assert attempts == ["refused"]
    assert AuditEvent.objects.filter(kind="test.new").count() == 2
    report = chain_verify()
    assert report.ok, report.reason


@pytest.mark.django_db
def test_the_archive_is_synced_to_disk_before_anything_is_deleted(tmp_path, monkeypatch):
    _old_and_new()
    real_fsync, old_records_at_sync = os.fsync, list[int]()

    def fsync(fd: int) -> None:
        old_records_at_sync.append(AuditEvent.objects.filter(kind="test.old").count())
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    archive = tmp_path / "old.jsonl"
    _prune(archive)
    assert old_records_at_sync == [5, 5]  # the file, then the directory that names it
    assert len(archive.read_text().splitlines()) == 5


@pytest.mark.django_db
def test_an_existing_archive_is_never_overwritten_and_nothing_is_pruned(tmp_path):
    _old_and_new()
    before = _state()
    archive = tmp_path / "old.jsonl"
    archive.write_text("the only copy of last year's rows\n")
    with pytest.raises(FileExistsError):
        _prune(archive)
    assert archive.read_text() == "the only copy of last year's rows\n"
    assert _state() == before
    assert not AuditEvent.objects.filter(kind="audit.pruned").exists()


@pytest.mark.django_db
def test_an_archive_that_cannot_be_written_whole_is_removed_and_nothing_is_pruned(tmp_path, monkeypatch):
    _old_and_new()
    before = _state()
    real_dumps, written = json.dumps, list[Any]()

    def dumps(row: Any, **kwargs: Any) -> str:
        if len(written) == 3:
            raise OSError(28, "No space left on device")  # the disk fills up mid-archive
        written.append(row)
        return real_dumps(row, **kwargs)

    monkeypatch.setattr(retention.json, "dumps", dumps)
    archive = tmp_path / "old.jsonl"
    with pytest.raises(OSError, match="No space left"):
        _prune(archive)
    assert not archive.exists()  # the name is free for the next run
    assert _state() == before
    monkeypatch.undo()
    assert _prune(archive).events == 5  # which then succeeds


def _usage(pk: int | None, *, days_ago: int) -> UsageRecord:
    return UsageRecord.objects.create(
        pk=pk,
        request_id=f"req-{pk}",
        occurred_at=timezone.now() - timedelta(days=days_ago),
        client_id="client",
        endpoint="chat",
        status=200,
    )


def _archived_usage(archive: Path) -> list[int]:
    rows = [json.loads(line) for line in archive.read_text().splitlines()]
    return [row["pk"] for row in rows if row["model"] == "audit.usagerecord"]


@pytest.mark.parametrize("runs_per_delete", [400, 1], ids=["one-delete", "a-delete-per-run"])
@pytest.mark.django_db
def test_old_usage_records_that_arrive_after_the_archive_is_written_are_kept_for_the_next_prune(
    tmp_path, monkeypatch, runs_per_delete
):
    monkeypatch.setattr(retention, "RUNS_PER_DELETE", runs_per_delete)
    _old_and_new()
    first = 10**12  # ids of the test's own, far from the sequence's
    _usage(first + 1, days_ago=400)
    _usage(first + 3, days_ago=400)
    _usage(None, days_ago=1)
    real_write, late = retention._archive_write, list[UsageRecord]()

    def write_then_ingest(*args: Any) -> str:
        digest = real_write(*args)
        # Old records a spool replay commits now: one whose id was taken before the archive was read (its
        # transaction commits after others), and one after.
        late.extend([_usage(first + 2, days_ago=400), _usage(first + 4, days_ago=400)])
        return digest

    monkeypatch.setattr(retention, "_archive_write", write_then_ingest)
    result = _prune(tmp_path / "old.jsonl")
    assert len(late) == 2
    assert _archived_usage(tmp_path / "old.jsonl") == [first + 1, first + 3]
    assert result.usage == AuditEvent.objects.get(kind="audit.pruned").data["usage_records"] == 2
    old = UsageRecord.objects.filter(occurred_at__lt=timezone.now() - timedelta(days=365))
    assert sorted(old.values_list("pk", flat=True)) == [first + 2, first + 4]  # not deleted unarchived
    assert UsageRecord.objects.count() == 3
    monkeypatch.setattr(retention, "_archive_write", real_write)
    result = _prune(tmp_path / "next.jsonl")  # the next run archives and prunes them
    assert result.usage == 2
    assert _archived_usage(tmp_path / "next.jsonl") == [first + 2, first + 4]
    assert UsageRecord.objects.count() == 1
    report = chain_verify()
    assert report.ok, report.reason


@pytest.mark.django_db(transaction=True)
def test_a_prune_whose_record_cannot_be_signed_is_rolled_back_not_left_for_beat_to_refuse(
    tmp_path, monkeypatch
):
    # beat signs a head only when no pruning record after the newest checkpoint is one it did not sign
    # itself: a prune that committed unsigned (no signer, or a chain that does not verify) stayed so
    _old_and_new()
    before = _state()
    monkeypatch.setattr(retention, "checkpoint_sign", lambda **_kwargs: None)
    with pytest.raises(retention.PruneRefused, match="nothing was pruned"):
        _prune(tmp_path / "old.jsonl")
    assert _state() == before
    assert not AuditEvent.objects.filter(kind="audit.pruned").exists()
    assert chain_verify().ok
