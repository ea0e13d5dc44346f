"""The tamper-evident chain over audit events, and its signed checkpoints.

Every event commits to the one before it: ``hash = SHA-256(previous hash + canonical event)``, with a
gap-free sequence number. Writers lock the single ``ChainHead`` row (and, for SQLite, a process lock), so
concurrent writers cannot fork the chain. On PostgreSQL, writers outside a transaction commit in groups:
the events that queue up while one group commits are chained and committed together by the next, and
each writer returns once its own event is committed; a group whose process last left the head where it
still is goes in as one statement that moves the head only from there. A trigger refuses UPDATE and
DELETE on the audit tables. A beat job signs the head with the active signing key; ``verifyaudit``
recomputes the chain from one snapshot of the database, checks every checkpoint signature, and names the
first record that does not match. It starts from the base an archive-and-prune run moved only when the
chain itself vouches for that base, says how many of the newest records no signature covers yet (those
could be cut off unseen), and can fail when the newest signature is older than the operator allows.

The package: ``links`` (what a record's hash covers), ``head`` (the row that says where the chain starts
and ends), ``append`` (the one way events are written), ``checkpoints`` (signing the head) and ``verify``.
The audit app imports no other app: the signer and the public keys are registered by the authorization
server (``checkpoint_keys_register``).
"""

from __future__ import annotations

from audit.chain.append import GroupAppender, event_append
from audit.chain.checkpoints import Signer, Verifier, checkpoint_keys_register, checkpoint_sign
from audit.chain.head import chain_head, chain_prune
from audit.chain.links import GENESIS, canonical, link_hash, normalise_ip, storable, unicode_valid
from audit.chain.verify import PRUNED_KIND, ChainReport, chain_verify, checkpoint_age_problem

__all__ = [
    "GENESIS",
    "PRUNED_KIND",
    "ChainReport",
    "GroupAppender",
    "Signer",
    "Verifier",
    "canonical",
    "chain_head",
    "chain_prune",
    "chain_verify",
    "checkpoint_age_problem",
    "checkpoint_keys_register",
    "checkpoint_sign",
    "event_append",
    "link_hash",
    "normalise_ip",
    "storable",
    "unicode_valid",
]
