"""The gateway's exact path table: each public path maps to one consumer and one fixed upstream path.

A client path is never joined onto an upstream URL; anything not listed is a 404 from the gateway.
"""

from __future__ import annotations

from typing import Any

from gateway.consumers import (
    ChatConsumer,
    CompletionsConsumer,
    EmbeddingsConsumer,
    ModelsConsumer,
    NotFoundConsumer,
)

ROUTES = {
    "/v1/chat/completions": ChatConsumer.as_asgi(),
    "/v1/completions": CompletionsConsumer.as_asgi(),
    "/v1/embeddings": EmbeddingsConsumer.as_asgi(),
    "/v1/models": ModelsConsumer.as_asgi(),
}
NOT_FOUND = NotFoundConsumer.as_asgi()


def is_gateway_path(path: str) -> bool:
    """Return whether a path belongs to the gateway (everything under /v1)."""
    return path == "/v1" or path.startswith("/v1/")


async def gateway_application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Dispatch a /v1 request to its consumer."""
    await ROUTES.get(scope["path"], NOT_FOUND)(scope, receive, send)
