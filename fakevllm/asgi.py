"""The ASGI plumbing the fake server is built on: message types, whole and streamed responses, body reads,
disconnect watching, the lifespan handshake and refuse mode's silent close. Nothing here knows vLLM.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

encode = json.JSONEncoder(separators=(",", ":")).encode

JSON_TYPE = b"application/json"


async def send_bytes(send: Send, status: int, body: bytes, content_type: bytes | None = JSON_TYPE) -> bool:
    """Send a complete response and report it finished."""
    headers = [(b"content-length", b"%d" % len(body))]
    if content_type is not None:
        headers.append((b"content-type", content_type))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    return True


async def read_body(receive: Receive) -> bytes | None:
    """Read the whole request body, or return None if the client disconnected first."""
    message = await receive()
    if message["type"] == "http.disconnect":
        return None
    body = message.get("body", b"")
    if not message.get("more_body"):
        return body
    parts = [body]
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


async def wait_disconnect(receive: Receive) -> None:
    """Return once the server reports http.disconnect (client gone, or response complete)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def sleep_unless_disconnected(receive: Receive, delay: float) -> bool:
    """Sleep for delay seconds; return False early if the client disconnects meanwhile."""
    watcher = asyncio.ensure_future(wait_disconnect(receive))
    try:
        done, _ = await asyncio.wait((watcher,), timeout=delay)
    finally:
        watcher.cancel()
    return not done


async def pump(send: Send, frames: Iterator[bytes | float]) -> None:
    """Send the frames, sleeping where asked, coalescing frames that follow each other without delay."""
    batch: list[bytes] = []
    for item in frames:
        if isinstance(item, bytes):
            batch.append(item)
            continue
        if batch:
            await send({"type": "http.response.body", "body": b"".join(batch), "more_body": True})
            batch = []
        await asyncio.sleep(item)
    await send({"type": "http.response.body", "body": b"".join(batch), "more_body": False})


async def stream(start: Message, frames: Iterator[bytes | float], receive: Receive, send: Send) -> bool:
    """Send start, then the frames, while watching for the client going away; return False if it did."""
    await send(start)
    sender = asyncio.ensure_future(pump(send, frames))
    watcher = asyncio.ensure_future(wait_disconnect(receive))
    try:
        await asyncio.wait((sender, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        sender.cancel()
        watcher.cancel()
    if sender.done() and not sender.cancelled():
        sender.result()
        return True
    return False


async def refuse(receive: Receive, send: Send) -> None:
    """Close the connection without any response, like a dead upstream (needs uvicorn's transport)."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None:
        raise RuntimeError("refuse mode needs a server that exposes its transport (uvicorn)")
    transport.close()
    try:
        async with asyncio.timeout(1.0):
            await wait_disconnect(receive)
    except TimeoutError:
        logger.warning("fakevllm: refused connection did not report a disconnect")


async def lifespan(receive: Receive, send: Send) -> None:
    """Acknowledge the ASGI lifespan protocol."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
