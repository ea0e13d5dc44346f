"""The inference endpoints (/v1/chat/completions, /v1/completions, /v1/embeddings): validate, admit
against the client's limits, send upstream with the tenant's cache salt, and relay the answer, whole or
streamed, settling the reservation with what vLLM reports."""

from __future__ import annotations

import logging
import os
import time

from audit.compact_json import json_compact_dump
from gateway import errors
from gateway.admission import admit, escaped_size, prompt_estimate, settle
from gateway.consumers.base import SCOPE_FOR, ClientGone, GatewayConsumer, RevokedMeanwhile
from gateway.metrics import ACTIVE_STREAMS, stream_writes_observe
from gateway.salt import cache_salt
from gateway.streaming import StreamRelay, usage_counts
from gateway.upstream import upstream_read
from gateway.validation import Validated, request_validate

logger = logging.getLogger(__name__)

UPSTREAM_PATH = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
}
FORWARDED_HEADERS = frozenset({b"accept", b"user-agent", b"accept-language"})
# What a chat's /tokenize takes of the request besides its messages: what shapes the prompt vLLM renders
PROMPT_SHAPING = ("tools", "chat_template_kwargs", "add_generation_prompt", "continue_final_message")


class CapOverflow(Exception):
    """vLLM refused a chat for its context (prompt + max_tokens beyond it), and that max_tokens was the
    client's cap, filled in by the gateway because the request set none."""

    def __init__(self, status: int, data: bytes) -> None:
        super().__init__(status)
        self.status, self.data = status, data


def cap_overflowed(request: Validated, status: int, data: bytes) -> bool:
    """Whether an upstream's refusal is vLLM's context overflow of a max_tokens the gateway filled in. Every
    wording vLLM has used says "context length" ("maximum context length is N tokens", "the model's context
    length is only N tokens")."""
    return status == 400 and request.cap_filled and b"context length" in data


class InferenceConsumer(GatewayConsumer):
    """POST /v1/chat/completions, /v1/completions, /v1/embeddings."""

    async def handle(self, body: bytes) -> int:
        content_type = media_type(self.headers.get(b"content-type", b""))
        principal = await self.authenticate(SCOPE_FOR[self.kind])
        if content_type != b"application/json":
            raise errors.UnsupportedMediaType(param="content-type")
        if self.headers.get(b"content-encoding", b"identity").strip().lower() != b"identity":
            # read as it came, a compressed body would be refused as bad JSON, or a plain one served that
            # a proxy in front decoded otherwise: either way, refuse the coding (RFC 9110 §15.5.16)
            refused = errors.UnsupportedMediaType(
                "The request body must not be content-encoded (Content-Encoding: identity).",
                param="content-encoding",
            )
            refused.headers["accept-encoding"] = "identity"
            raise refused
        policy = self.rt.policies.get(principal.client_id)
        request = request_validate(
            self.kind, body, max_tokens_cap=policy.max_tokens, strict_tools=self.rt.conf.upstream_strict_tools
        )
        self.record.update(model=request.model, stream=request.stream)
        if request.model not in policy.models:
            raise errors.ModelNotAllowed(param="model")
        if not self.rt.upstreams.serves(request.model):
            raise errors.ModelNotFound(f"The model '{request.model}' is not served here.", param="model")
        # embeddings too: vLLM caches the prefixes a causal embedding model (last-token pooling) reads
        salt = cache_salt(self.rt.conf.prefix_cache_scope, principal.client_id, principal.user)
        if salt is not None:
            request.payload["cache_salt"] = salt
        outbound = json_compact_dump(request.payload)
        ticket = await admit(self.rt, principal, policy, request, escaped_size(outbound))
        used = 0
        try:
            if request.stream:
                status, used = await self._relay_stream(request, outbound, ticket.headers)
            else:
                status, used = await self._relay_json(request, outbound, ticket.headers)
        finally:
            settle(self.rt, principal, ticket, used)
        return status

    def _forward_headers(self) -> dict[str, str]:
        headers = {k.decode(): v.decode("latin-1") for k, v in self.headers.items() if k in FORWARDED_HEADERS}
        # vLLM makes the X-Request-Id its engine's request id, which must be unique: two requests running
        # with one id fail (or, with several API servers, have crashed the engine), and a client could
        # reuse another's. A client's own id goes on with a random suffix, so vLLM's logs still show it.
        upstream_id = self.request_id
        if upstream_id.encode("latin-1") == self.headers.get(b"x-request-id"):
            upstream_id += "-" + os.urandom(8).hex()
        headers["x-request-id"] = upstream_id
        return headers

    async def _relay_json(
        self, request: Validated, outbound: bytes, extra: dict[str, str]
    ) -> tuple[int, int]:
        started = time.perf_counter()
        try:
            status, data = await self._unless_cut(self._call(request, outbound))
        except (ClientGone, RevokedMeanwhile) as cut:
            # The upstream connection was closed as the wait was cut, so vLLM aborted the generation.
            # What it did is unknown: the prompt it read is charged (estimated, as it was reserved).
            prompt = prompt_estimate(request, escaped_size(outbound))
            gone = isinstance(cut, ClientGone)
            self.record.update(
                upstream_ms=round((time.perf_counter() - started) * 1000, 3),
                prompt_tokens=prompt,
                completion_tokens=0,
                outcome="client_gone" if gone else "revoked",
            )
            if gone:
                return 499, prompt
            await self._deny(errors.TokenRevoked())  # the one answer, and a gateway.denied record
            return errors.TokenRevoked.status, prompt
        self.record["upstream_ms"] = round((time.perf_counter() - started) * 1000, 3)
        if status != 200:
            raise self._upstream_error(request, status, data)
        answer = self.rt.answer_parse(data)
        if answer is None:  # relayed, it reached the client labelled JSON, and was charged nothing
            logger.warning("upstream %s answered 200 with no answer object", self.record["upstream"])
            raise errors.UpstreamFailed()
        usage = usage_counts(answer.get("usage"))
        if usage is None:  # vLLM always says; without, the prompt is charged as reserved, as for a stream
            usage = (prompt_estimate(request, escaped_size(outbound)), 0)
        self.record.update(prompt_tokens=usage[0], completion_tokens=usage[1])
        await self.send_json(200, data, extra)
        return 200, usage[0] + usage[1]

    async def _call(self, request: Validated, outbound: bytes) -> tuple[int, bytes]:
        """Send the request upstream and read its whole answer (a cancel closes the upstream connection);
        once more with a max_tokens that fits, when the client's cap filled in did not (``_fitted``)."""
        status, data = await self._call_once(request, outbound)
        if cap_overflowed(request, status, data):
            fitted = await self._fitted(request)
            if fitted is not None:
                status, data = await self._call_once(request, fitted)
        return status, data

    async def _call_once(self, request: Validated, outbound: bytes) -> tuple[int, bytes]:
        async with self.rt.upstreams.request(
            request.model, UPSTREAM_PATH[self.kind], outbound, self._forward_headers()
        ) as (
            upstream,
            response,
        ):
            self.record["upstream"] = upstream.base
            return response.status, await upstream_read(response)

    async def _relay_stream(
        self, request: Validated, outbound: bytes, extra: dict[str, str]
    ) -> tuple[int, int]:
        try:
            return await self._stream(request, outbound, extra, refit=True)
        except CapOverflow as overflow:
            fitted = await self._fitted(request)
            if fitted is None:
                raise self._upstream_error(request, overflow.status, overflow.data) from None
            return await self._stream(request, fitted, extra, refit=False)

    async def _fitted(self, request: Validated) -> bytes | None:
        """The chat again, its max_tokens lowered to what the model's context leaves after the prompt, or
        None when the upstream cannot say or leaves nothing.

        The client's cap is filled in as max_tokens when a chat sets none (gateway.validation), and vLLM
        refuses a max_tokens that, with the prompt, overflows the context; without one, vLLM would have
        generated up to the context's end. So the gateway asks the model's upstream to count the prompt
        (vLLM's ``POST /tokenize``, which renders the chat as a generation would) and sends the chat once
        more with the smaller of the cap and the room left. The gateway has no tokenizer; vLLM's own
        message is no count to trust (its newer wording gives a lower bound). Only a refused chat pays."""
        payload = request.payload
        ask = {"model": request.model, "messages": payload["messages"]}
        ask.update((key, payload[key]) for key in PROMPT_SHAPING if key in payload)
        try:
            async with self.rt.upstreams.request(
                request.model, "/tokenize", json_compact_dump(ask), self._forward_headers()
            ) as (_upstream, response):
                answer = self.rt.answer_parse(await upstream_read(response))
                status = response.status
        except errors.GatewayError:
            return None
        if status != 200 or answer is None:
            return None
        count, context = answer.get("count"), answer.get("max_model_len")
        if type(count) is not int or type(context) is not int or request.max_tokens is None:
            return None
        room = min(context - count, request.max_tokens)
        if room < 1:
            return None
        return json_compact_dump({**payload, "max_tokens": room})

    def _upstream_error(self, request: Validated, status: int, data: bytes) -> errors.GatewayError:
        """The upstream's refusal as the client gets it; one of a max_tokens the client never sent says
        where it came from."""
        error = self.rt.upstream_error(status, data)
        if request.cap_filled and status == 400 and isinstance(error, errors.InvalidRequest):
            error.detail = (
                f"{error.detail} (The request set no max_tokens, so this client's cap of "
                f"{request.max_tokens} was sent; set a smaller max_tokens.)"
            )
        return error

    async def _stream(
        self, request: Validated, outbound: bytes, extra: dict[str, str], *, refit: bool
    ) -> tuple[int, int]:
        assert self.principal is not None  # noqa: S101  (authenticate ran)
        started = time.perf_counter()
        async with self.rt.upstreams.request(
            request.model, UPSTREAM_PATH[self.kind], outbound, self._forward_headers()
        ) as (
            upstream,
            response,
        ):
            self.record["upstream"] = upstream.base
            if response.status != 200:
                data = await upstream_read(response)
                if refit and cap_overflowed(request, response.status, data):
                    raise CapOverflow(response.status, data)  # the call closed, then _fitted
                raise self._upstream_error(request, response.status, data)
            if not event_stream(response.headers):  # a JSON body or a page was relayed as events
                logger.warning("upstream %s answered a stream with no event stream", upstream.base)
                raise errors.UpstreamFailed()
            headers = self._base_headers(b"text/event-stream")
            headers += [(b"cache-control", b"no-store"), (b"x-accel-buffering", b"no")]
            headers += [(k.encode(), v.encode()) for k, v in extra.items()]
            self.response_started = True
            await self.send_headers(status=200, headers=headers)
            # the served protocol's way to write an event at once (config/protocol.py), when it has one
            extensions = self.scope.get("extensions") or {}
            writer = extensions.get("portcullis.body_write") or {}
            relay = StreamRelay(
                self, response, wants_usage=request.wants_usage, write_now=writer.get("write")
            )
            ACTIVE_STREAMS.inc()
            try:
                with self.rt.watcher.watch(self.principal, relay.revoked):
                    outcome = await relay.run(self._receive, extensions.get("portcullis.disconnect"))
            finally:
                ACTIVE_STREAMS.dec()
                stream_writes_observe(relay.written_now, relay.sent)
        if outcome == "upstream_error":  # the client got the gateway's error event, not the upstream's
            logger.warning(
                "upstream %s failed during stream %s: %s",
                self.record["upstream"],
                self.request_id,
                relay.upstream_error_type or "the connection broke",
            )
        if not relay.usage_seen:
            # cut short (or vLLM sent no usage): the prompt it read is charged too, estimated as reserved
            relay.prompt_tokens = prompt_estimate(request, escaped_size(outbound))
        self.record.update(
            upstream_ms=round((time.perf_counter() - started) * 1000, 3),
            prompt_tokens=relay.prompt_tokens,
            completion_tokens=relay.completion_tokens,
            outcome=outcome,
        )
        return 200, relay.prompt_tokens + relay.completion_tokens


def media_type(content_type: bytes) -> bytes:
    """A Content-Type value's media type, lower case, without its parameters (RFC 9110 §8.3.1)."""
    return content_type.split(b";", 1)[0].strip().lower()


def event_stream(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether an upstream's answer says it is an event stream (``text/event-stream``, any parameters)."""
    for name, value in headers:
        if name.lower() == b"content-type":
            return media_type(value) == b"text/event-stream"
    return False


class ChatConsumer(InferenceConsumer):
    kind = "chat"


class CompletionsConsumer(InferenceConsumer):
    kind = "completions"


class EmbeddingsConsumer(InferenceConsumer):
    kind = "embeddings"
