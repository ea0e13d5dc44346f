"""A fast stand-in for vLLM's OpenAI-compatible API server, written as a raw ASGI 3 application.

It answers /v1/models, /v1/chat/completions, /v1/completions and /v1/embeddings with the bodies, the
server-sent-event framing and the error shapes of vLLM's `vllm.entrypoints.openai.api_server`, generating
deterministic text ("tok0 tok1 ...") instead of running a model. Like vLLM, `--api-key` guards only paths
under /v1, while /health, /metrics, /invocations, /tokenize and the admin-ish routes stay open. Behaviour
can be changed at runtime and inspected through the test-only /_fake/ endpoints, which are not part of
vLLM. Nothing here imports Django, so the module runs with or without Django settings.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import hashlib
import json
import logging
import math
import os
import secrets
import struct
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Handler = Callable[[bytes, Receive, Send], Awaitable[bool]]

MAX_MODEL_LEN = 4096
HISTORY = 50
MAX_CHOICES = 1024
MAX_TRACKED_PATHS = 1000
COMPLETION_DEFAULT_MAX_TOKENS = 16  # vLLM's CompletionRequest.max_tokens default
FAKE_PREFIX = "/_fake/"

_ENCODER = json.JSONEncoder(separators=(",", ":"))
_encode = _ENCODER.encode

JSON_TYPE = b"application/json"
SSE_START: Message = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")],
}
UNAUTHORIZED = b'{"error":"Unauthorized"}'
DONE_FRAME = b"data: [DONE]\n\n"
# vLLM serialises streaming errors with json.dumps defaults, hence the spaces.
ERROR_FRAME = (
    b'data: {"error": {"message": "Internal server error", "type": "InternalServerError", '
    b'"param": null, "code": 500}}\n\n'
)

USAGE = '{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d,"prompt_tokens_details":null}'
STREAM_USAGE = '"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d}}\n\n'
CHAT_BODY = (
    '{"id":"chatcmpl-%s","object":"chat.completion","created":%d,"model":%s,"choices":[%s],'
    '"service_tier":null,"system_fingerprint":null,"usage":%s,"prompt_logprobs":null,"kv_transfer_params":null}'
)
CHAT_CHOICE = (
    '{"index":%d,"message":{"role":"assistant","content":%s,"refusal":null,"annotations":null,"audio":null,'
    '"function_call":null,"tool_calls":[],"reasoning_content":null},"logprobs":null,"finish_reason":"%s",'
    '"stop_reason":null}'
)
COMPLETION_BODY = (
    '{"id":"cmpl-%s","object":"text_completion","created":%d,"model":%s,"choices":[%s],'
    '"service_tier":null,"system_fingerprint":null,"usage":%s,"kv_transfer_params":null}'
)
COMPLETION_CHOICE = (
    '{"index":%d,"text":%s,"logprobs":null,"finish_reason":"%s","stop_reason":null,"prompt_logprobs":null}'
)
CHAT_HEAD = 'data: {"id":"chatcmpl-%s","object":"chat.completion.chunk","created":%d,"model":%s,"choices":['
COMPLETION_HEAD = 'data: {"id":"cmpl-%s","object":"text_completion","created":%d,"model":%s,"choices":['
CHAT_ROLE = '{"index":%d,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}'
CHAT_DELTA = '{"index":%d,"delta":{"content":%s},"logprobs":null,"finish_reason":null}'
CHAT_LAST = '{"index":%d,"delta":{"content":%s},"logprobs":null,"finish_reason":"%s","stop_reason":null}'
COMPLETION_DELTA = '{"index":%d,"text":%s,"logprobs":null,"finish_reason":null,"stop_reason":null}'
COMPLETION_LAST = '{"index":%d,"text":%s,"logprobs":null,"finish_reason":"%s","stop_reason":null}'

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


@dataclass
class FakeConfig:
    """Behaviour of the fake server; every field can also be changed at runtime via POST /_fake/config."""

    models: list[str] = field(default_factory=lambda: ["fake-model"])
    api_key: str | None = None
    tokens: int = 16
    chunk_delay_s: float = 0.0
    first_chunk_delay_s: float = 0.0
    fail_after_chunks: int | None = None
    embedding_dim: int = 8
    refuse: bool = False
    fail_sends_done: bool = False

    def __post_init__(self) -> None:
        """Validate the fields (raising ValueError) and normalise numbers."""
        if not isinstance(self.models, list) or not self.models:
            raise ValueError("models must be a non-empty list of model names")
        if not all(isinstance(m, str) and m for m in self.models):
            raise ValueError("models must be non-empty strings")
        self.models = list(dict.fromkeys(self.models))
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError("api_key must be a non-empty string or null")
        self.tokens = _checked_int("tokens", self.tokens, 0, MAX_MODEL_LEN)
        self.embedding_dim = _checked_int("embedding_dim", self.embedding_dim, 1, 65536)
        if self.fail_after_chunks is not None:
            self.fail_after_chunks = _checked_int("fail_after_chunks", self.fail_after_chunks, 0, 10**9)
        for name in ("chunk_delay_s", "first_chunk_delay_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 3600:
                raise ValueError(f"{name} must be a number of seconds between 0 and 3600")
            setattr(self, name, float(value))
        for name in ("refuse", "fail_sends_done"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a boolean")


def _checked_int(name: str, value: object, minimum: int, maximum: int) -> int:
    """Return value if it is an int (not a bool) within [minimum, maximum], else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ValueError(f"{name} must be an integer between {minimum} and {maximum}")
    return value


class ApiError(Exception):
    """An error answered with vLLM's ErrorResponse body."""

    def __init__(self, status: int, message: str, err_type: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param

    def body(self) -> bytes:
        """Return the JSON body vLLM sends for this error."""
        error = {"message": self.message, "type": self.err_type, "param": self.param, "code": self.status}
        return _encode({"error": error}).encode()


def _validation_error(message: str, param: str | None = None) -> ApiError:
    """Return the 400 vLLM answers when FastAPI/pydantic rejects a request body."""
    return ApiError(400, message, "Bad Request", param)


def _bad_request(message: str, param: str | None = None) -> ApiError:
    """Return the 400 vLLM's serving layer answers for a semantically invalid request."""
    return ApiError(400, message, "BadRequestError", param)


@dataclass(slots=True)
class Generation:
    """Everything needed to answer one completion-like request, fixed when the request arrives."""

    kind: str
    req_id: str
    created: int
    model: str
    model_json: str
    choices: int
    ntok: int
    finish: str
    prompt_tokens: int
    stream: bool
    include_usage: bool
    first_delay: float
    chunk_delay: float
    fail_after: int | None
    fail_sends_done: bool

    @property
    def completion_tokens(self) -> int:
        """Tokens generated over all choices."""
        return self.ntok * self.choices


class Stats:
    """Counters and recent-request history exposed by /metrics and /_fake/state."""

    def __init__(self) -> None:
        self.running = 0
        self.model_running: dict[str, int] = {}
        self.reset()

    def reset(self) -> None:
        """Clear every counter and the history (requests in flight stay counted as running)."""
        self.total = 0
        self.by_path: dict[str, int] = {}
        self.aborted = 0
        self.finished = 0
        self.refused = 0
        self.headers: deque[list[tuple[bytes, bytes]]] = deque(maxlen=HISTORY)
        self.bodies: deque[Any] = deque(maxlen=HISTORY)
        self.prompt_tokens: dict[str, int] = {}
        self.generation_tokens: dict[str, int] = {}
        self.successes: dict[tuple[str, str], int] = {}

    def record(self, path: str, headers: list[tuple[bytes, bytes]]) -> None:
        """Count one received request and remember its headers."""
        self.total += 1
        by_path = self.by_path
        if path in by_path:
            by_path[path] += 1
        elif len(by_path) < MAX_TRACKED_PATHS:
            by_path[path] = 1
        else:
            by_path["(other)"] = by_path.get("(other)", 0) + 1
        self.headers.append(headers)

    def record_success(self, gen: Generation) -> None:
        """Add a finished generation to the vLLM-style token and success counters."""
        model = gen.model
        self.prompt_tokens[model] = self.prompt_tokens.get(model, 0) + gen.prompt_tokens
        self.generation_tokens[model] = self.generation_tokens.get(model, 0) + gen.completion_tokens
        key = (model, gen.finish)
        self.successes[key] = self.successes.get(key, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """Return the JSON-ready state served by GET /_fake/state."""
        return {
            "requests_total": self.total,
            "requests_by_path": dict(self.by_path),
            "running": self.running,
            "aborted": self.aborted,
            "finished": self.finished,
            "refused": self.refused,
            "last_headers": [_headers_dict(h) for h in self.headers],
            "last_bodies": list(self.bodies),
        }


def _headers_dict(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """Turn ASGI headers into a dict with lowercase names, joining repeated headers with ", "."""
    result: dict[str, str] = {}
    for raw_name, raw_value in headers:
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        result[name] = f"{result[name]}, {value}" if name in result else value
    return result


@functools.lru_cache(maxsize=64)
def _content(ntok: int) -> str:
    """Return the deterministic text of ntok generated tokens."""
    return "".join(f"tok{k} " for k in range(ntok))


@functools.lru_cache(maxsize=4096)
def _token_json(k: int) -> str:
    """Return the JSON string literal of the k-th generated token."""
    return f'"tok{k} "'


@functools.lru_cache(maxsize=256)
def _choices_json(kind: str, count: int, ntok: int, finish: str) -> str:
    """Return the JSON of the choices array content of a non-streaming response."""
    template = CHAT_CHOICE if kind == "chat" else COMPLETION_CHOICE
    content = _encode(_content(ntok))
    return ",".join(template % (i, content, finish) for i in range(count))


def render_body(gen: Generation) -> bytes:
    """Return the non-streaming response body of a chat or text completion."""
    completion = gen.completion_tokens
    usage = USAGE % (gen.prompt_tokens, gen.prompt_tokens + completion, completion)
    template = CHAT_BODY if gen.kind == "chat" else COMPLETION_BODY
    choices = _choices_json(gen.kind, gen.choices, gen.ntok, gen.finish)
    return (template % (gen.req_id, gen.created, gen.model_json, choices, usage)).encode()


def stream_frames(gen: Generation) -> Iterator[bytes | float]:
    """Yield the SSE frames of a streamed response, with floats meaning "sleep this long first"."""
    chat = gen.kind == "chat"
    head = (CHAT_HEAD if chat else COMPLETION_HEAD) % (gen.req_id, gen.created, gen.model_json)
    tail = '],"usage":null}\n\n' if gen.include_usage else "]}\n\n"
    delta, last = (CHAT_DELTA, CHAT_LAST) if chat else (COMPLETION_DELTA, COMPLETION_LAST)
    if gen.first_delay:
        yield gen.first_delay
    if chat:
        for i in range(gen.choices):
            yield (head + CHAT_ROLE % i + tail).encode()
    sent = 0
    for k in range(gen.ntok):
        if k and gen.chunk_delay:
            yield gen.chunk_delay
        text = _token_json(k)
        for i in range(gen.choices):
            if gen.fail_after is not None and sent >= gen.fail_after:
                yield from _failure_frames(gen)
                return
            piece = last % (i, text, gen.finish) if k == gen.ntok - 1 else delta % (i, text)
            yield (head + piece + tail).encode()
            sent += 1
    if gen.fail_after is not None:
        yield from _failure_frames(gen)
        return
    yield from _closing_frames(gen, head, tail, last)


def _failure_frames(gen: Generation) -> Iterator[bytes]:
    """Yield the frames that end a stream with an injected engine error."""
    yield ERROR_FRAME
    if gen.fail_sends_done:
        yield DONE_FRAME


def _closing_frames(gen: Generation, head: str, tail: str, last: str) -> Iterator[bytes]:
    """Yield the finish chunks of an empty generation, the usage chunk and [DONE]."""
    if gen.ntok == 0:
        for i in range(gen.choices):
            yield (head + last % (i, '""', gen.finish) + tail).encode()
    if gen.include_usage:
        completion = gen.completion_tokens
        usage = STREAM_USAGE % (gen.prompt_tokens, gen.prompt_tokens + completion, completion)
        yield (head + "]," + usage).encode()
    yield DONE_FRAME


async def _send_bytes(send: Send, status: int, body: bytes, content_type: bytes | None = JSON_TYPE) -> bool:
    """Send a complete response and report it finished."""
    headers = [(b"content-length", b"%d" % len(body))]
    if content_type is not None:
        headers.append((b"content-type", content_type))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    return True


async def _read_body(receive: Receive) -> bytes | None:
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


async def _wait_disconnect(receive: Receive) -> None:
    """Return once the server reports http.disconnect (client gone, or response complete)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _sleep_unless_disconnected(receive: Receive, delay: float) -> bool:
    """Sleep for delay seconds; return False early if the client disconnects meanwhile."""
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        done, _ = await asyncio.wait((watcher,), timeout=delay)
    finally:
        watcher.cancel()
    return not done


async def _pump(send: Send, frames: Iterator[bytes | float]) -> None:
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


async def _stream(gen: Generation, receive: Receive, send: Send) -> bool:
    """Stream a generation while watching for the client going away; return False if it did."""
    await send(SSE_START)
    sender = asyncio.ensure_future(_pump(send, stream_frames(gen)))
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait((sender, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        sender.cancel()
        watcher.cancel()
    if sender.done() and not sender.cancelled():
        sender.result()
        return True
    return False


async def _refuse(receive: Receive, send: Send) -> None:
    """Close the connection without any response, like a dead upstream (needs uvicorn's transport)."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None:
        raise RuntimeError("refuse mode needs a server that exposes its transport (uvicorn)")
    transport.close()
    try:
        async with asyncio.timeout(1.0):
            await _wait_disconnect(receive)
    except TimeoutError:
        logger.warning("fakevllm: refused connection did not report a disconnect")


async def _lifespan(receive: Receive, send: Send) -> None:
    """Acknowledge the ASGI lifespan protocol."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _parse_object(body: bytes) -> dict[str, Any]:
    """Parse a JSON object request body, raising vLLM's 400 otherwise."""
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _validation_error(f"JSON decode error: {exc}") from exc
    if not isinstance(value, dict):
        raise _validation_error("Input should be a valid dictionary or object to extract fields from")
    return value


def _optional_int(req: Mapping[str, Any], name: str, minimum: int) -> int | None:
    """Return an optional integer field, raising vLLM-style 400s for bad values."""
    value = req.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _validation_error(f"{name}: Input should be a valid integer", name)
    if value < minimum:
        raise _bad_request(f"{name} must be at least {minimum}, got {value}.", name)
    return value


def _count_words(value: Any) -> int:
    """Estimate tokens as whitespace-separated words in message contents / text parts."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, dict):
        return _count_words(value.get("content")) + _count_words(value.get("text"))
    if isinstance(value, list):
        return sum(_count_words(item) for item in value)
    return 0


def _is_token_ids(value: Any) -> bool:
    """Tell whether value is a non-empty list of token ids."""
    return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)


def _split_inputs(value: Any, name: str) -> list[str | list[int]]:
    """Split a prompt/input (string, strings, token ids, lists of token ids) into single prompts."""
    if isinstance(value, str):
        return [value]
    if _is_token_ids(value):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) or _is_token_ids(v) for v in value):
        return list(value)
    if value is None:
        raise _validation_error(f"{name}: Field required", name)
    raise _validation_error(f"{name}: must be a string, a list of strings or a list of token ids", name)


def _input_tokens(item: str | list[int]) -> int:
    """Estimate the token count of one prompt."""
    return len(item) if isinstance(item, list) else max(1, len(item.split()))


def _embedding_input_tokens(item: str | list[int]) -> int:
    """Estimate the tokens of one embedding input, rejecting inputs longer than the context like vLLM."""
    count = _input_tokens(item)
    if count > MAX_MODEL_LEN:
        raise _bad_request(
            f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you requested "
            f"{count} tokens in the input for embedding generation. Please reduce the length of the input.",
            "input_tokens",
        )
    return count


def _check_context(prompt_tokens: int, max_tokens: int | None) -> None:
    """Reject prompts and max_tokens that overflow the context, with vLLM's messages."""
    if prompt_tokens >= MAX_MODEL_LEN:
        raise _bad_request(
            f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, your request has "
            f"{prompt_tokens} input tokens. Please reduce the length of the input messages.",
            "input_tokens",
        )
    if max_tokens is not None and prompt_tokens + max_tokens > MAX_MODEL_LEN:
        raise _bad_request(
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum "
            f"context length is {MAX_MODEL_LEN} tokens and your request has {prompt_tokens} input tokens "
            f"({max_tokens} > {MAX_MODEL_LEN} - {prompt_tokens}).",
            "max_tokens",
        )


def _stream_flags(req: Mapping[str, Any]) -> tuple[bool, bool]:
    """Return (stream, include_usage) with vLLM's defaults and validation."""
    stream = req.get("stream") in (True, 1)
    options = req.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise _validation_error("Stream options can only be defined when `stream=True`.", "stream_options")
    if not isinstance(options, dict):
        raise _validation_error("stream_options: Input should be a valid dictionary", "stream_options")
    return stream, bool(options.get("include_usage", True))


def _embedding_vector(item: str | list[int], dim: int) -> list[float]:
    """Return a deterministic unit vector derived from the input."""
    key = item if isinstance(item, str) else ",".join(map(str, item))
    return list(_embedding_for_key(key, dim))


@functools.lru_cache(maxsize=1024)
def _embedding_for_key(key: str, dim: int) -> tuple[float, ...]:
    """Compute (and cache) the unit vector of one input key."""
    state = zlib.crc32(key.encode("utf-8", "surrogatepass")) or 1
    raw = []
    for _ in range(dim):
        state = (state * 1103515245 + 12345) & 0x7FFFFFFF
        raw.append(state / 0x7FFFFFFF - 0.5)
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return tuple(v / norm for v in raw)


def _encode_embedding(vector: list[float], encoding_format: str) -> list[float] | str:
    """Return the embedding as floats or, like vLLM, as base64 of little-endian float32."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


def _token_ids(text: str) -> list[int]:
    """Return deterministic fake token ids, one per whitespace-separated word."""
    return [zlib.crc32(word.encode("utf-8", "surrogatepass")) % 32000 + 2 for word in text.split()]


def _label(value: str) -> str:
    """Escape a Prometheus label value."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _model_labels(model: str, finished_reason: str | None = None) -> str:
    """Return vLLM's label set for a model (and optionally a finish reason)."""
    if finished_reason is None:
        return f'{{model_name="{_label(model)}"}}'
    return f'{{finished_reason="{finished_reason}",model_name="{_label(model)}"}}'


def _metric(
    out: list[str], name: str, kind: str, help_text: str, samples: Sequence[tuple[str, float]]
) -> None:
    """Append one Prometheus metric family in text exposition format."""
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} {kind}")
    out.extend(f"{name}{labels} {float(value)}" for labels, value in samples)


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
        self._model_json = {name: _encode(name) for name in config.models}
        self._models_body = self._render_models(config.models)

    def _render_models(self, models: list[str]) -> bytes:
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
        return _encode({"object": "list", "data": cards}).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI 3 entry point."""
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await _lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Count the request, apply refuse mode, dispatch and record how the response ended."""
        path = scope["path"]
        if path.startswith(FAKE_PREFIX):
            await self._fake(path, scope, receive, send)
            return
        stats = self.stats
        stats.record(path, scope["headers"])
        if self.config.refuse:
            stats.refused += 1
            await _refuse(receive, send)
            return
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
                return await _send_bytes(send, 401, UNAUTHORIZED)
        route = self.routes.get(path)
        if route is None:
            return await _send_bytes(send, 404, ApiError(404, "Not Found", "Not Found").body())
        methods, handler = route
        if method not in methods:
            error = ApiError(405, "Method Not Allowed", "Method Not Allowed")
            return await _send_bytes(send, 405, error.body())
        body = b""
        if method == "POST":
            read = await _read_body(receive)
            if read is None:
                return False
            body = read
        return await handler(body, receive, send)

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

    def _resolve_model(self, req: Mapping[str, Any]) -> str:
        """Return the requested served model (the first one if omitted), or raise vLLM's 404."""
        model = req.get("model")
        if model is None or model == "":
            return self.config.models[0]
        if not isinstance(model, str):
            raise _validation_error("model: Input should be a valid string", "model")
        if model not in self._model_json:
            raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        return model

    def _parse_recorded(self, body: bytes) -> dict[str, Any]:
        """Parse a JSON object body and remember it for /_fake/state."""
        req = _parse_object(body)
        self.stats.bodies.append(req)
        return req

    async def _chat(self, body: bytes, receive: Receive, send: Send) -> bool:
        """POST /v1/chat/completions."""
        try:
            gen = self._plan("chat", self._parse_recorded(body))
        except ApiError as err:
            return await _send_bytes(send, err.status, err.body())
        return await self._respond(gen, receive, send)

    async def _completions(self, body: bytes, receive: Receive, send: Send) -> bool:
        """POST /v1/completions."""
        try:
            gen = self._plan("completion", self._parse_recorded(body))
        except ApiError as err:
            return await _send_bytes(send, err.status, err.body())
        return await self._respond(gen, receive, send)

    async def _invocations(self, body: bytes, receive: Receive, send: Send) -> bool:
        """POST /invocations (SageMaker): full inference, dispatched on the body like vLLM."""
        try:
            req = self._parse_recorded(body)
            if "messages" in req:
                gen = self._plan("chat", req)
            elif "input" in req and "prompt" not in req:
                return await _send_bytes(send, 200, self._embed(req))
            else:
                gen = self._plan("completion", req)
        except ApiError as err:
            return await _send_bytes(send, err.status, err.body())
        return await self._respond(gen, receive, send)

    def _plan(self, kind: str, req: Mapping[str, Any]) -> Generation:
        """Validate a chat/completion request and fix its generation parameters."""
        if kind == "chat":
            messages = req.get("messages")
            if not isinstance(messages, list):
                raise _validation_error(
                    "messages: Field required"
                    if messages is None
                    else "messages: Input should be a valid list",
                    "messages",
                )
            per_prompt = [max(1, _count_words(messages))]
            max_tokens = _optional_int(req, "max_completion_tokens", 0)
            if max_tokens is None:
                max_tokens = _optional_int(req, "max_tokens", 0)
        else:
            per_prompt = [_input_tokens(p) for p in _split_inputs(req.get("prompt"), "prompt")]
            max_tokens = _optional_int(req, "max_tokens", 0)
            if max_tokens is None:
                max_tokens = COMPLETION_DEFAULT_MAX_TOKENS
        model = self._resolve_model(req)
        n = _optional_int(req, "n", 1) or 1
        if n * len(per_prompt) > MAX_CHOICES:
            raise _bad_request(f"n * number of prompts must be at most {MAX_CHOICES}.", "n")
        for count in per_prompt:
            _check_context(count, max_tokens)
        return self._generation(kind, req, model, n * len(per_prompt), sum(per_prompt), max_tokens)

    def _generation(
        self,
        kind: str,
        req: Mapping[str, Any],
        model: str,
        choices: int,
        prompt_tokens: int,
        max_tokens: int | None,
    ) -> Generation:
        """Build the Generation from validated values and the current config."""
        cfg = self.config
        stream, include_usage = _stream_flags(req)
        if max_tokens is not None and max_tokens < cfg.tokens:
            ntok, finish = max_tokens, "length"
        else:
            ntok, finish = cfg.tokens, "stop"
        return Generation(
            kind=kind,
            req_id=os.urandom(16).hex(),
            created=int(time.time()),
            model=model,
            model_json=self._model_json[model],
            choices=choices,
            ntok=ntok,
            finish=finish,
            prompt_tokens=prompt_tokens,
            stream=stream,
            include_usage=include_usage,
            first_delay=cfg.first_chunk_delay_s,
            chunk_delay=cfg.chunk_delay_s,
            fail_after=cfg.fail_after_chunks,
            fail_sends_done=cfg.fail_sends_done,
        )

    async def _respond(self, gen: Generation, receive: Receive, send: Send) -> bool:
        """Answer a planned generation, streaming or not; return False if the client went away."""
        running = self.stats.model_running
        running[gen.model] = running.get(gen.model, 0) + 1
        try:
            if gen.stream:
                done = await _stream(gen, receive, send)
            elif gen.first_delay and not await _sleep_unless_disconnected(receive, gen.first_delay):
                done = False
            else:
                done = await _send_bytes(send, 200, render_body(gen))
        finally:
            running[gen.model] -= 1
        if done:
            self.stats.record_success(gen)
        return done

    async def _embeddings(self, body: bytes, receive: Receive, send: Send) -> bool:
        """POST /v1/embeddings."""
        try:
            payload = self._embed(self._parse_recorded(body))
        except ApiError as err:
            return await _send_bytes(send, err.status, err.body())
        return await _send_bytes(send, 200, payload)

    def _embed(self, req: Mapping[str, Any]) -> bytes:
        """Validate an embeddings request and return vLLM's EmbeddingResponse body."""
        inputs = _split_inputs(req.get("input"), "input")
        model = self._resolve_model(req)
        encoding_format = req.get("encoding_format") or "float"
        if encoding_format not in ("float", "base64"):
            raise _validation_error("encoding_format: Input should be 'float' or 'base64'", "encoding_format")
        counts = [_embedding_input_tokens(item) for item in inputs]
        dim = self.config.embedding_dim
        data = [
            {
                "index": i,
                "object": "embedding",
                "embedding": _encode_embedding(_embedding_vector(item, dim), encoding_format),
            }
            for i, item in enumerate(inputs)
        ]
        prompt = sum(counts)
        usage = {
            "prompt_tokens": prompt,
            "total_tokens": prompt,
            "completion_tokens": 0,
            "prompt_tokens_details": None,
        }
        response = {
            "id": f"embd-{os.urandom(16).hex()}",
            "object": "list",
            "created": int(time.time()),
            "model": model,
            "data": data,
            "usage": usage,
        }
        return _encode(response).encode()

    async def _models(self, body: bytes, receive: Receive, send: Send) -> bool:
        """GET /v1/models."""
        return await _send_bytes(send, 200, self._models_body)

    async def _health(self, body: bytes, receive: Receive, send: Send) -> bool:
        """GET /health and /ping: 200 with an empty body."""
        return await _send_bytes(send, 200, b"", None)

    async def _version(self, body: bytes, receive: Receive, send: Send) -> bool:
        """GET /version."""
        return await _send_bytes(send, 200, b'{"version":"0.0.0+fakevllm"}')

    async def _load(self, body: bytes, receive: Receive, send: Send) -> bool:
        """GET /load: vLLM's server_load (requests in flight, not counting this one)."""
        return await _send_bytes(send, 200, b'{"server_load":%d}' % (self.stats.running - 1))

    async def _is_sleeping(self, body: bytes, receive: Receive, send: Send) -> bool:
        """GET /is_sleeping."""
        return await _send_bytes(send, 200, b'{"is_sleeping":false}')

    async def _admin(self, body: bytes, receive: Receive, send: Send) -> bool:
        """Admin-ish vLLM routes (/pause, /sleep, /collective_rpc, ...): 200 {} (the hit is counted)."""
        return await _send_bytes(send, 200, b"{}")

    async def _tokenize(self, body: bytes, receive: Receive, send: Send) -> bool:
        """POST /tokenize: deterministic ids, one per word of the prompt or of the messages."""
        try:
            req = self._parse_recorded(body)
            if req.get("model") is not None:
                self._resolve_model(req)
            if "messages" in req:
                text = " ".join(_content_texts(req.get("messages")))
            elif isinstance(req.get("prompt"), str):
                text = req["prompt"]
            else:
                raise _validation_error("prompt: Field required", "prompt")
        except ApiError as err:
            return await _send_bytes(send, err.status, err.body())
        tokens = _token_ids(text)
        result = {"count": len(tokens), "max_model_len": MAX_MODEL_LEN, "tokens": tokens, "token_strs": None}
        return await _send_bytes(send, 200, _encode(result).encode())

    async def _detokenize(self, body: bytes, receive: Receive, send: Send) -> bool:
        """POST /detokenize: renders every id as `tok<id>`."""
        try:
            tokens = self._parse_recorded(body).get("tokens")
            if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
                raise _validation_error("tokens: Input should be a valid list of integers", "tokens")
        except ApiError as err:
            return await _send_bytes(send, err.status, err.body())
        prompt = " ".join(f"tok{t}" for t in tokens)
        return await _send_bytes(send, 200, _encode({"prompt": prompt}).encode())

    async def _metrics(self, body: bytes, receive: Receive, send: Send) -> bool:
        """GET /metrics: a few vLLM series plus fakevllm's own counters."""
        content_type = b"text/plain; version=0.0.4; charset=utf-8"
        return await _send_bytes(send, 200, self.render_metrics().encode(), content_type)

    def render_metrics(self) -> str:
        """Return the Prometheus text exposition of the counters."""
        s, out = self.stats, list[str]()
        models = self.config.models
        by_model = [(_model_labels(m), s.model_running.get(m, 0)) for m in models]
        _metric(
            out,
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            by_model,
        )
        waiting = [(_model_labels(m), 0) for m in models]
        _metric(
            out, "vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", waiting
        )
        prompt = [(_model_labels(m), v) for m, v in s.prompt_tokens.items()]
        _metric(out, "vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.", prompt)
        generation = [(_model_labels(m), v) for m, v in s.generation_tokens.items()]
        _metric(
            out,
            "vllm:generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
            generation,
        )
        success = [(_model_labels(m, finished_reason=r), v) for (m, r), v in s.successes.items()]
        _metric(
            out, "vllm:request_success_total", "counter", "Count of successfully processed requests.", success
        )
        paths = [(f'{{path="{_label(p)}"}}', v) for p, v in s.by_path.items()]
        _metric(out, "fakevllm_requests_total", "counter", "Requests received, by path (not /_fake/).", paths)
        _metric(out, "fakevllm_requests_running", "gauge", "Requests being answered.", [("", s.running)])
        aborted_help = "Requests whose client disconnected before the response finished."
        _metric(out, "fakevllm_requests_aborted_total", "counter", aborted_help, [("", s.aborted)])
        finished_help = "Requests answered completely."
        _metric(out, "fakevllm_requests_finished_total", "counter", finished_help, [("", s.finished)])
        refused_help = "Connections closed without a response by refuse mode."
        _metric(out, "fakevllm_requests_refused_total", "counter", refused_help, [("", s.refused)])
        return "\n".join(out) + "\n"

    async def _fake(self, path: str, scope: Scope, receive: Receive, send: Send) -> None:
        """The test-only /_fake/ endpoints (not part of vLLM, never counted, never refused)."""
        method = scope["method"]
        if path == "/_fake/state" and method == "GET":
            state = {**self.stats.snapshot(), "config": asdict(self.config)}
            await _send_bytes(send, 200, _encode(state).encode())
        elif path == "/_fake/reset" and method == "POST":
            self.stats.reset()
            await _send_bytes(send, 200, b"{}")
        elif path == "/_fake/config" and method == "GET":
            await _send_bytes(send, 200, _encode(asdict(self.config)).encode())
        elif path == "/_fake/config" and method == "POST":
            body = await _read_body(receive)
            if body is not None:
                await self._update_config(body, send)
        else:
            await _send_bytes(send, 404, ApiError(404, "Not Found", "Not Found").body())

    async def _update_config(self, body: bytes, send: Send) -> None:
        """Apply a partial FakeConfig given as a JSON object; answer the resulting config."""
        try:
            update = _parse_object(body)
            unknown = sorted(set(update) - {f.name for f in fields(FakeConfig)})
            if unknown:
                raise _validation_error(f"unknown FakeConfig fields: {', '.join(unknown)}")
            try:
                new_config = replace(self.config, **update)
            except (ValueError, TypeError) as exc:
                raise _validation_error(str(exc)) from exc
        except ApiError as err:
            await _send_bytes(send, err.status, err.body())
            return
        self.configure(new_config)
        logger.info("fakevllm: configuration changed: %s", update)
        await _send_bytes(send, 200, _encode(asdict(new_config)).encode())


def _content_texts(messages: Any) -> list[str]:
    """Return the text pieces of chat messages (string contents and text parts)."""
    texts: list[str] = []
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return texts


def create_app(config: FakeConfig) -> FakeVLLM:
    """Build the ASGI application for the given configuration."""
    return FakeVLLM(config)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the command-line options shared by `manage.py fakevllm` and `python -m fakevllm`."""
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8001, help="port to bind (default 8001)")
    parser.add_argument("--models", default="fake-model", help="comma-separated served model names")
    parser.add_argument(
        "--api-key",
        default=None,
        help="require `Authorization: Bearer KEY` on /v1/* (default: $VLLM_API_KEY, as vLLM reads it)",
    )
    parser.add_argument("--tokens", type=int, default=16, help="tokens generated per choice (default 16)")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="delay between streamed tokens")
    parser.add_argument(
        "--first-chunk-delay-ms",
        type=float,
        default=0.0,
        help="delay before the first token (time to response when not streaming)",
    )
    parser.add_argument(
        "--fail-after-chunks",
        type=int,
        default=None,
        help="end streams with an error frame after this many token chunks",
    )
    parser.add_argument(
        "--fail-sends-done",
        action="store_true",
        help="send data: [DONE] after the injected error frame, as current vLLM does",
    )
    parser.add_argument("--embedding-dim", type=int, default=8, help="embedding vector size (default 8)")
    parser.add_argument("--refuse", action="store_true", help="start in refuse mode (close every connection)")


def config_from_options(options: Mapping[str, Any]) -> FakeConfig:
    """Build a FakeConfig from parsed command-line options (raises ValueError when invalid)."""
    models = [name.strip() for name in str(options["models"]).split(",") if name.strip()]
    return FakeConfig(
        models=models,
        # as vLLM: the option, else the environment variable (a key on the command line is any user's to read)
        api_key=options.get("api_key") or os.environ.get("VLLM_API_KEY") or None,
        tokens=options["tokens"],
        chunk_delay_s=options["chunk_delay_ms"] / 1000.0,
        first_chunk_delay_s=options["first_chunk_delay_ms"] / 1000.0,
        fail_after_chunks=options.get("fail_after_chunks"),
        embedding_dim=options["embedding_dim"],
        refuse=bool(options.get("refuse")),
        fail_sends_done=bool(options.get("fail_sends_done")),
    )


def serve(config: FakeConfig, host: str, port: int) -> None:
    """Run the app with uvicorn (httptools + uvloop, quiet) until interrupted."""
    import uvicorn

    logger.info("fakevllm: serving %s on %s:%d", ",".join(config.models), host, port)
    uvicorn.run(
        create_app(config),
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        ws="none",
        log_level="warning",
        access_log=False,
        workers=1,  # an app object cannot be forked; also ignores a WEB_CONCURRENCY in the environment
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m fakevllm`."""
    parser = argparse.ArgumentParser(prog="fakevllm", description="Fake vLLM OpenAI-compatible server.")
    add_arguments(parser)
    options = vars(parser.parse_args(argv))
    try:
        config = config_from_options(options)
    except ValueError as exc:
        parser.error(str(exc))
    serve(config, options["host"], options["port"])


if __name__ == "__main__":
    main()
