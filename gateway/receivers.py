"""The gateway's reactions to changes elsewhere: a client saved or deleted is pushed to every gateway process,
whose snapshot holds the web origins each client lists (``allowed_origins``, CORS)."""

from __future__ import annotations

from typing import Any

from django.db import transaction

from gateway.services import policy_publish


def client_changed(sender: Any, instance: Any, **kwargs: Any) -> None:
    """Push a client's change (its origins, on any save: clients change rarely) once it commits; the gateway
    processes reload their snapshot off the hot path, as for a policy's change."""
    client_id = instance.client_id
    transaction.on_commit(lambda: policy_publish(client_id))
