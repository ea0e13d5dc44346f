"""The dashboard's live feed: a WebSocket that pushes traffic figures every 2 s to staff users.

Figures come from usage records in the database (``audit.selectors.usage_live_figures``), read off the
gateway's hot path; upstream health is probed from here every few seconds with short timeouts.

The handshake must come from a page of this site: its ``Origin`` must be this server's own origin
(scheme, host and port) or one of ``CSRF_TRUSTED_ORIGINS``, as Django's CSRF check requires of a form
post. Channels' ``AllowedHostsOriginValidator`` in front compares the host alone, so a page on another
port or over plain http of an allowed host (same-site: the session cookie goes with the handshake)
would pass it.

Who may read is checked when the socket opens and again before every push, from the session store and
the user table as they are then: a user who signs out, is locked or loses staff stops getting figures
within one interval (the socket closes with 4403), as their next page load would refuse them.

The figures are the same for everyone, so they are computed at most once per interval in a process and
every socket sends that one result (``LiveFeed``); only the access check is each socket's own. A user
may hold ``LiveConsumer.max_sockets_per_user`` sockets at once in a process; one more is refused at the
handshake (4403, as any other refusal).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import weakref
from collections import Counter
from importlib import import_module
from typing import Any
from urllib.parse import urlsplit

import httpx
from channels.auth import get_user
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.contrib.auth import get_user_model

from audit.context import ip_in_networks, trusted_networks
from audit.selectors import usage_live_figures
from console.access import can_read

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 1.0  # a dead upstream must not hold up the feed
HEALTH_EVERY_S = 10.0
CLOSE_FORBIDDEN = 4403  # an application close code (RFC 6455 §7.4.2): 4000 + HTTP 403


def _origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def origin_allowed(scope: dict[str, Any]) -> bool:
    """Return whether the handshake's one ``Origin`` is this server's own origin or a trusted one."""
    headers: dict[bytes, list[bytes]] = {}
    for name, value in scope.get("headers", []):
        headers.setdefault(name.lower(), []).append(value)
    origins, hosts = headers.get(b"origin", []), headers.get(b"host", [])
    if len(origins) != 1 or len(hosts) != 1:
        return False
    origin = origins[0].decode("latin-1").lower()
    secure = scope.get("scheme") in ("wss", "https")
    peer = (scope.get("client") or [None])[0]
    if not secure and ip_in_networks(peer, trusted_networks(tuple(settings.PORTCULLIS_TRUSTED_PROXIES))):
        # Only a trusted TLS-terminating proxy may say the browser used https (as SECURE_PROXY_SSL_HEADER).
        secure = headers.get(b"x-forwarded-proto") == [b"https"]
    own = f"{'https' if secure else 'http'}://{hosts[0].decode('latin-1')}".lower()
    return origin == own or origin in {_origin_of(url) for url in settings.CSRF_TRUSTED_ORIGINS}


async def user_now(scope: dict[str, Any]) -> Any:
    """Return the user behind a socket as things stand now, not as they were when it opened.

    The session is read afresh from its store (a sign-out deletes it; a password change invalidates its
    hash) and the user row with it (locked or no longer staff). A scope without a session (a consumer
    mounted without the session middleware) has its user row read again.
    """
    session = scope.get("session")
    if session is not None:
        store = import_module(settings.SESSION_ENGINE).SessionStore(session_key=session.session_key)
        return await get_user({"session": store})
    user = scope.get("user")
    if user is None or not user.is_authenticated:
        return None
    return await get_user_model()._default_manager.filter(pk=user.pk).afirst()


async def upstreams_health(upstreams: list[str]) -> list[dict[str, Any]]:
    """Probe each upstream's ``/health`` once, concurrently; report which answered 200."""

    async def probe(client: httpx.AsyncClient, base: str) -> dict[str, Any]:
        try:
            response = await client.get(f"{base.rstrip('/')}/health")
        except httpx.HTTPError:
            return {"url": base, "healthy": False}
        return {"url": base, "healthy": response.status_code == 200}

    async with httpx.AsyncClient(timeout=HEALTH_TIMEOUT_S) as client:
        return list(await asyncio.gather(*(probe(client, base) for base in upstreams)))


class LiveFeed:
    """What every feed socket of one event loop shares: the figures last computed, and how many sockets
    each user holds open.

    Each socket asks for the figures once per interval. The first to find them as old as the interval
    computes them holding the lock, so the sockets asking meanwhile wait for that result rather than run
    the same aggregate again each on asgiref's one database thread; the others take them as they are. A
    socket cancelled while it computes releases the lock, and the next to ask computes.
    """

    def __init__(self) -> None:
        self.sockets: Counter[Any] = Counter()
        self._lock = asyncio.Lock()
        self._text = ""
        self._computed_at = -math.inf
        self._upstreams: list[dict[str, Any]] | None = None
        self._probed_at = -math.inf

    def socket_open(self, user_pk: Any, *, limit: int) -> bool:
        """Count one more socket of this user, unless they hold ``limit`` already."""
        if self.sockets[user_pk] >= limit:
            return False
        self.sockets[user_pk] += 1
        return True

    def socket_close(self, user_pk: Any) -> None:
        """Count one socket of this user fewer."""
        self.sockets[user_pk] -= 1
        if self.sockets[user_pk] <= 0:
            del self.sockets[user_pk]

    async def figures_json(self, *, window_s: float, max_age_s: float) -> str:
        """Return the figures as JSON, computed afresh only if those held are ``max_age_s`` old."""
        async with self._lock:
            if time.monotonic() - self._computed_at >= max_age_s:
                self._text = await self._compute(window_s)
                self._computed_at = time.monotonic()
            return self._text

    async def _compute(self, window_s: float) -> str:
        figures = await database_sync_to_async(usage_live_figures)(window_s=window_s)
        upstreams: list[str] = list(settings.GATEWAY["UPSTREAMS"])  # type: ignore[call-overload]
        if upstreams:
            if time.monotonic() - self._probed_at >= HEALTH_EVERY_S:
                self._upstreams = await upstreams_health(upstreams)
                self._probed_at = time.monotonic()
            figures["upstreams"] = self._upstreams  # the last probe's, so a socket opened since has it too
        return json.dumps(figures)


# One LiveFeed per event loop, as its lock belongs to one: a server process runs one loop; each
# asyncio.run (a test's) is a loop of its own, and its feed goes with it.
_feeds: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LiveFeed] = weakref.WeakKeyDictionary()


def live_feed() -> LiveFeed:
    """Return the feed shared by every socket of the running event loop."""
    loop = asyncio.get_running_loop()
    feed = _feeds.get(loop)
    if feed is None:
        feed = _feeds[loop] = LiveFeed()
    return feed


class LiveConsumer(AsyncWebsocketConsumer):
    """Push ``{requests_per_s, tokens_per_s, errors, denials, active_streams}`` every ``interval_s``."""

    interval_s = 2.0
    window_s = 10.0
    # A few dashboard tabs per admin, with room for reloads; more is a script or a leak, and each socket
    # costs an access check on the database thread every interval.
    max_sockets_per_user = 5
    # No channel layer, whatever CHANNEL_LAYERS says: nothing sends to a feed socket. With one, Channels
    # gives each socket a channel and keeps a receive on it open for the socket's life (channels_redis: a
    # BZPOPMIN of 5 s, which redis-py's default 5 s socket timeout cut, killing the feed after 5 s).
    # get_channel_layer(None) is None: no alias is named None.
    channel_layer_alias = None
    pusher: asyncio.Task[None] | None = None
    user_pk: Any = None  # whose socket this is, once counted

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._leave()  # however the socket ends: a disconnect, or the server cancelling it

    async def connect(self) -> None:
        user = self.scope.get("user")
        if not origin_allowed(self.scope) or not can_read(user):
            await self.close(code=CLOSE_FORBIDDEN)
            return
        if not live_feed().socket_open(user.pk, limit=self.max_sockets_per_user):
            logger.warning(
                "console live feed: user %s already holds %s sockets; one more refused",
                user.pk,
                self.max_sockets_per_user,
            )
            await self.close(code=CLOSE_FORBIDDEN)
            return
        self.user_pk = user.pk
        await self.accept()
        self.pusher = asyncio.create_task(self.push_forever())

    async def disconnect(self, code: int) -> None:
        pusher = self._leave()
        if pusher is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await pusher

    def _leave(self) -> asyncio.Task[None] | None:
        """Stop pushing and give the user's socket back, once; return the pusher to wait for."""
        pusher, self.pusher = self.pusher, None
        if pusher is not None:
            pusher.cancel()
        user_pk, self.user_pk = self.user_pk, None
        if user_pk is not None:
            live_feed().socket_close(user_pk)
        return pusher

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """The feed is one-way; anything the browser sends is ignored."""

    async def push_forever(self) -> None:
        try:
            await self._push_loop()
        except asyncio.CancelledError:
            raise
        except OSError:  # the browser left (closed the tab, followed a link) while a push was on its way
            return
        except Exception:  # a broken feed must say so in the log and close, not hang silently
            logger.exception("console live feed failed")
            await self.close(code=1011)

    async def _push_loop(self) -> None:
        feed = live_feed()
        while True:
            await self.send(
                text_data=await feed.figures_json(window_s=self.window_s, max_age_s=self.interval_s)
            )
            await asyncio.sleep(self.interval_s)
            if not can_read(await user_now(self.scope)):
                await self.close(code=CLOSE_FORBIDDEN)
                return


class NoSuchSocket(AsyncWebsocketConsumer):
    """Any WebSocket path but the live feed's: refused at the handshake (an HTTP 403), where Channels'
    router raised a ValueError for each such connect, a traceback in the log that anyone could cause."""

    channel_layer_alias = None  # as LiveConsumer's: nothing sends to it

    async def connect(self) -> None:
        await self.close()
