"""What every /v1 consumer shares, async end to end, with no Django middleware on the path.

``GatewayConsumer`` replaces ``AsyncHttpConsumer.__call__``: it reads the body itself (refusing an
oversized one while reading, and one that has not arrived by its deadline), skips the channel layer and
the per-message ``close_old_connections`` thread hop (nothing here touches the database), and hears the
client leave while it waits for the upstream or relays a stream (channels#1249: ``handle()`` is otherwise
never told): from the served protocol's ``portcullis.disconnect`` extension (``config.protocol``) or,
under another server, from ASGI's ``receive``. Every failure is a ``GatewayError`` rendered in one place
as an OpenAI-shaped error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable
from typing import Any, ClassVar, TypeVar

from channels.generic.http import AsyncHttpConsumer

from audit.context import client_ip_resolve, ip_in_networks, request_id_from, request_id_var, trusted_networks
from gateway import errors
from gateway.auth import Principal
from gateway.deadlines import Deadlines
from gateway.metrics import METERING_BACKLOG, request_observe
from gateway.ratelimit import HEADER_NAMES
from gateway.runtime import Runtime, runtime_get
from gateway.streaming import DisconnectWatch

logger = logging.getLogger(__name__)
T = TypeVar("T")

SCOPE_FOR = {
    "chat": "completions",
    "completions": "completions",
    "embeddings": "embeddings",
    "models": "models.read",
}
# Headers a request may carry once: with two, a proxy that reads the first and the gateway (whose header
# dict keeps the last) would judge different requests.
# sent twice, the last one alone was read: "gzip" then "identity" passed a compressed body as plain
SINGLE_HEADERS = (b"authorization", b"content-type", b"content-encoding")
# CORS (the Fetch standard): what a page's script may read of an answer besides the CORS-safelisted headers,
# and how long a browser may keep a preflight's answer (600 s is Chromium's cap; Firefox keeps a day)
CORS_EXPOSED = b", ".join(
    [b"x-request-id", b"retry-after", *(name.encode() for _dim, names in HEADER_NAMES for name in names)]
)
PREFLIGHT_MAX_AGE = b"600"
PREFLIGHT_HEADERS_MAX = 2048  # a longer Access-Control-Request-Headers is refused (a browser sends dozens)


class ClientDisconnected(Exception):
    """The client went away while its request was being read."""


class ClientGone(Exception):
    """The client went away while the gateway waited for the upstream's whole answer."""


class RevokedMeanwhile(Exception):
    """The token (or its client) was revoked while the gateway waited for the upstream's whole answer."""


# a body read is cut at most a quarter of a second after its deadline
BODY_DEADLINES: Deadlines[GatewayConsumer] = Deadlines(sweep_s=0.25)


class GatewayConsumer(AsyncHttpConsumer):
    kind: ClassVar[str] = ""
    methods: ClassVar[frozenset[str]] = frozenset({"POST"})
    preflights: ClassVar[bool] = True  # a CORS preflight is answered (not on a path that is no endpoint)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scope, self._receive, self.base_send = scope, receive, send
        self.started = time.perf_counter()
        self.headers: dict[bytes, bytes] = dict(scope["headers"])
        self.repeated_headers = len(self.headers) != len(scope["headers"])  # a name repeats: rare
        self.request_id = request_id_from(self.headers.get(b"x-request-id", b"").decode("latin-1"))
        request_id_var.set(self.request_id)  # this task's log lines (uvicorn's access line too) carry it
        self.principal: Principal | None = None
        self.record: dict[str, Any] = {"endpoint": self.kind, "model": "", "stream": False, "upstream": ""}
        self.response_started = False
        self.unrecorded = False  # refused because the audit log is full: counted there, not recorded here
        self.origin: bytes | None = self.headers.get(b"origin")  # a browser's page calling (CORS)
        self.cors_origin: bytes | None = None  # that origin, when a client lists it: the answers say so
        self._task: asyncio.Task[Any] | None = None
        self._body_late = False
        self._body_read = False
        status = 500
        try:
            self.rt = await runtime_get()
            self.client_ip = self._client_ip()
            if self.origin is not None and self.rt.policies.origin_listed(self.origin):
                self.cors_origin = self.origin
            status = await self._dispatch()
        except errors.GatewayError as exc:
            status = exc.status
            if isinstance(exc, errors.RateLimited):
                self.record["limit"] = exc.code
            await self._deny(exc)
        except ClientDisconnected:
            status = 499  # the client left before sending its whole request
        except Exception:  # a bug, never attacker input; the client still gets a well-formed error
            logger.exception("gateway request %s failed", self.request_id)
            await self._deny(errors.GatewayError())
        finally:
            self._usage(status)

    async def _dispatch(self) -> int:
        if self.rt.audit_full():
            self.unrecorded = True
            raise errors.AuditBacklogFull()
        preflight = (
            self.preflights
            and self.scope["method"] == "OPTIONS"
            and b"access-control-request-method" in self.headers
        )
        if self.scope["method"] not in self.methods and not preflight:
            raise self._method_refused()
        self.rt.check_ip_denylist(self.client_ip)
        if self.rt.conf.require_https and not self._secure():
            raise errors.HttpsRequired()
        if self.repeated_headers:  # looked at only then
            self._refuse_repeated_headers()
        if preflight:
            return await self._preflight()
        return await self.handle(await self._read_body())

    def _method_refused(self) -> errors.MethodNotAllowed:
        refused = errors.MethodNotAllowed()
        refused.headers["allow"] = ", ".join(sorted(self.methods))  # RFC 9110 §15.5.6
        return refused

    async def _preflight(self) -> int:
        """Answer a browser's CORS preflight (the Fetch standard's ``OPTIONS`` with
        ``Access-Control-Request-Method``), which carries no token: a page of an origin some client lists
        (``allowed_origins``) may send the method and the headers it asks for (Authorization among them;
        the ``openai`` SDK adds its own ``x-stainless-*`` ones, so they are not a fixed list). Which
        client's token follows is judged with the request itself: a page of an origin its client does not
        list is refused then (``authenticate``). A page of an origin no client lists gets a 403 without
        CORS headers, which the browser turns into a network error for the script. A process that has not
        loaded the policies (nor, with them, the origins) since it started answers 503, not that refusal."""
        if not self.rt.ready:
            await self.rt.ready_wait()
        if self.cors_origin is None:
            raise errors.OriginNotAllowed("No client of this gateway lists this web page's origin.")
        method = self.headers[b"access-control-request-method"]
        if method.decode("latin-1") not in self.methods:
            raise self._method_refused()
        asked = self.headers.get(b"access-control-request-headers", b"")
        names = [name.strip() for name in asked.split(b",") if name.strip()]
        if len(asked) > PREFLIGHT_HEADERS_MAX or not all(_token(name) for name in names):
            raise errors.InvalidRequest(
                "Access-Control-Request-Headers must be a list of header names.",
                param="access-control-request-headers",
            )
        headers = self._cors_headers()
        headers += [
            (b"access-control-allow-methods", ", ".join(sorted(self.methods)).encode()),
            (b"access-control-max-age", PREFLIGHT_MAX_AGE),
        ]
        if names:
            headers.append((b"access-control-allow-headers", b", ".join(names).lower()))
        if self._body_unread():
            headers.append((b"connection", b"close"))
        self.record["outcome"] = "preflight"
        self.response_started = True
        await self.send_response(204, b"", headers=headers)
        return 204

    def _refuse_repeated_headers(self) -> None:
        names = [name for name, _value in self.scope["headers"]]
        for name in SINGLE_HEADERS:
            if names.count(name) > 1:
                raise errors.InvalidRequest(
                    f"The {name.decode()} header must be sent once.", param=name.decode()
                )

    def _secure(self) -> bool:
        """Whether the client's connection was TLS: this one, or the one a trusted proxy says it took
        (the first value of X-Forwarded-Proto, as Django reads ``SECURE_PROXY_SSL_HEADER``)."""
        if self.scope.get("scheme") == "https":
            return True
        proto = self._header_list(b"x-forwarded-proto")
        if proto is None:
            return False
        peer = (self.scope.get("client") or (None, None))[0]
        return proto.split(b",", 1)[0].strip().lower() == b"https" and ip_in_networks(
            peer, trusted_networks(self.rt.trusted_proxies)
        )

    def _header_list(self, name: bytes) -> bytes | None:
        """A header's value, its several lines joined as one list in order (RFC 9110 §5.3), as Django's side
        reads them: a chain of trusted proxies that each added a line is read whole, not cut at the last."""
        value = self.headers.get(name)
        if value is not None and self.repeated_headers:
            value = b",".join(v for header, v in self.scope["headers"] if header == name)
        return value

    def _client_ip(self) -> str | None:
        peer = self.scope.get("client") or (None, None)
        forwarded = self._header_list(b"x-forwarded-for")
        return client_ip_resolve(
            peer[0],
            forwarded.decode("latin-1") if forwarded else None,
            trusted_networks(self.rt.trusted_proxies),
        )

    async def _read_body(self) -> bytes:
        limit = self.rt.conf.max_body_bytes
        declared = self.headers.get(b"content-length")
        if declared is not None:  # httptools keeps the optional whitespace after a value (RFC 9110 §5.6.3)
            declared = declared.strip(b" \t")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise errors.BodyTooLarge(param="body")
        # One deadline for the whole body, not one per read: a byte now and then must not hold the
        # connection and this consumer for ever (slowloris). Slow headers are the server's business.
        self._task = asyncio.current_task()
        BODY_DEADLINES.add(self, time.monotonic() + self.rt.conf.body_read_timeout_s)
        chunks, size, more = [], 0, True
        try:
            while more:
                message = await self._receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnected()
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise errors.BodyTooLarge(param="body")  # refused while reading, not after
                chunks.append(chunk)
                more = message.get("more_body", False)
        except asyncio.CancelledError:
            if not self._body_late or (self._task is not None and self._task.uncancel() > 0):
                raise  # cancelled by someone else (the server shutting down) too
            raise errors.RequestTimeout(param="body") from None
        finally:
            BODY_DEADLINES.remove(self)
        self._body_read = True
        return b"".join(chunks)

    async def _unless_cut(self, work: Awaitable[T]) -> T:
        """Await ``work``, cut as soon as the client disconnects (``ClientGone``) or the token or its client
        is revoked (``RevokedMeanwhile``), whichever comes first. A client that left must not keep vLLM
        generating an answer nobody will read, nor hold its concurrency slot meanwhile; a whole answer must
        not reach a client whose token was revoked while vLLM wrote it (a long one takes minutes), as a
        stream is cut then too.

        The server's ``portcullis.disconnect`` extension (``config.protocol``) calls back when the connection
        is lost; without it a task listens on ``receive`` for ``http.disconnect``, as ASGI provides. The
        revocation watcher calls back on a push or a catch-up; nothing is polled."""
        assert self.principal is not None  # noqa: S101  (authenticate ran)
        task = asyncio.current_task()
        assert task is not None  # noqa: S101  (called from a coroutine)
        why: type[Exception] | None = None

        def lost() -> None:
            nonlocal why
            if why is None:
                why = ClientGone
                task.cancel()

        def revoked() -> None:
            nonlocal why
            if why is None:
                why = RevokedMeanwhile
                task.cancel()

        told = (self.scope.get("extensions") or {}).get("portcullis.disconnect")
        with (
            DisconnectWatch(told, self._receive, lost) as lost_already,
            self.rt.watcher.watch(self.principal, revoked),
        ):
            if lost_already:
                lost()  # the wait below is cut at once
            try:
                return await work
            except asyncio.CancelledError:
                if why is not None and task.uncancel() == 0:
                    raise why() from None
                raise  # cancelled by someone else (the server shutting down) too

    def late(self) -> None:
        """Cut this request's body read: its deadline has passed."""
        self._body_late = True
        if self._task is not None:
            self._task.cancel()

    # --- authentication and policy ------------------------------------------------------------------

    async def authenticate(self, scope_needed: str) -> Principal:
        """Verify the bearer token and its scope; return the principal."""
        if self.scope.get("query_string", b"").find(b"access_token=") >= 0:  # ``find``: see gateway.streaming
            raise errors.InvalidRequest(
                "Access tokens are not accepted in the query string.", param="access_token"
            )
        raw = self.headers.get(b"authorization")
        if raw is None:
            raise errors.MissingCredentials()
        scheme, _, token = raw.decode("latin-1").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise errors.AuthenticationError("The Authorization header must be 'Bearer <token>'.")
        if not self.rt.ready:  # no key set loaded since start: a 503, not "signed by an unknown key"
            await self.rt.ready_wait()
        principal = await self.rt.verifier.verify(token.strip())
        self.principal = principal
        if self.rt.watcher.is_revoked(principal):
            raise errors.AuthenticationError("The access token has been revoked.")
        if scope_needed not in principal.scopes:
            exc = errors.PermissionDenied(f"This endpoint needs the '{scope_needed}' scope.")
            exc.headers["www-authenticate"] = (
                f'Bearer realm="portcullis", error="insufficient_scope", scope="{scope_needed}"'
            )
            raise exc
        self.rt.check_ip_allowlist(principal, self.client_ip)
        if self.cors_origin is not None and not self.rt.policies.origin_allowed(
            principal.client_id, self.cors_origin
        ):
            # A browser sends Origin with every cross-origin request, and a page's request follows a preflight
            # that passes only for an origin some client lists: a page of another client's origin holds this
            # token (taken from its client, or a server's secret put in a page). An origin no client lists
            # is no page that passed a preflight (a browser extension, a desktop app, a script): served, and
            # a browser page of it could not read the answer.
            raise errors.OriginNotAllowed()
        return principal

    # --- responses ------------------------------------------------------------------------------------

    def _base_headers(self, content_type: bytes) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", content_type), (b"x-request-id", self.request_id.encode())]
        if self.cors_origin is not None:
            headers += self._cors_headers()
            headers.append((b"access-control-expose-headers", CORS_EXPOSED))
        elif self.origin is not None:
            headers.append((b"vary", b"Origin"))  # another origin's request may be answered otherwise
        return headers

    def _cors_headers(self) -> list[tuple[bytes, bytes]]:
        """The page's origin, which a client lists, may read this answer (no cookies are involved: no
        ``Allow-Credentials``). Every answer to it says so, errors too, so that a page can read a 401 (and
        refresh its token) or a 429 (and wait)."""
        assert self.cors_origin is not None  # noqa: S101  (set only for a listed origin)
        return [(b"access-control-allow-origin", self.cors_origin), (b"vary", b"Origin")]

    async def send_json(self, status: int, body: bytes, extra: dict[str, str] | None = None) -> None:
        headers = self._base_headers(b"application/json")
        headers.append((b"content-length", str(len(body)).encode()))
        headers.extend((k.encode(), v.encode()) for k, v in (extra or {}).items())
        self.response_started = True
        await self.send_response(status, body, headers=headers)

    async def _deny(self, exc: errors.GatewayError) -> None:
        self.record.setdefault("outcome", f"denied:{exc.code}")
        if 400 <= exc.status < 500:
            self._audit_denial(exc)
        if self.response_started:
            return
        body = json.dumps(
            {"error": {"message": exc.detail, "type": exc.type, "param": exc.param, "code": exc.code}}
        ).encode()
        extra = dict(exc.headers)
        if self._body_unread():  # refused before it was read: 405, https_required, a denied address, ...
            extra.setdefault("connection", "close")
        if exc.status == 401 and "www-authenticate" not in extra:
            extra["www-authenticate"] = self._challenge(exc)
        if isinstance(exc, errors.PermissionDenied) and "www-authenticate" not in extra:
            extra["www-authenticate"] = (
                f'Bearer realm="portcullis", error="insufficient_scope", error_description="{exc.code}"'
            )
        await self.send_json(exc.status, body, extra)

    def _body_unread(self) -> bool:
        """Whether a body was declared and is answered unread (a refusal before it, a preflight): uvicorn
        drops what arrives after the answer but sets no timer while it does, so a client sending a byte now
        and then would hold the connection for ever. Such answers close it."""
        return not self._body_read and self._body_declared()

    def _body_declared(self) -> bool:
        """Whether the request says a body follows (a Content-Length other than 0, or chunked)."""
        length = self.headers.get(b"content-length")
        return (
            length is not None and length.strip() not in (b"", b"0")
        ) or b"transfer-encoding" in self.headers

    def _challenge(self, exc: errors.GatewayError) -> str:
        base = 'Bearer realm="portcullis"'
        metadata = getattr(getattr(self, "rt", None), "resource_metadata_url", "")
        if metadata:
            base += f', resource_metadata="{metadata}"'
        if isinstance(exc, errors.MissingCredentials):
            return base  # RFC 6750 §3.1: no error code when no credentials were sent
        return base + ', error="invalid_token"'

    def _audit_denial(self, exc: errors.GatewayError) -> None:
        if not hasattr(self, "rt"):
            return
        self.rt.sink.event(
            {
                "kind": "gateway.denied",
                "outcome": "denied",
                "actor": f"client:{self.principal.client_id}" if self.principal else "anonymous",
                "client_id": self.principal.client_id if self.principal else "",
                "ip": self.client_ip,
                "request_id": self.request_id,
                "data": {"reason": exc.code, "status": exc.status, "endpoint": self.kind},
            }
        )

    def _usage(self, status: int) -> None:
        rt: Runtime | None = getattr(self, "rt", None)
        if rt is None:
            return
        record = self.record
        record.update(
            record_id=os.urandom(16).hex(),
            request_id=self.request_id,
            occurred_at=time.time(),
            client_id=self.principal.client_id if self.principal else "",
            token_id=self.principal.jti if self.principal else "",
            user=(self.principal.user or "") if self.principal else "",
            status=status,
            client_ip=getattr(self, "client_ip", None),
        )
        record.setdefault(
            "gateway_ms", round((time.perf_counter() - self.started) * 1000 - record.get("upstream_ms", 0), 3)
        )
        record.setdefault("outcome", "completed" if status < 400 else f"denied:{status}")
        if not self.unrecorded:
            rt.sink.usage(record)
        request_observe(record, rt.upstreams.known_models())
        METERING_BACKLOG.set(rt.sink.backlog)


def _token(name: bytes) -> bool:
    """Whether a header name is an RFC 9110 token (visible ASCII but delimiters)."""
    return bool(name) and all(c in TCHARS for c in name)


TCHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
