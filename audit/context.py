"""The request context every audit record and log line carries: a request id and the true client IP.

The client IP is the socket peer unless that peer is a trusted proxy (``PORTCULLIS_TRUSTED_PROXIES``);
then ``X-Forwarded-For`` is walked from the right, skipping trusted proxies, so a client cannot choose its
own address by sending the header itself.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from contextvars import ContextVar
from functools import lru_cache
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.http import HttpRequest, HttpResponse

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")
client_ip_var: ContextVar[str | None] = ContextVar("client_ip", default=None)
request_var: ContextVar[HttpRequest | None] = ContextVar("request", default=None)
# Set on a request (``request_var``'s) made with a user's delegated token by the app holding it: the client
# id of that app, which every audit record of the request names as ``via_client`` (``audit_record``)
VIA_CLIENT_ATTR = "portcullis_via_client"

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{8,64}$")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=8)
def trusted_networks(cidrs: tuple[str, ...]) -> tuple[Network, ...]:
    """Parse the trusted proxy CIDRs once."""
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


def _parse_ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    value = value.strip()
    if value.startswith("[") and "]" in value:
        value = value[1 : value.index("]")]
    try:
        address = ipaddress.ip_address(value.split("%", 1)[0])  # an IPv6 zone names a local link: no client's
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack listener's IPv4 client: IPv4 networks must match it
    return address


def ip_in_networks(
    ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address | None, nets: Iterable[Network]
) -> bool:
    """Return whether an address (or its text) lies in any of the networks; None or garbage is in none."""
    address = _parse_ip(ip) if isinstance(ip, str) else ip
    return address is not None and any(address in net for net in nets)


@lru_cache(maxsize=1024)
def _peer_parse(value: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address | None, str | None]:
    """The socket peer's address and its text: the same few short strings on every request, parsed once.

    Only the peer is cached: ``X-Forwarded-For`` is the client's own text, unbounded in size.
    """
    address = _parse_ip(value)
    return address, None if address is None else str(address)


def client_ip_resolve(peer: str | None, forwarded_for: str | None, trusted: Iterable[Network]) -> str | None:
    """Return the client IP: the peer, or the first untrusted hop of X-Forwarded-For seen from the right."""
    nets = tuple(trusted)
    current, text = _peer_parse(peer or "")
    if current is None:
        return None
    if not forwarded_for or not ip_in_networks(current, nets):
        return text
    for hop in reversed(forwarded_for.split(",")):
        address = _parse_ip(hop)
        if address is None:
            return str(current)  # a malformed hop ends the walk at the last address we could trust
        current = address
        if not ip_in_networks(current, nets):
            return str(current)
    return str(current)


def request_id_from(header: str | None) -> str:
    """Keep a well-formed client request id, else make a new one."""
    if header and _REQUEST_ID_RE.match(header):
        return header
    return os.urandom(16).hex()  # 128 random bits, as uuid4().hex but without building a UUID


def scope_client_ip(scope: Mapping[str, Any]) -> str | None:
    """The client IP of an ASGI request, outside Django's request handling: the peer, or the first
    untrusted hop of X-Forwarded-For, whose several lines are one list in order, as Django reads them."""
    forwarded = b",".join(v for name, v in scope.get("headers") or [] if name == b"x-forwarded-for")
    return client_ip_resolve(
        (scope.get("client") or (None,))[0],
        forwarded.decode("latin-1") or None,
        trusted_networks(tuple(settings.PORTCULLIS_TRUSTED_PROXIES)),
    )


def _request_client_ip(request: HttpRequest) -> str | None:
    nets = trusted_networks(tuple(settings.PORTCULLIS_TRUSTED_PROXIES))
    return client_ip_resolve(request.META.get("REMOTE_ADDR"), request.META.get("HTTP_X_FORWARDED_FOR"), nets)


def axes_client_ip(request: HttpRequest) -> str | None:
    """django-axes hook: lock out by the same true client IP the audit log records."""
    return getattr(request, "client_ip", None) or _request_client_ip(request)


class RequestContextMiddleware:
    """Attach ``request.request_id`` and ``request.client_ip``; echo ``X-Request-ID``."""

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def _enter(self, request: HttpRequest) -> None:
        nets = trusted_networks(tuple(settings.PORTCULLIS_TRUSTED_PROXIES))
        if not ip_in_networks(request.META.get("REMOTE_ADDR", ""), nets):
            # Only a trusted proxy may say the original scheme was https (SECURE_PROXY_SSL_HEADER).
            request.META.pop("HTTP_X_FORWARDED_PROTO", None)
        request.request_id = request_id_from(request.META.get("HTTP_X_REQUEST_ID"))  # type: ignore[attr-defined]
        request.client_ip = _request_client_ip(request)  # type: ignore[attr-defined]
        request_id_var.set(request.request_id)  # type: ignore[attr-defined]
        client_ip_var.set(request.client_ip)  # type: ignore[attr-defined]

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self._acall(request)
        self._enter(request)
        serving = request_var.set(request)
        try:
            response: HttpResponse = self.get_response(request)
        finally:
            request_var.reset(serving)  # a thread serves one request after another: no actor outlives its own
        response["X-Request-ID"] = request.request_id  # type: ignore[attr-defined]
        return response

    async def _acall(self, request: HttpRequest) -> HttpResponse:
        self._enter(request)
        serving = request_var.set(request)
        try:
            response: HttpResponse = await self.get_response(request)
        finally:
            request_var.reset(serving)
        response["X-Request-ID"] = request.request_id  # type: ignore[attr-defined]
        return response


# The device pages carry the user code in their path: /oauth/device/{confirm,status}/<client id>/<user code>/
_USER_CODE_IN_PATH = re.compile(r"(/device/(?:confirm|status)/[^/?]*/)[^/?]+")


def path_redact(path: str) -> str:
    """A request path fit for a log line: no query string (codes, user codes, a stray token) and no user
    code in the device pages' paths."""
    if "?" in path:
        path = path.split("?", 1)[0] + "?[redacted]"
    return _USER_CODE_IN_PATH.sub(r"\1[redacted]", path) if "/device/" in path else path


class AccessLogRedactFilter(logging.Filter):
    """Redact request paths (``path_redact``) in uvicorn's access log and in Django's request warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        # Whichever argument is a path: uvicorn puts it third, Django's messages first or second.
        if isinstance(record.args, tuple):
            record.args = tuple(
                path_redact(a) if isinstance(a, str) and a.startswith("/") else a for a in record.args
            )
        return True


def json_log_formatter() -> logging.Formatter:
    """One JSON object per log line (structlog), carrying the request id."""
    import structlog

    def request_id(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        record = event.get("_record")
        event["request_id"] = getattr(record, "request_id", request_id_var.get())
        return event

    return structlog.stdlib.ProcessorFormatter(
        processor=structlog.processors.JSONRenderer(),
        foreign_pre_chain=[
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            request_id,
            structlog.processors.format_exc_info,
        ],
    )


class RequestContextLogFilter(logging.Filter):
    """Add ``request_id`` to every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True
