"""A fast stand-in for vLLM's OpenAI-compatible API server, written as a raw ASGI 3 application.

It answers /v1/models, /v1/chat/completions, /v1/completions and /v1/embeddings with the bodies, the
server-sent-event framing and the error shapes of vLLM's `vllm.entrypoints.openai.api_server`, generating
deterministic text ("tok0 tok1 ...") instead of running a model. Like vLLM, `--api-key` guards only paths
under /v1, while /health, /metrics, /invocations, /tokenize and the admin-ish routes stay open. Behaviour
can be changed at runtime and inspected through the test-only /_fake/ endpoints (`fakevllm.controls`),
which are not part of vLLM: among them the failures vLLM can have (a stream that breaks half-way, a dead
engine, connections refused). Nothing the server imports needs Django (only `apps.py` and the management
command do), so it runs with or without settings.

This module owns routing, the API-key rule, request counting and the endpoints; the package's other
modules plan generations (`generation`), render them (`render`), and hold the ASGI plumbing (`asgi`).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

from fakevllm import asgi
from fakevllm.asgi import Receive, Scope, Send, encode, send_bytes
from fakevllm.config import MAX_MODEL_LEN, VERSION, FakeConfig
from fakevllm.controls import PREFIX as FAKE_PREFIX
from fakevllm.controls import fake_endpoint
from fakevllm.embeddings import embedding_body
from fakevllm.errors import ENGINE_DEAD, METHOD_NOT_ALLOWED, NOT_FOUND, ApiError, validation_error
from fakevllm.generation import Generation, plan
from fakevllm.metrics import CONTENT_TYPE as METRICS_TYPE
from fakevllm.metrics import render_metrics
from fakevllm.render import SSE_START, render_body, stream_frames
from fakevllm.request_ids import echoing_request_id, random_id, request_id_header
from fakevllm.stats import Stats
from fakevllm.validation import content_texts, parse_object, resolve_model

Handler = Callable[[Scope, bytes, Receive, Send], Awaitable[bool]]

UNAUTHORIZED = b'{"error":"Unauthorized"}'
OPEN_ADMIN_PATHS = (
    "/pause",
    "/resume",
    "/update_weights",
    "/sleep",
    "/wake_up",
    "/collective_rpc",
    "/reset_prefix_cache",
    "/scale_elastic_ep",
    "/server_info",
)


class FakeVLLM:
    """The ASGI application: routing, auth, counters and the vLLM endpoints."""

    def __init__(self, config: FakeConfig) -> None:
        self.stats = Stats()
        self.started = int(time.time())
        self.configure(config)
        admin: dict[str, tuple[frozenset[str], Handler]] = {
            path: (frozenset({"GET", "POST"}), self._admin) for path in OPEN_ADMIN_PATHS
        }
        self.routes: dict[str, tuple[frozenset[str], Handler]] = {
            **admin,
            "/v1/chat/completions": (frozenset({"POST"}), self._chat),
            "/v1/completions": (frozenset({"POST"}), self._completions),
            "/v1/embeddings": (frozenset({"POST"}), self._embeddings),
            "/v1/models": (frozenset({"GET"}), self._models),
            "/invocations": (frozenset({"POST"}), self._invocations),
            "/health": (frozenset({"GET"}), self._health),
            "/ping": (frozenset({"GET", "POST"}), self._health),
            "/metrics": (frozenset({"GET"}), self._metrics),
            "/version": (frozenset({"GET"}), self._version),
            "/load": (frozenset({"GET"}), self._load),
            "/is_sleeping": (frozenset({"GET"}), self._is_sleeping),
            "/tokenize": (frozenset({"POST"}), self._tokenize),
            "/detokenize": (frozenset({"POST"}), self._detokenize),
        }

    def configure(self, config: FakeConfig) -> None:
        """Switch to a new configuration and precompute what depends on it."""
        self.config = config
        self._key_hash = None if config.api_key is None else hashlib.sha256(config.api_key.encode()).digest()
        self._model_json = {name: encode(name) for name in config.models}
        self._models_body = _models_body(config.models)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI 3 entry point."""
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await asgi.lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Count the request, apply refuse mode, dispatch and record how the response ended."""
        path = scope["path"]
        if path.startswith(FAKE_PREFIX):
            await fake_endpoint(self, path, scope, receive, send)
            return
        stats = self.stats
        stats.record(path, scope["headers"])
        if self.config.refuse:
            stats.refused += 1
            await asgi.refuse(receive, send)
            return
        if self.config.enable_request_id_headers:
            header = request_id_header(scope)
            send = echoing_request_id(send, header if header is not None else random_id())
        stats.running += 1
        outcome: bool | None = None
        try:
            outcome = await self._dispatch(path, scope, receive, send)
        finally:
            stats.running -= 1
            if outcome is True:
                stats.finished += 1
            elif outcome is False:
                stats.aborted += 1

    async def _dispatch(self, path: str, scope: Scope, receive: Receive, send: Send) -> bool:
        """Apply vLLM's /v1 API-key rule, route, read the body and run the handler."""
        method = scope["method"]
        if self._key_hash is not None and path.startswith("/v1") and method != "OPTIONS":
            if not self._authorized(scope["headers"]):
                return await send_bytes(send, 401, UNAUTHORIZED)
        route = self.routes.get(path)
        if route is None:
            return await send_bytes(send, 404, NOT_FOUND.body())
        methods, handler = route
        if method not in methods:
            return await send_bytes(send, 405, METHOD_NOT_ALLOWED.body())
        body = b""
        if method == "POST":
            read = await asgi.read_body(receive)
            if read is None:
                return False
            body = read
        return await handler(scope, body, receive, send)

    def _authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """Check `Authorization: Bearer <key>` exactly as vLLM's AuthenticationMiddleware does."""
        for name, value in headers:
            if name.lower() == b"authorization":
                scheme, _, param = value.decode("latin-1").partition(" ")
                if scheme.lower() != "bearer" or self._key_hash is None:
                    return False
                digest = hashlib.sha256(param.encode("utf-8", "surrogateescape")).digest()
                return secrets.compare_digest(digest, self._key_hash)
        return False

    def _parse_recorded(self, body: bytes) -> dict[str, Any]:
        """Parse a JSON object body and remember it for /_fake/state."""
        req = parse_object(body)
        self.stats.bodies.append(req)
        return req

    async def _chat(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> bool:
        """POST /v1/chat/completions."""
        return await self._generate("chat", scope, body, receive, send)

    async def _completions(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> bool:
        """POST /v1/completions."""
        return await self._generate("completion", scope, body, receive, send)

    async def _invocations(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> bool:
        """POST /invocations (SageMaker): full inference, dispatched on the body like vLLM."""
        try:
            req = self._parse_recorded(body)
        except ApiError as err:
            return await send_bytes(send, err.status, err.body())
        if "messages" in req:
            return await self._generate("chat", scope, req, receive, send)
        if "input" in req and "prompt" not in req:
            return await self._answer_embeddings(scope, req, send)
        return await self._generate("completion", scope, req, receive, send)

    async def _embeddings(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> bool:
        """POST /v1/embeddings."""
        try:
            req = self._parse_recorded(body)
        except ApiError as err:
            return await send_bytes(send, err.status, err.body())
        return await self._answer_embeddings(scope, req, send)

    async def _generate(
        self, kind: str, scope: Scope, body: bytes | dict[str, Any], receive: Receive, send: Send
    ) -> bool:
        """Plan a chat or text completion from its body (raw or parsed) and answer it."""
        try:
            req = self._parse_recorded(body) if isinstance(body, bytes) else body
            gen = plan(kind, req, self.config, self._model_json, request_id_header(scope))
            self._check_engine()
        except ApiError as err:
            return await send_bytes(send, err.status, err.body())
        return await self._respond(gen, receive, send)

    async def _answer_embeddings(self, scope: Scope, req: dict[str, Any], send: Send) -> bool:
        """Answer a parsed embeddings request."""
        try:
            config = self.config
            header = request_id_header(scope)
            matryoshka = config.matryoshka_models
            payload = embedding_body(req, self._model_json, config.embedding_dim, header, matryoshka)
            self._check_engine()
        except ApiError as err:
            return await send_bytes(send, err.status, err.body())
        return await send_bytes(send, 200, payload)

    def _check_engine(self) -> None:
        """Raise vLLM's 500 for a request that passed validation while the engine is dead."""
        if self.config.engine_dead:
            raise ENGINE_DEAD

    async def _respond(self, gen: Generation, receive: Receive, send: Send) -> bool:
        """Answer a planned generation, streaming or not; return False if the client went away."""
        running = self.stats.model_running
        running[gen.model] = running.get(gen.model, 0) + 1
        try:
            if gen.stream:
                done = await asgi.stream(SSE_START, stream_frames(gen), receive, send)
            elif gen.first_delay and not await asgi.sleep_unless_disconnected(receive, gen.first_delay):
                done = False
            else:
                done = await send_bytes(send, 200, render_body(gen))
        finally:
            running[gen.model] -= 1
        if done:
            self.stats.record_success(gen)
        return done

    async def _models(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> bool:
        """GET /v1/models."""
        return await send_bytes(send, 200, self._models_body)

    async def _health(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> bool:
        """GET /health and /ping: 200 with an empty body, or 503 when the engine is dead.

        vLLM's `health` (vllm/entrypoints/serve/instrumentator/health.py; /ping calls it) answers
        EngineDeadError from `check_health` with an empty 503, while the server still takes connections:
        until its watchdog stops it (vllm/entrypoints/launcher.py), or for good with
        VLLM_KEEP_ALIVE_ON_ENGINE_DEATH.
        """
        return await send_bytes(send, 503 if self.config.engine_dead else 200, b"", None)

    async def _version(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> bool:
        """GET /version."""
        return await send_bytes(send, 200, encode({"version": VERSION}).encode())

    async def _load(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> bool:
        """GET /load: vLLM's server_load (requests in flight, not counting this one)."""
        return await send_bytes(send, 200, b'{"server_load":%d}' % (self.stats.running - 1))

    async def _is_sleeping(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> bool:
        """GET /is_sleeping."""
        return await send_bytes(send, 200, b'{"is_sleeping":false}')

    async def _admin(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> bool:
        """Admin-ish vLLM routes (/pause, /sleep, /collective_rpc, ...): 200 {} (the hit is counted)."""
        return await send_bytes(send, 200, b"{}")

    async def _tokenize(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> bool:
        """POST /tokenize: deterministic ids, one per word of the prompt or of the messages."""
        try:
            req = self._parse_recorded(body)
            if req.get("model") is not None:
                resolve_model(req, self._model_json)
            if "messages" in req:
                text = " ".join(content_texts(req.get("messages")))
            elif isinstance(req.get("prompt"), str):
                text = req["prompt"]
            else:
                raise validation_error("prompt: Field required", "prompt")
        except ApiError as err:
            return await send_bytes(send, err.status, err.body())
        tokens = _token_ids(text)
        result = {"count": len(tokens), "max_model_len": MAX_MODEL_LEN, "tokens": tokens, "token_strs": None}
        return await send_bytes(send, 200, encode(result).encode())

    async def _detokenize(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> bool:
        """POST /detokenize: renders every id as `tok<id>`."""
        try:
            tokens = self._parse_recorded(body).get("tokens")
            if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
                raise validation_error("tokens: Input should be a valid list of integers", "tokens")
        except ApiError as err:
            return await send_bytes(send, err.status, err.body())
        prompt = " ".join(f"tok{t}" for t in tokens)
        return await send_bytes(send, 200, encode({"prompt": prompt}).encode())

    async def _metrics(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> bool:
        """GET /metrics: a few vLLM series plus fakevllm's own counters."""
        text = render_metrics(self.stats, self.config.models)
        return await send_bytes(send, 200, text.encode(), METRICS_TYPE)


def create_app(config: FakeConfig) -> FakeVLLM:
    """Build the ASGI application for the given configuration."""
    return FakeVLLM(config)


def _models_body(models: list[str]) -> bytes:
    """Return the /v1/models body (precomputed, since it only changes with the config)."""
    created = int(time.time())
    permission = {
        "id": f"modelperm-{os.urandom(16).hex()}",
        "object": "model_permission",
        "created": created,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }
    cards = [
        {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": name,
            "parent": None,
            "max_model_len": MAX_MODEL_LEN,
            "permission": [permission],
        }
        for name in models
    ]
    return encode({"object": "list", "data": cards}).encode()


def _token_ids(text: str) -> list[int]:
    """Return deterministic fake token ids, one per whitespace-separated word."""
    return [zlib.crc32(word.encode("utf-8", "surrogatepass")) % 32000 + 2 for word in text.split()]
