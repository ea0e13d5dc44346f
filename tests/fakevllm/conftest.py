"""Fixtures of the fakevllm tests: a real uvicorn server (httptools + uvloop) in a thread, driven over HTTP
with httpx, and the helpers that talk to it.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn

from fakevllm.server import FakeConfig, FakeVLLM, create_app

DEFAULTS: dict[str, Any] = {
    "models": ["alpha", "beta"],
    "api_key": None,
    "tokens": 5,
    "chunk_delay_s": 0.0,
    "first_chunk_delay_s": 0.0,
    "fail_after_chunks": None,
    "embedding_dim": 8,
    "matryoshka_models": [],
    "refuse": False,
    "fail_sends_done": True,
    "engine_dead": False,
    "enable_request_id_headers": False,
}
ENGINE_ERROR = {
    "error": {"message": "Internal server error", "type": "InternalServerError", "param": None, "code": 500}
}


@dataclass
class RunningFake:
    """A fakevllm app served by uvicorn in a background thread."""

    url: str
    app: FakeVLLM
    server: uvicorn.Server
    thread: threading.Thread
    sock: socket.socket


def start_fake(app: FakeVLLM) -> RunningFake:
    """Serve app on a free loopback port and wait until uvicorn has started."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app, loop="uvloop", http="httptools", ws="none", lifespan="on", log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("fakevllm did not start")
        time.sleep(0.01)
    return RunningFake(f"http://127.0.0.1:{sock.getsockname()[1]}", app, server, thread, sock)


@pytest.fixture(scope="module")
def fake() -> Iterator[RunningFake]:
    """One fake server for the whole module; each test resets it through /_fake/."""
    running = start_fake(create_app(FakeConfig(**DEFAULTS)))
    yield running
    running.server.should_exit = True
    running.thread.join(10)
    running.sock.close()


@pytest.fixture
def client(fake: RunningFake) -> Iterator[httpx.Client]:
    """An HTTP client on the fake, after restoring the default config and clearing the counters."""
    with httpx.Client(base_url=fake.url, timeout=10) as http:
        assert http.post("/_fake/config", json=DEFAULTS).status_code == 200
        assert http.post("/_fake/reset").status_code == 200
        yield http


def configure(client: httpx.Client, **changes: Any) -> dict[str, Any]:
    """Change the fake's config at runtime and return the resulting config."""
    response = client.post("/_fake/config", json=changes)
    assert response.status_code == 200, response.text
    return response.json()


def state(client: httpx.Client) -> dict[str, Any]:
    """Return GET /_fake/state."""
    response = client.get("/_fake/state")
    assert response.status_code == 200
    return response.json()


def chat_body(content: str = "hello there general kenobi", **extra: Any) -> dict[str, Any]:
    """Return a chat completion request for model alpha."""
    return {"model": "alpha", "messages": [{"role": "user", "content": content}], **extra}


def sse_payloads(raw: bytes) -> list[bytes]:
    """Split an SSE body into frame payloads, asserting vLLM's exact `data: ...\\n\\n` framing."""
    assert raw.endswith(b"\n\n"), raw[-80:]
    frames = raw.split(b"\n\n")[:-1]
    for frame in frames:
        assert frame.startswith(b"data: "), frame
        assert b"\n" not in frame
    return [frame[len(b"data: ") :] for frame in frames]


def stream_post(client: httpx.Client, path: str, body: dict[str, Any]) -> tuple[httpx.Response, list[bytes]]:
    """POST a streaming request and return the response and its frame payloads."""
    with client.stream("POST", path, json=body) as response:
        raw = response.read()
    return response, sse_payloads(raw)


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll predicate until it holds or timeout seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()
