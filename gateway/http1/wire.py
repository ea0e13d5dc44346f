"""What the upstream client (``gateway.http1``) writes, and how its calls fail: the errors it raises,
where a URL points (its origin and request target), and a request's head as it goes on the wire.

Request headers must not carry CR, LF or NUL (``ValueError``: a caller's bug).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit

FORBIDDEN_IN_HEADERS = re.compile(b"[\r\n\0]")


class HttpError(Exception):
    """An upstream call failed."""


class ConnectFailed(HttpError, OSError):
    """No connection could be made (refused, unreachable, no such host, TLS failure)."""


class ConnectTimeout(HttpError, TimeoutError):
    """A new connection was not made within ``connect_timeout_s``."""


class PoolTimeout(HttpError, TimeoutError):
    """Every connection of the pool stayed busy for ``pool_wait_s``: the wait was for our own pool."""


class Disconnected(HttpError, ConnectionError):
    """The connection closed before the response was complete."""


class ReadTimeout(HttpError, TimeoutError):
    """The upstream said nothing for ``read_timeout_s`` while a response was awaited."""


class ProtocolError(HttpError):
    """The upstream's answer was not valid HTTP/1.1."""


class ClientClosed(HttpError):
    """The client was closed (the process is shutting down): nothing is said about the upstream."""


class Origin:
    """Where a URL points: scheme, host and port, and the request line's ``Host`` header."""

    __slots__ = ("host", "host_header", "key", "port", "tls")

    def __init__(self, scheme: str, host: str, port: int | None) -> None:
        if scheme not in ("http", "https") or not host:
            raise ValueError(f"not an http(s) URL: {scheme}://{host}")
        self.tls = scheme == "https"
        default = 443 if self.tls else 80
        self.host, self.port = host, port or default
        shown = f"[{host}]" if ":" in host else host
        self.host_header = (shown if self.port == default else f"{shown}:{self.port}").encode("idna")
        self.key = (scheme, host, self.port)


def url_split(url: str) -> tuple[Origin, bytes]:
    """Return the origin and the request target (path and query) of an absolute http(s) URL."""
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Origin(parts.scheme, parts.hostname or "", parts.port), target.encode("ascii")


def request_head(
    method: str, target: bytes, origin: Origin, headers: Iterable[tuple[str, str]], body: bytes
) -> bytes:
    """The request line and headers, ``Host`` and ``Content-Length`` included."""
    lines = [b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (method.encode("ascii"), target, origin.host_header)]
    for name, value in headers:
        line = b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1"))
        if FORBIDDEN_IN_HEADERS.search(line, 0, len(line) - 2):  # one scan (``in`` on bytes is dear)
            raise ValueError(f"the request header {name!r} holds a line break or NUL")
        lines.append(line)
    if body or method != "GET":
        lines.append(b"content-length: %d\r\n" % len(body))
    lines.append(b"\r\n")
    return b"".join(lines)
