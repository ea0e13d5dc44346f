"""The test-only /_fake/ endpoints, which are not part of vLLM: read the state and configuration, clear the
counters, and change the configuration at runtime. They are never counted, and refuse mode spares them.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, fields, replace
from typing import TYPE_CHECKING, Any

from fakevllm.asgi import Receive, Scope, Send, encode, read_body, send_bytes
from fakevllm.config import FakeConfig
from fakevllm.errors import NOT_FOUND, ApiError, validation_error
from fakevllm.validation import parse_object

if TYPE_CHECKING:
    from fakevllm.app import FakeVLLM

logger = logging.getLogger(__name__)

PREFIX = "/_fake/"


async def fake_endpoint(app: FakeVLLM, path: str, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer GET /_fake/state, POST /_fake/reset, and GET or POST /_fake/config."""
    method = scope["method"]
    if path == "/_fake/state" and method == "GET":
        state = {**app.stats.snapshot(), "config": asdict(app.config)}
        await send_bytes(send, 200, encode(state).encode())
    elif path == "/_fake/reset" and method == "POST":
        app.stats.reset()
        await send_bytes(send, 200, b"{}")
    elif path == "/_fake/config" and method == "GET":
        await send_bytes(send, 200, encode(asdict(app.config)).encode())
    elif path == "/_fake/config" and method == "POST":
        body = await read_body(receive)
        if body is not None:
            await _update_config(app, body, send)
    else:
        await send_bytes(send, 404, NOT_FOUND.body())


def loggable(update: dict[str, Any]) -> dict[str, Any]:
    """Return a configuration change fit for a log: a new API key only said to be required (or not)."""
    if "api_key" not in update:
        return update
    key = update["api_key"]
    return {**update, "api_key": "<required>" if key is not None else None}


async def _update_config(app: FakeVLLM, body: bytes, send: Send) -> None:
    """Apply a partial FakeConfig given as a JSON object; answer the resulting config."""
    try:
        update = parse_object(body)
        unknown = sorted(set(update) - {f.name for f in fields(FakeConfig)})
        if unknown:
            raise validation_error(f"unknown FakeConfig fields: {', '.join(unknown)}")
        try:
            new_config = replace(app.config, **update)
        except (ValueError, TypeError) as exc:
            raise validation_error(str(exc)) from exc
    except ApiError as err:
        await send_bytes(send, err.status, err.body())
        return
    app.configure(new_config)
    logger.info("fakevllm: configuration changed: %s", loggable(update))
    await send_bytes(send, 200, encode(asdict(new_config)).encode())
