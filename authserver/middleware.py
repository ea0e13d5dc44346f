"""Security headers for HTML pages (a strict CSP that also forbids framing), and the sync-chain anchor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponse

CSP = (
    "default-src 'self'; img-src 'self' https: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; form-action 'self' https: http://127.0.0.1:* http://[::1]:*; "
    "frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)


class SecurityHeadersMiddleware:
    """Add CSP (with ``frame-ancestors 'none'``) and Cross-Origin-Opener-Policy to every response."""

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    @staticmethod
    def _decorate(response: HttpResponse) -> HttpResponse:
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
        return response

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self._acall(request)
        return self._decorate(self.get_response(request))

    async def _acall(self, request: HttpRequest) -> HttpResponse:
        return self._decorate(await self.get_response(request))


class SyncChainMiddleware:
    """Keep the middleware chain synchronous under ASGI; it must be the last entry of ``MIDDLEWARE``.

    Every Django view here is synchronous (DOT's among them). Under ASGI, Django runs a middleware in async
    mode whenever the handler below it is async, and an async ``MiddlewareMixin`` hops to a worker thread
    and back for each ``process_request`` and ``process_response``: with the innermost middleware (axes)
    async-capable, the chain did about a dozen thread hops per request and more CPU than the token
    endpoint's own work. Being sync-only and innermost, this middleware makes Django run every middleware
    above it synchronously in the request's thread: the chain, then the view, each entered once.
    """

    sync_capable = True
    async_capable = False

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)
