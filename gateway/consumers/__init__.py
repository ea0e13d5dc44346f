"""The /v1 endpoints as Channels consumers: the shared request handling in ``base``, the inference
endpoints in ``inference``, the model list and the 404 in ``catalog``."""

from __future__ import annotations

from gateway.consumers.base import SCOPE_FOR, ClientDisconnected, ClientGone, GatewayConsumer
from gateway.consumers.catalog import ModelsConsumer, NotFoundConsumer
from gateway.consumers.inference import (
    ChatConsumer,
    CompletionsConsumer,
    EmbeddingsConsumer,
    InferenceConsumer,
)

__all__ = [
    "SCOPE_FOR",
    "ChatConsumer",
    "ClientDisconnected",
    "ClientGone",
    "CompletionsConsumer",
    "EmbeddingsConsumer",
    "GatewayConsumer",
    "InferenceConsumer",
    "ModelsConsumer",
    "NotFoundConsumer",
]
