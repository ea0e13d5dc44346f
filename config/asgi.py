"""The one ASGI application: Channels' ProtocolTypeRouter in front of the gateway and Django.

``/v1/...`` goes straight to the gateway's consumers (no Django middleware on the hot path); the token,
revocation and introspection endpoints to Django's sync handler on a thread pool; everything else to
Django's ASGI handler. ``lifespan`` starts and stops per-process resources: the gateway runtime (HTTP
client, Redis pool, key set, policies) and, with no broker, the embedded beat.
"""

from __future__ import annotations

import gc
import os
from typing import Any

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402  (after Django is set up)
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402

from config.embedded import EmbeddedBeat  # noqa: E402
from config.threadpool import POOLED_PATHS, ThreadPoolDjango  # noqa: E402
from console.routing import websocket_urlpatterns  # noqa: E402
from gateway.routing import gateway_application, is_gateway_path  # noqa: E402
from gateway.runtime import runtime_current, runtime_get, runtime_stop  # noqa: E402

HEALTHZ_BODY = b'{"status":"ok"}'
STARTING_BODY = b'{"status":"starting"}'
oauth_pool = ThreadPoolDjango()  # token, revocation, introspection: see config/threadpool.py


async def healthz(send: Any) -> None:
    """Liveness, answered before Django: no host check, no HTTPS redirect, so any probe can use it."""
    await _probe_answer(send, 200, HEALTHZ_BODY)


async def readyz(send: Any) -> None:
    """Readiness, answered as /healthz is: a 503 while the gateway's runtime has not loaded the signing keys
    and policies once (a process started while PostgreSQL was down: its /v1 answers 503
    ``gateway_not_ready`` meanwhile), a 200 after. Not liveness: a process waiting for its database is not
    one to restart."""
    runtime = runtime_current()
    ready = runtime is None or runtime.ready  # no runtime: lifespan has not started one (nothing to wait for)
    await _probe_answer(send, 200 if ready else 503, HEALTHZ_BODY if ready else STARTING_BODY)


async def _probe_answer(send: Any, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def http(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Route /healthz, /readyz and /v1 to their handlers and the rest to Django."""
    if scope["path"] == "/healthz" and scope["method"] in ("GET", "HEAD"):
        await healthz(send)
    elif scope["path"] == "/readyz" and scope["method"] in ("GET", "HEAD"):
        await readyz(send)
    elif is_gateway_path(scope["path"]):
        await gateway_application(scope, receive, send)
    elif scope["path"] in POOLED_PATHS:
        await oauth_pool(scope, receive, send)
    else:
        await django_asgi_app(scope, receive, send)


# A young collection runs once this many more container objects are alive than at the last one (Python's
# default: 700); full collections are considered after this many gen-1 collections (default: 10).
GC_YOUNG_EVERY = 10_000
GC_FULL_EVERY = 100


def gc_freeze_startup() -> None:
    """Move everything loaded at startup (Django, the apps, the runtime) out of the collector's sight, and
    make collections rarer.

    Measured under 32 concurrent clients, every full collection walked those few hundred thousand
    long-lived objects and stalled the event loop for ~56 ms, ten times in 8 s: the p99 latency was those
    stalls. Frozen, they are never scanned again; what requests allocate is still collected.

    With them frozen, the old generation left is small (~11,000 objects), so Python's rule (a full
    collection once a quarter of it is newly promoted) fired every 0.6 s under 32 clients: 3–4 ms stalls
    that freed nothing (``gc.callbacks``, 2026-11-26: 9 in 5.3 s, 0 objects collected). Examined after 100
    gen-1 collections instead of 10, there was one in the same run.

    Young collections: 32 requests in flight keep more than 700 new objects alive at once, so under 32
    clients a young collection ran ~140 times a second (825 in one run of ``chat_32``: 0.15 s of the
    gateway's CPU, pauses up to 2.3 ms) and found almost nothing to free (182 objects in all): what a
    request allocates is freed by reference counting when it ends. With 10,000 there were 2 in the same
    run (3 ms). Garbage that only a collection can free still counts towards the threshold, so it still
    gets collected.
    """
    gc.collect()
    gc.freeze()
    _young, middle, _old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_EVERY, middle, GC_FULL_EVERY)


async def lifespan(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Handle ASGI lifespan startup and shutdown."""
    beat: EmbeddedBeat | None = None
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await runtime_get()
            except Exception as exc:  # a bad configuration must stop the process at start
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            if not settings.REDIS_URL and settings.PORTCULLIS_EMBEDDED_BEAT:
                beat = EmbeddedBeat()
                beat.start()
            gc_freeze_startup()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if beat is not None:
                beat.stop()
            await runtime_stop()
            await send({"type": "lifespan.shutdown.complete"})
            return


application = ProtocolTypeRouter(
    {
        "http": http,
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
        "lifespan": lifespan,
    }
)
