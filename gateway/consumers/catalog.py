"""What the gateway answers itself: the model list a client may use, and a 404 for any other /v1 path."""

from __future__ import annotations

import json

from gateway import errors
from gateway.consumers.base import SCOPE_FOR, GatewayConsumer


class ModelsConsumer(GatewayConsumer):
    """GET /v1/models: only the models this client may use that an upstream serves."""

    kind = "models"
    methods = frozenset({"GET"})

    async def handle(self, body: bytes) -> int:
        principal = await self.authenticate(SCOPE_FOR["models"])
        policy = self.rt.policies.get(principal.client_id)
        cards = self.rt.upstreams.model_cards()
        data = [
            {
                "id": model_id,
                "object": "model",
                "created": card.get("created", 0),
                "owned_by": "portcullis",
                "max_model_len": card.get("max_model_len"),
            }
            for model_id, card in sorted(cards.items())
            if model_id in policy.models
        ]
        await self.send_json(200, json.dumps({"object": "list", "data": data}).encode())
        return 200


class NotFoundConsumer(GatewayConsumer):
    """Every other path under /v1: a 404 from the gateway, never forwarded."""

    kind = "unknown"
    methods = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
    preflights = False  # a preflight is a 404 too: no method is allowed on a path that is no endpoint

    async def handle(self, body: bytes) -> int:
        raise errors.NotFound()
