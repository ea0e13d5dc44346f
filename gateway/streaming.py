"""Relay a vLLM server-sent-event stream to the client as it arrives, and account for it.

Each complete SSE event (``data: ...\\n\\n``) is passed on as soon as it is whole; nothing waits for
more. The relay reads the final, usage-only ``usage`` event (the gateway always asks vLLM for it) and drops
it again when the client did not ask; the running counts vLLM puts in every chunk for a client that asked
(``stream_options.continuous_usage_stats``) are relayed unread. Three things can end a stream, whichever
comes first: the upstream finishes, the client goes away (the upstream request is then closed at once, so
vLLM aborts the generation), or the token is revoked (the client gets one error event; the revocation
watcher calls ``revoked``). An upstream failure mid-stream ends the stream with one error event and no
``[DONE]``: the gateway's own, in place of the upstream's (vLLM's carries the exception's text, which is its
business, not the client's; its ``type`` is kept in ``upstream_error_type`` for the log). Nothing after
``[DONE]`` is relayed or counted, and CRLF line ends (which SSE allows; vLLM writes LF) are read as LF.

Once the response headers are out (the relay starts after them), and when the server offers ``write_now`` (the
``portcullis.body_write`` extension of ``config.protocol``), the events are passed on in the upstream read
that brought them (``Response.on_data``), the first one too: no task switch, future or timer per event. Only
what had arrived before the relay's first step goes through ``send`` (the consumer counts the parts by path:
``portcullis_gateway_stream_writes_total``). The request's task still waits for the end, a failure or a cut,
and takes over whenever ``write_now`` declines (the client is slow and its connection paused, or gone), so
back pressure and every way of ending work as before. Measured with ``bench.run --scenarios paced_1000`` on
the project's 2-core machine, this cut the gateway's CPU per 16-event paced stream by 8 and 19 % in two
alternate pairs of runs (bench/README.md, session 12). Taking the first event this way too shortened its step,
from its read to its write, from 11 / 82 / 214–268 µs (p50 / p90 / p99) to 4 / 6 / 9 µs under scenario 4
(session 13).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from typing import Any, Protocol

from audit.compact_json import json_parse
from gateway.http1 import Response

ERROR_EVENT = b'data: {"error": {"message": "%s", "type": "%s", "param": null, "code": "%s"}}\n\n'
# vLLM writes "data: {" exactly; an upstream that writes "data:{" or names its event "error" said the same,
# and its text (a CUDA error, a node's name, a path) reached the client as it was
ERROR_STARTS = (
    b'data: {"error"',
    b'data: {"object": "error"',
    b'data: {"object":"error"',
    b'data:{"error"',
    b'data:{"object":"error"',
    b"event: error\n",
    b"event:error\n",
)
DONE_STARTS = (b"data: [DONE]", b"data:[DONE]")
ENDS = DONE_STARTS + ERROR_STARTS  # one test an event for either: ~500 instructions less an event than two
UPSTREAM_FAILED = ERROR_EVENT % (b"The upstream failed during the stream.", b"api_error", b"upstream_error")
# An event this large is an upstream's failure: held whole until its end, it cost memory without bound, and
# joining it again at every read cost the event loop the square of its size (25 MB held /healthz 1.5 s).
# vLLM's largest are a completion's echoed prompt with its logprobs: some 15 MB for 100,000 tokens.
EVENT_MAX_BYTES = 32 * 1024 * 1024


class BodySender(Protocol):
    async def send_body(self, body: bytes, *, more_body: bool = False) -> None: ...


async def on_disconnect(receive: Any, then: Callable[[], None]) -> None:
    """Call ``then`` once ASGI's ``receive`` says the client disconnected (run as a task of its own)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    then()


class DisconnectWatch:
    """``with DisconnectWatch(told, receive, lost) as lost_already``: call ``lost`` if the client's
    connection is lost while the block runs: the server's ``portcullis.disconnect`` extension (``told``:
    ``config.protocol`` calls its ``on_lost``) says so, or, without it, a task listening on ASGI's
    ``receive``. Gives whether the connection was lost before the block began (``lost`` is then not called:
    what is to be done depends on what has not started yet). A class, not ``contextmanager``: ~7,000
    instructions less a request (bench/README.md, session 23)."""

    __slots__ = ("_listener", "_lost", "_receive", "_told", "_watching")

    def __init__(self, told: dict[str, Any] | None, receive: Any, lost: Callable[[], None]) -> None:
        self._told, self._receive, self._lost = told, receive, lost
        self._listener: asyncio.Task[None] | None = None
        self._watching = False

    def __enter__(self) -> bool:
        told = self._told
        if told is None:
            self._listener = asyncio.create_task(on_disconnect(self._receive, self._lost))
            return False
        if told["lost"]:
            return True
        told["on_lost"] = self._lost
        self._watching = True
        return False

    def __exit__(self, *exc_info: object) -> None:
        if self._listener is not None:
            self._listener.cancel()
        elif self._watching and self._told is not None:
            self._told["on_lost"] = None  # nothing is called back once the block is over


class _ClientGone(Exception):
    """Sending to the client failed: its connection broke, so it has left."""


class StreamRelay:
    def __init__(
        self,
        sink: BodySender,
        response: Response,
        *,
        wants_usage: bool,
        write_now: Callable[[bytes], bool] | None = None,
    ) -> None:
        self.sink = sink
        self.response = response
        self.wants_usage = wants_usage
        self.write_now = write_now  # writes a body part at once, or declines (False) and writes nothing
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.content_events = 0
        self.written_now = 0  # body parts written in the upstream read that brought them
        self.sent = 0  # body parts the task sent (the end, and an error event, not counted)
        self.usage_seen = False
        self.upstream_error = False
        self.upstream_error_type = ""  # the type the upstream gave its error event, for the log
        self._held: list[bytes] = []  # the reads of an event whose end has not come yet
        self._held_bytes = 0
        self._cr = False  # a read ended in CR: its LF may open the next read (CRLF framing)
        self.done = False  # the upstream said [DONE]: the stream is over, whatever else it sends
        self.ended: str | None = None  # why the relay was cut short: client_gone or revoked
        self._finished = False
        self._sending = False  # the task is in a send: a write now would overtake what it sends
        self._task: asyncio.Task[Any] | None = None

    async def run(self, receive: Any, told: dict[str, Any] | None = None) -> str:
        """Relay until the stream ends; return how: completed, client_gone, revoked or upstream_error.

        The pump runs in the request's own task. The client leaving is heard from the server's
        ``portcullis.disconnect`` extension (``told``: ``config.protocol`` calls ``on_lost`` when the
        connection is lost) or, without it, by one more task listening on ASGI's ``receive``. A cut (client
        gone, token revoked) cancels the pump where it waits, and the upstream response is then closed by
        the caller, so vLLM aborts the generation.
        """
        self._task = asyncio.current_task()
        with DisconnectWatch(told, receive, lambda: self._cut("client_gone")) as lost_already:
            if lost_already:
                self.ended = self.ended or "client_gone"  # gone before the first step: nothing to cancel
            failed = await self._pumped()

        if not self.usage_seen:
            # cut short: charge what the upstream produced (≈1 token an event), sent or not; the caller
            # charges the prompt, which only it can estimate
            self.completion_tokens = self.content_events
        if self.ended == "revoked":
            await self._end_with_error(
                "The access token was revoked.", "authentication_error", "token_revoked"
            )
            return "revoked"
        if self.ended == "client_gone":
            return "client_gone"
        if failed or not (self.done or self.upstream_error):
            # Failed mid-stream, or ended without [DONE], which vLLM sends at the end of every stream: an
            # upstream gone with a FIN on an answer framed by its close, or a chunked one ended between
            # events, had been relayed as a whole stream and recorded as completed
            await self._end(b"" if self.upstream_error else UPSTREAM_FAILED)  # one error event, not two
            return "upstream_error"
        await self.sink.send_body(b"", more_body=False)
        return "upstream_error" if self.upstream_error else "completed"

    async def _pumped(self) -> bool:
        """Pump until the end or a cut; return whether the upstream failed mid-stream."""
        try:
            if self.ended is None:  # revoked before the first byte: nothing is relayed
                await self._pump()
        except asyncio.CancelledError:
            if self.ended is None or self._task is None or self._task.uncancel() > 0:
                raise  # cancelled from outside (the server is shutting down), not by a cut
        except _ClientGone:  # a send failed before the listener heard the disconnect
            if self.ended is None:
                self.ended = "client_gone"
        except Exception:  # the upstream failed mid-stream
            return True
        finally:
            self._finished = True  # a cut from now on has nothing to stop
            self.response.on_data = None
        return False

    def revoked(self) -> None:
        """The token (or its client) was revoked: end the stream with an error event."""
        self._cut("revoked")

    def _cut(self, why: str) -> None:
        if self.ended is None and not self._finished:
            self.ended = why
            if self._task is not None:
                self._task.cancel()

    async def _end_with_error(self, message: str, kind: str, code: str) -> None:
        await self._end(ERROR_EVENT % (message.encode(), kind.encode(), code.encode()))

    async def _end(self, event: bytes) -> None:
        try:
            await self.sink.send_body(event, more_body=False)
        except OSError:
            pass  # the client left at the same moment

    async def _pump(self) -> None:
        response = self.response
        if self.write_now is not None:  # the headers are out: every event, the first too, goes at once
            response.on_data = self._take_now
        while chunk := await response.chunk():
            out = self._events(chunk)
            if out:
                await self._send(out)
        rest = b"".join(self._held)
        if rest.strip() and not (self.upstream_error or self.done):
            await self._send(self._filter(rest))

    def _take_now(self, response: Response) -> bool:
        """Pass on the events a read brought, in that read; False leaves them to the task."""
        write = self.write_now
        if write is None or self._sending or self.ended is not None or not write(b""):
            return False
        out = self._events(response.take())
        if out:
            if not write(out):  # nothing ran since it said yes: a broken promise, not a slow client
                raise RuntimeError("the connection refused a write it had just accepted")
            self.written_now += 1
        return True

    async def _send(self, body: bytes) -> None:
        """Pass events on; a failure here is the client's, never the upstream's."""
        self._sending = True
        self.sent += 1
        try:
            await self.sink.send_body(body, more_body=True)
        except OSError as exc:
            raise _ClientGone() from exc
        finally:
            self._sending = False

    def _events(self, chunk: bytes) -> bytes:
        # SSE may end its lines with CRLF (vLLM writes LF): unsplit, such a stream was held whole until its
        # end, or until it ran past EVENT_MAX_BYTES. A CR is never inside an event's JSON (it is escaped).
        if self._cr or chunk.find(b"\r") >= 0:
            chunk = self._lf(chunk)
            if not chunk:  # a lone CR, kept for the next read: nothing held may be empty (below)
                return b""
        if self._held:  # reads of an event not yet whole: joined once its end comes, not at every read
            if self.upstream_error:
                return b""
            self._held_bytes += len(chunk)
            if self._held_bytes > EVENT_MAX_BYTES:  # no end in sight: an upstream's failure, not memory's
                self._held = []
                self.upstream_error, self.upstream_error_type = True, "event too large"
                return UPSTREAM_FAILED
            if chunk.find(b"\n\n") < 0 and not (chunk[:1] == b"\n" and self._held[-1][-1:] == b"\n"):
                self._held.append(chunk)
                return b""
            chunk, self._held = b"".join(self._held) + chunk, []
        out = []
        start, end = 0, chunk.find(b"\n\n")
        while end >= 0:
            out.append(self._filter(chunk[start : end + 2]))
            start, end = end + 2, chunk.find(b"\n\n", end + 2)
        if start < len(chunk):  # the start of an event: held apart until its end comes
            self._held, self._held_bytes = [chunk[start:]], len(chunk) - start
        return b"".join(out)

    def _lf(self, chunk: bytes) -> bytes:
        """The read with its CRLF line ends made LF; a CR that ends it waits for the next read."""
        if self._cr:
            chunk, self._cr = b"\r" + chunk, False
        if chunk[-1:] == b"\r":
            chunk, self._cr = chunk[:-1], True
        return chunk.replace(b"\r\n", b"\n")

    def _filter(self, event: bytes) -> bytes:
        if self.upstream_error or self.done:
            # after the one error event nothing more: no [DONE], no second error; after [DONE], nothing
            # (an upstream's bug: a client has stopped reading, and it was counted and charged)
            return b""
        if event.startswith(ENDS):
            if event.startswith(DONE_STARTS):
                self.done = True
                return event
            # {"error": {...}}, or an older vLLM's flat {"object": "error"}
            self.upstream_error = True
            self.upstream_error_type = _error_type(event)
            return UPSTREAM_FAILED
        # ``find``, not ``in``: CPython 3.11 first tries a bytes operand of ``in`` as an integer, and formats
        # the TypeError it then drops, some 1,000 instructions a test (bench/README.md, session 22)
        find = event.find
        if find(b'"usage"') >= 0 and find(b'"usage":null') < 0 and find(b'"usage": null') < 0:
            # Only the final, usage-only event counts the whole stream: with continuous_usage_stats every
            # chunk before it carries one choice's running count (one prompt's, in a batch), not read.
            final = event.replace(b" ", b"").find(b'"choices":[]') >= 0
            if final and self._read_usage(event) and not self.wants_usage:
                return b""  # the usage-only event the client did not ask for
        if (
            find(b'"content"') >= 0
            or find(b'"text"') >= 0
            or find(b'"tool_calls"') >= 0
            or find(b'"reasoning"') >= 0  # whole keys: not a running usage's "reasoning_tokens"
            or find(b'"reasoning_content"') >= 0  # an older vLLM's name for it
        ):
            self.content_events += 1  # a token of text, of a tool call's arguments, or of reasoning
        return event

    def _read_usage(self, event: bytes) -> bool:
        try:
            usage = json_parse(event[5:]).get("usage")
        except (ValueError, AttributeError):
            return False
        counts = usage_counts(usage)
        if counts is None:
            return False
        if self.usage_seen:  # vLLM sends one; of an upstream's two, the larger counts are charged
            counts = max(counts[0], self.prompt_tokens), max(counts[1], self.completion_tokens)
        self.prompt_tokens, self.completion_tokens = counts
        self.usage_seen = True
        return True


def usage_counts(usage: Any) -> tuple[int, int] | None:
    """The (prompt, completion) tokens of an OpenAI ``usage`` object, or None when it is not an object. A
    count that is not a number of tokens (text, a negative or infinite number: an upstream's bug) is 0, and
    one past ``TOKEN_COUNT_MAX`` is that."""
    if not isinstance(usage, dict):
        return None
    return _token_count(usage.get("prompt_tokens")), _token_count(usage.get("completion_tokens"))


TOKEN_COUNT_MAX = 2**31 - 1  # what a usage record's column holds; a larger count is an upstream's bug


def _token_count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0
    # capped: a count past 64 bits failed the daily quota's INCRBY, and one past the column lost the record
    return min(TOKEN_COUNT_MAX, max(0, int(value)))


def _error_type(event: bytes) -> str:
    """The ``type`` of an upstream's error event (``{"error": {"type": ...}}``), cut short; "" if none."""
    try:
        document = json.loads(event[5:])
        error = document.get("error", document)  # the flat shape carries its type at the top
    except (ValueError, AttributeError):
        return ""
    kind = error.get("type") if isinstance(error, dict) else None
    return kind[:64] if isinstance(kind, str) else ""
