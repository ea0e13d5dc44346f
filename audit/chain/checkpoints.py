"""Signed checkpoints: the chain head at one moment, signed with a key the audit app does not hold.

The audit app imports no other app: the signer and the verifier are registered by the authorization
server (``checkpoint_keys_register``). A beat job signs the head every few minutes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from audit.chain.head import chain_head
from audit.models import AuditCheckpoint

Signer = Callable[[bytes], tuple[str, str]]  # payload -> (kid, compact JWS)
Verifier = Callable[[str], bytes | None]  # compact JWS -> payload if the signature verifies, else None
_keys: dict[str, Any] = {}


def checkpoint_keys_register(*, signer: Signer, verifier: Verifier) -> None:
    """Let the key owner (the authorization server) sign and verify checkpoints."""
    _keys["signer"], _keys["verifier"] = signer, verifier


def checkpoint_verifier() -> Verifier | None:
    """Return the registered verifier (None: the audit app alone, which cannot verify a signature)."""
    verifier: Verifier | None = _keys.get("verifier")
    return verifier


def checkpoint_sign(*, now: float | None = None) -> AuditCheckpoint | None:
    """Sign the current chain head with the active key (beat runs this); None when nothing to sign."""
    signer: Signer | None = _keys.get("signer")
    seq, head_hash = chain_head()
    if signer is None or seq == 0:
        return None
    payload = json.dumps({"seq": seq, "hash": head_hash, "at": int(now or time.time())}).encode()
    kid, signature = signer(payload)
    return AuditCheckpoint.objects.create(seq=seq, head_hash=head_hash, kid=kid, signature=signature)
