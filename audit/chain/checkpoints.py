"""Signed checkpoints: the chain head at one moment, signed with a key the audit app does not hold.

The audit app imports no other app: the signer and the verifier are registered by the authorization
server (``checkpoint_keys_register``). A beat job signs the head every few minutes, once what it would vouch
for beyond the newest checkpoint verifies (``audit.chain.verify.chain_tail_verify``); when it does not, the
job signs nothing, logs an error and records an ``audit.checkpoint_refused`` event.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from audit.models import AuditCheckpoint, AuditEvent

logger = logging.getLogger(__name__)

Signer = Callable[[bytes], tuple[str, str]]  # payload -> (kid, compact JWS)
Verifier = Callable[[str], bytes | None]  # compact JWS -> payload if the signature verifies, else None
REFUSED_KIND = "audit.checkpoint_refused"  # the record of a head not signed because the chain does not verify
_keys: dict[str, Any] = {}


def checkpoint_keys_register(*, signer: Signer, verifier: Verifier) -> None:
    """Let the key owner (the authorization server) sign and verify checkpoints."""
    _keys["signer"], _keys["verifier"] = signer, verifier


def checkpoint_verifier() -> Verifier | None:
    """Return the registered verifier (None: the audit app alone, which cannot verify a signature)."""
    verifier: Verifier | None = _keys.get("verifier")
    return verifier


def checkpoint_sign(*, now: float | None = None, pruning: AuditEvent | None = None) -> AuditCheckpoint | None:
    """Sign the current chain head with the active key (beat runs this) once what it vouches for verifies;
    None when there is nothing to sign, or when the chain does not verify (logged and recorded).
    ``pruning``: the ``audit.pruned`` record an archive-and-prune run just wrote, the one such record past
    the newest checkpoint that may be signed."""
    from audit.chain.verify import chain_tail_verify  # verify imports this module (the verifier)

    signer: Signer | None = _keys.get("signer")
    if signer is None:
        return None
    tail = chain_tail_verify(pruning=pruning)
    if tail.problem:
        _refused(tail.seq, tail.problem)
        return None
    if tail.seq == 0:
        return None
    payload = json.dumps({"seq": tail.seq, "hash": tail.hash, "at": int(now or time.time())}).encode()
    kid, signature = signer(payload)
    return AuditCheckpoint.objects.create(seq=tail.seq, head_hash=tail.hash, kid=kid, signature=signature)


def _refused(seq: int, problem: str) -> None:
    """Say, in the log and in the chain, that the head was not signed and why."""
    from audit.services import audit_record  # the service appends through this package

    logger.error("audit: the chain head at record %s was not signed: %s", seq, problem)
    audit_record(
        kind=REFUSED_KIND,
        outcome=AuditEvent.Outcome.FAILURE,
        actor="system",
        data={"head_seq": seq, "reason": problem},
    )
