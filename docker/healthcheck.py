"""Container health check for the Portcullis image: GET a local URL, exit 0 only on HTTP 200.

python:3.11-slim has no curl, so the Dockerfile's HEALTHCHECK and the compose file run this instead:
    python /app/docker/healthcheck.py [URL]        (default http://127.0.0.1:8000/healthz)

The application answers ``GET /healthz`` itself, before Django: no host check and no HTTPS redirect. So the
probe is a plain GET with no Host from DJANGO_ALLOWED_HOSTS and no X-Forwarded-Proto (uvicorn runs with
``--no-proxy-headers`` and would ignore it anyway). Anything but 200 fails the check, and a redirect is never
followed: it means the check is wrong, and the check must fail rather than go elsewhere. The timeout is
shorter than the HEALTHCHECK's, so a hung server is reported as such.

When uvicorn serves TLS itself (UVICORN_SSL_CERTFILE is set), requests to port 8000 use https and trust
exactly the certificate uvicorn was given, whatever name it carries: the probe only ever talks to itself.
"""

from __future__ import annotations

import http.client
import os
import ssl
import sys
from urllib.parse import urlsplit

DEFAULT_URL = "http://127.0.0.1:8000/healthz"
APP_PORT = 8000
TIMEOUT_S = 4.0  # under the HEALTHCHECK --timeout of 5 s, so a hung server is reported as such


def connection_for(url: str) -> tuple[http.client.HTTPConnection, str]:
    """Open a connection for the URL (https on the app port when uvicorn serves TLS) and return its path."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    certfile = os.environ.get("UVICORN_SSL_CERTFILE", "")
    if parts.scheme == "https" or (certfile and port == APP_PORT):
        context = ssl.create_default_context(cafile=certfile or None)
        if certfile:
            # Trust the served certificate itself (a leaf will do), not the name on it: we dial 127.0.0.1.
            context.check_hostname = False
            context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        return http.client.HTTPSConnection(host, port, timeout=TIMEOUT_S, context=context), path
    return http.client.HTTPConnection(host, port, timeout=TIMEOUT_S), path


def main(argv: list[str]) -> int:
    """Probe the URL once; return the process exit status (0 healthy, 1 not)."""
    url = argv[0] if argv else DEFAULT_URL
    try:
        connection, path = connection_for(url)
        try:
            connection.request("GET", path)
            status = connection.getresponse().status
        finally:
            connection.close()
    except (OSError, http.client.HTTPException) as exc:
        sys.stderr.write(f"healthcheck: {url} did not answer: {exc}\n")
        return 1
    if status != 200:
        sys.stderr.write(f"healthcheck: {url} answered HTTP {status}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
