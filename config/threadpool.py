"""The OAuth endpoints machines call at a high rate, served by Django's sync handler on a fixed thread pool.

Django's ASGI handler gives every request a thread of its own (asgiref's ``ThreadSensitiveContext``) and
hops between it and the event loop for the request signals and the middleware chain. For the token,
revocation and introspection endpoints (small form bodies, small JSON answers, no sessions, no streaming)
that plumbing was a quarter of the CPU per token. Here the body is read on the event loop, the request
runs start to finish on one of a few long-lived threads through Django's WSGI handler (same settings,
same middleware, same signals), and the answer is sent back. Measured on the benchmark's token scenario
(16 clients): about 3.9 ms of server CPU per token through the ASGI handler, 2.7 ms through this one
with 12 threads (2.8 ms with 8, 3.5 ms with 4: more writers waiting means larger audit commit groups).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from asgiref.wsgi import WsgiToAsgiInstance
from django.conf import settings
from django.core.handlers.wsgi import WSGIHandler

from audit.context import request_id_var

logger = logging.getLogger(__name__)

POOLED_PATHS = frozenset({"/oauth/token/", "/oauth/revoke/", "/oauth/introspect/"})
THREADS = 12
SPARE_CONNECTIONS = 4  # left in the database pool for the pages and background jobs

Response = tuple[int, list[tuple[bytes, bytes]], bytes]


def _no_write(data: bytes) -> None:
    raise RuntimeError("the legacy WSGI write() callable is not supported")  # Django never uses it


def rfc_error(status: int, description: str) -> Response:
    """An RFC 6749 §5.2-shaped refusal, for what is refused before Django sees the request."""
    body = json.dumps({"error": "invalid_request", "error_description": description}).encode()
    headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
    return status, headers + [(b"content-length", str(len(body)).encode())], body


def _refusal_audit(scope: dict[str, Any], status: int) -> str:
    """Audit a refusal made before Django saw the request, as the endpoint's view would, in a pool thread;
    return the request id it was recorded with."""
    from django.db import DatabaseError, connections
    from django.urls import resolve

    from audit.context import client_ip_var, request_id_from, scope_client_ip
    from audit.services import audit_record

    ip = scope_client_ip(scope)
    view: Any = resolve(scope["path"]).func  # the audit kind is the endpoint's view's own
    # This request's own id and address: the pool thread's context still holds the last request's, which
    # its middleware set (a refusal was recorded with another client's request id, and its address)
    sent_id = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
    request_id = request_id_from(sent_id)
    tokens = request_id_var.set(request_id), client_ip_var.set(ip)
    try:
        audit_record(
            kind=view.view_class.denied_kind,
            outcome="denied",
            ip=ip,
            data={"error_code": "invalid_request", "status": status},
        )
    except DatabaseError:  # the refusal is still answered; the database's outage shows elsewhere
        logger.exception("could not audit a refusal of %s", scope["path"])
    finally:
        request_id_var.reset(tokens[0])
        client_ip_var.reset(tokens[1])
        connections.close_all()  # this thread's connection goes back, as at the end of a request
    return request_id


class ClientGone(Exception):
    """The client disconnected while its request body was being read."""


def threads_for_pool(database: dict[str, Any] | None = None) -> int:
    """THREADS, or fewer when the database pool (PORTCULLIS_DB_POOL_SIZE) would leave no spare connection."""
    options: dict[str, Any] = (database if database is not None else settings.DATABASES["default"]).get(
        "OPTIONS", {}
    )
    pool = options.get("pool")
    if not isinstance(pool, dict) or "max_size" not in pool:
        return THREADS  # no pool (SQLite): nothing to share
    return max(1, min(THREADS, int(pool["max_size"]) - SPARE_CONNECTIONS))


class ThreadPoolDjango:
    def __init__(self, threads: int | None = None) -> None:
        self.handler = WSGIHandler()
        self.pool = ThreadPoolExecutor(threads or threads_for_pool(), thread_name_prefix="django-oauth")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            body = await self._read_body(scope, receive)
        except ClientGone:
            return  # it left before its request was whole: nothing to run, nobody to answer
        if body is None:
            status, headers, content = rfc_error(413, "The request body is too large.")
            headers.append((b"connection", b"close"))  # not kept open to read and drop the rest
            request_id = await asyncio.get_running_loop().run_in_executor(
                self.pool, _refusal_audit, scope, 413
            )
            headers.append((b"x-request-id", request_id.encode()))
        else:
            status, headers, content = await asyncio.get_running_loop().run_in_executor(
                self.pool, self._respond, scope, body
            )
        # The request ran in a pool thread, whose context the event loop never sees; uvicorn writes its
        # access-log line inside send(), in this task's context: name the request there as Django's did.
        request_id_var.set(next((v.decode("latin-1") for k, v in headers if k == b"x-request-id"), "-"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    @staticmethod
    async def _read_body(scope: dict[str, Any], receive: Any) -> bytes | None:
        """The whole body, or None once it exceeds what Django itself would accept in memory (at once when
        its declared length does)."""
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE or 2_621_440
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    def _respond(self, scope: dict[str, Any], body: bytes) -> Response:
        """Run one request through Django's WSGI handler, in a pool thread."""
        translator = WsgiToAsgiInstance(self.handler)  # asgiref's own scope-to-environ translation
        translator.scope = scope
        try:
            environ = translator.build_environ(scope, io.BytesIO(body))
        except ValueError:  # more than 100 copies of one header
            request_id = _refusal_audit(scope, 400)
            status, headers, content = rfc_error(400, "Too many copies of one header.")
            return status, [*headers, (b"x-request-id", request_id.encode())], content
        environ["CONTENT_LENGTH"] = str(len(body))  # what was read, also for a chunked upload
        started: dict[str, Any] = {}

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None, /
        ) -> Callable[[bytes], object]:
            started["status"] = int(status.split(" ", 1)[0])
            started["headers"] = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
            return _no_write

        result = self.handler(environ, start_response)
        try:
            content = b"".join(result)
        finally:
            result.close()  # request_finished: Django returns the thread's database connection
        return started["status"], started["headers"], content
