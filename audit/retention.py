"""Retention: the one audited way old audit rows leave the database (archive, then prune).

Rows older than a cutoff are written to a JSON-lines archive (with its SHA-256), then deleted in a
transaction that sets ``portcullis.audit_prune`` — the only case the append-only trigger lets through. The
chain's base moves to the last pruned record, so ``verifyaudit`` verifies what remains from there, and the
run itself is an audit event naming the count, the archive digest and the new base, and a checkpoint is
signed over it at once: ``verifyaudit`` trusts a moved base only when a signature covers the record that
moved it, and would otherwise report the chain broken until beat's next checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from django.core import serializers
from django.db import connection, transaction

from audit.chain import chain_prune, checkpoint_sign
from audit.models import AuditCheckpoint, AuditEvent, UsageRecord
from audit.services import audit_record


@dataclass(frozen=True)
class PruneResult:
    events: int
    usage: int
    archive: Path
    sha256: str
    base_seq: int


def audit_archive_and_prune(*, before: datetime, archive: Path, actor: str) -> PruneResult:
    """Archive every audit event and usage record older than ``before`` to ``archive``, then delete them."""
    cutoff = AuditEvent.objects.filter(occurred_at__lt=before, seq__isnull=False).order_by("-seq").first()
    before_seq = (cutoff.seq or 0) + 1 if cutoff is not None else 0
    events = AuditEvent.objects.filter(seq__lt=before_seq)
    usage = UsageRecord.objects.filter(occurred_at__lt=before)
    digest = hashlib.sha256()
    with archive.open("w", encoding="utf-8") as out:
        for queryset in (events.order_by("seq"), usage.order_by("occurred_at")):
            for row in serializers.serialize("python", queryset.iterator()):
                line = json.dumps(row, default=str, sort_keys=True) + "\n"
                digest.update(line.encode())
                out.write(line)
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL portcullis.audit_prune = 'on'")
        base_seq, base_hash = chain_prune(before_seq=before_seq)
        counts = (events.delete()[0], usage.delete()[0])
        AuditCheckpoint.objects.filter(seq__lte=base_seq).delete()
    audit_record(
        kind="audit.pruned",
        actor=actor,
        data={
            "events": counts[0],
            "usage_records": counts[1],
            "archive_sha256": digest.hexdigest(),
            "before": before.isoformat(),
            "base_seq": base_seq,
            "base_hash": base_hash,
        },
    )
    checkpoint_sign()  # no signer registered (the audit app alone): beat's next run signs it
    return PruneResult(counts[0], counts[1], archive, digest.hexdigest(), base_seq)
