"""Request ids the way vLLM forms them, from the `X-Request-Id` header, the body, or chance.

vLLM's `OpenAIServing._base_request_id` (vllm/entrypoints/openai/engine/serving.py) takes the request's
`X-Request-Id` header when there is one (even empty), else the default it is given: for chat and text
completions the body's `request_id` (a vLLM extension whose default is `random_uuid()`, 32 hex digits),
for embeddings a random id. The serving layer then prefixes it, and the result is both the engine's request
id and the response's `id`: `chatcmpl-` (`OpenAIServingChat.create_chat_completion` in
chat_completion/serving.py, formerly serving_chat.py), `cmpl-` (`OpenAIServingCompletion.create_completion`
in completion/serving.py), `embd-` (the pooling servers' `request_id_prefix`). vLLM echoes the header back
only with `--enable-request-id-headers` (api_server.py `XRequestIdMiddleware`), which then answers every
response with the request's `X-Request-Id`, or a fresh uuid4 hex when it had none.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from fakevllm.asgi import Message, Scope, Send
from fakevllm.errors import validation_error

HEADER = b"x-request-id"


def request_id_header(scope: Scope) -> str | None:
    """Return the request's first X-Request-Id header (as starlette's Headers.get does), or None."""
    for name, value in scope["headers"]:
        if name.lower() == HEADER:
            return str(value.decode("latin-1"))
    return None


def random_id() -> str:
    """Return a fresh id shaped like vLLM's random_uuid() (32 hex digits)."""
    return os.urandom(16).hex()


def base_request_id(header: str | None, req: Mapping[str, Any] | None = None) -> str:
    """Return the id vLLM builds on: the header, else the body's `request_id` (if req is given), else random.

    The body's field is validated whether or not the header wins: pydantic validates the whole body first.
    """
    body_id = None
    if req is not None and "request_id" in req:
        body_id = req["request_id"]
        if not isinstance(body_id, str):
            raise validation_error("request_id: Input should be a valid string", "request_id")
    if header is not None:
        return header
    return body_id if body_id is not None else random_id()


def echoing_request_id(send: Send, request_id: str) -> Send:
    """Wrap send so the response carries `X-Request-Id: request_id`, like vLLM's XRequestIdMiddleware."""
    header = (b"X-Request-Id", request_id.encode("latin-1", "replace"))

    async def send_with_request_id(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), header]}
        await send(message)

    return send_with_request_id
