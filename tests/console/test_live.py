"""The dashboard's live feed over a WebSocket: staff only, figures computed from recent usage records."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from datetime import timedelta
from importlib import import_module
from typing import Any

import pytest
from asgiref.testing import ApplicationCommunicator
from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.db import connections
from django.test import Client as HttpClient
from django.utils import timezone

from audit.models import UsageRecord
from audit.selectors import usage_live_figures
from console import consumers
from console.consumers import LiveConsumer
from console.routing import websocket_urlpatterns


def usage(
    request_id: str, *, seconds_ago: float, status: int = 200, stream: bool = False, tokens: int = 10
) -> None:
    UsageRecord.objects.create(
        request_id=request_id,
        occurred_at=timezone.now() - timedelta(seconds=seconds_ago),
        client_id="c1",
        endpoint="chat",
        status=status,
        stream=stream,
        prompt_tokens=tokens,
        completion_tokens=tokens,
    )


SAME_ORIGIN = [(b"host", b"testserver"), (b"origin", b"http://testserver")]


class Socket:
    """A WebSocket client for one consumer (channels.testing needs daphne, which is not installed)."""

    def __init__(
        self,
        user: Any,
        session: Any = None,
        headers: list[tuple[bytes, bytes]] | None = None,
        **scope_extra: Any,
    ) -> None:
        scope = {
            "type": "websocket",
            "scheme": "ws",
            "path": "/ws/console/live/",
            "headers": SAME_ORIGIN if headers is None else headers,
            "subprotocols": [],
            "user": user,
        }
        if session is not None:
            scope["session"] = session
        scope.update(scope_extra)
        self.communicator = ApplicationCommunicator(LiveConsumer.as_asgi(), scope)

    async def connect(self) -> tuple[bool, int | None]:
        await self.communicator.send_input({"type": "websocket.connect"})
        answer = await self.communicator.receive_output(timeout=5)
        self.accepted = answer["type"] == "websocket.accept"
        return self.accepted, answer.get("code")

    async def receive_close_code(self) -> int | None:
        """Skip figures until the consumer closes the socket; return its close code."""
        for _ in range(50):
            message = await self.communicator.receive_output(timeout=5)
            if message["type"] == "websocket.close":
                return message.get("code")
        raise AssertionError("the socket stayed open")

    async def receive_json(self) -> dict[str, Any]:
        message = await self.communicator.receive_output(timeout=5)
        assert message["type"] == "websocket.send", message
        return dict(json.loads(message["text"]))

    async def disconnect(self) -> None:
        accepted = getattr(self, "accepted", False)
        await self.communicator.send_input({"type": "websocket.disconnect", "code": 1000})
        # A refused socket has nothing left to do: the wait only cancels it (it would idle the full 5 s).
        await self.communicator.wait(timeout=5 if accepted else 0.5)
        if accepted:
            # The consumer's database thread keeps its connection; close it so the test database can go.
            await database_sync_to_async(connections.close_all)()


async def first_messages(user: Any, count: int) -> tuple[bool, Any, list[dict[str, Any]]]:
    socket = Socket(user)
    connected, code = await socket.connect()
    messages = []
    if connected:
        for _ in range(count):
            messages.append(await socket.receive_json())
    await socket.disconnect()
    return connected, code, messages


def test_the_live_route_is_at_ws_console_live_and_any_other_path_is_refused():
    assert [str(p.pattern) for p in websocket_urlpatterns] == ["ws/console/live/", ""]

    async def connect(path: str) -> dict[str, Any]:
        from channels.routing import URLRouter

        scope = {"type": "websocket", "path": path, "headers": [], "subprotocols": []}
        socket = ApplicationCommunicator(URLRouter(websocket_urlpatterns), scope)
        await socket.send_input({"type": "websocket.connect"})
        answer: dict[str, Any] = await socket.receive_output(timeout=5)
        await socket.wait(timeout=1)
        return answer

    for path in ("/ws/console/live/x", "/ws/other/", "/"):  # Channels' router raised a ValueError for each
        assert asyncio.run(connect(path))["type"] == "websocket.close", path


@pytest.mark.django_db
def test_live_figures_count_only_the_window_and_split_errors_denials_and_streams():
    usage("r1", seconds_ago=1, tokens=5)
    usage("r2", seconds_ago=2, status=429)
    usage("r3", seconds_ago=3, status=502)
    usage("r4", seconds_ago=4, stream=True)
    usage("old", seconds_ago=60)
    figures = usage_live_figures(window_s=10)
    assert figures["requests_per_s"] == 0.4
    assert figures["tokens_per_s"] == (10 + 20 * 3) / 10
    assert (figures["errors"], figures["denials"], figures["active_streams"]) == (1, 1, 1)


@pytest.mark.django_db(transaction=True)
def test_staff_receive_figures_every_interval_and_they_move_when_traffic_flows(staff_user, monkeypatch):
    monkeypatch.setattr(LiveConsumer, "interval_s", 0.05)

    async def scenario() -> list[dict[str, Any]]:
        socket = Socket(staff_user)
        connected, _ = await socket.connect()
        assert connected
        before = await socket.receive_json()
        await database_sync_to_async(usage)("live-1", seconds_ago=0)
        after = before
        for _ in range(40):
            after = await socket.receive_json()
            if after["requests_per_s"] > before["requests_per_s"]:
                break
        await socket.disconnect()
        return [before, after]

    before, after = asyncio.run(scenario())
    assert set(before) >= {"requests_per_s", "tokens_per_s", "errors", "denials", "active_streams"}
    assert before["requests_per_s"] == 0
    assert after["requests_per_s"] > 0
    assert after["tokens_per_s"] > 0


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("who", ["anonymous", "member"])
def test_anyone_but_staff_is_refused_the_live_feed(who, member):
    user = AnonymousUser() if who == "anonymous" else member
    connected, code, messages = asyncio.run(first_messages(user, 1))
    assert not connected
    assert code == 4403
    assert messages == []


def test_a_browser_that_leaves_while_a_push_is_on_its_way_is_no_error(monkeypatch, caplog):
    import console.consumers as consumers

    class ClientDisconnected(OSError):  # what uvicorn raises on a send to a closed WebSocket
        pass

    async def gone(message: dict[str, Any]) -> None:
        raise ClientDisconnected()

    monkeypatch.setattr(consumers, "usage_live_figures", lambda window_s: {"requests_per_s": 0})
    monkeypatch.setitem(consumers.settings.GATEWAY, "UPSTREAMS", [])
    consumer = LiveConsumer()
    consumer.base_send = gone
    asyncio.run(asyncio.wait_for(consumer.push_forever(), timeout=5))  # returns: nothing to push to
    assert "console live feed failed" not in caplog.text


def session_store(session_key: str | None) -> Any:
    return import_module(settings.SESSION_ENGINE).SessionStore(session_key=session_key)


def signed_in_session(user: Any) -> Any:
    """A real signed-in session for this user, as the browser's cookie names it."""
    http = HttpClient()
    http.force_login(user)
    return session_store(http.session.session_key)


def sign_out(session: Any) -> None:
    session_store(session.session_key).delete()


def lock(user: Any) -> None:
    type(user).objects.filter(pk=user.pk).update(is_active=False)


def take_staff_away(user: Any) -> None:
    type(user).objects.filter(pk=user.pk).update(is_staff=False)


def change_password(user: Any) -> None:
    user.set_password("another long and good password")
    user.save()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("change", [sign_out, lock, take_staff_away, change_password])
def test_the_feed_stops_within_an_interval_once_its_user_may_no_longer_read(staff_user, monkeypatch, change):
    monkeypatch.setattr(LiveConsumer, "interval_s", 0.05)
    monkeypatch.setitem(settings.GATEWAY, "UPSTREAMS", [])
    session = signed_in_session(staff_user)

    async def scenario() -> int | None:
        socket = Socket(staff_user, session)
        connected, _ = await socket.connect()
        assert connected
        await socket.receive_json()
        await socket.receive_json()  # still allowed: the feed goes on
        await database_sync_to_async(change)(session if change is sign_out else staff_user)
        code = await socket.receive_close_code()
        await socket.disconnect()
        return code

    assert asyncio.run(scenario()) == 4403


@pytest.mark.django_db(transaction=True)
def test_without_a_session_in_the_scope_the_user_row_is_read_again(staff_user, monkeypatch):
    monkeypatch.setattr(LiveConsumer, "interval_s", 0.05)
    monkeypatch.setitem(settings.GATEWAY, "UPSTREAMS", [])

    async def scenario() -> int | None:
        socket = Socket(staff_user)
        assert (await socket.connect())[0]
        await socket.receive_json()
        await database_sync_to_async(lock)(staff_user)
        code = await socket.receive_close_code()
        await socket.disconnect()
        return code

    assert asyncio.run(scenario()) == 4403


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "headers",
    [
        [(b"host", b"testserver")],  # no Origin: not a page of this site
        [(b"host", b"testserver"), (b"origin", b"https://evil.example")],
        [(b"host", b"testserver"), (b"origin", b"http://testserver:8080")],  # same host, another port
        [(b"host", b"testserver"), (b"origin", b"https://testserver")],  # another scheme
        [(b"host", b"testserver"), (b"origin", b"null")],
        [(b"host", b"testserver"), (b"origin", b"http://testserver"), (b"origin", b"https://evil.example")],
    ],
)
def test_the_live_feed_refuses_a_handshake_from_any_other_origin(staff_user, headers):
    async def scenario() -> tuple[bool, int | None]:
        socket = Socket(staff_user, headers=headers)
        answer = await socket.connect()
        await socket.disconnect()
        return answer

    assert asyncio.run(scenario()) == (False, 4403)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("scope_extra", "origin", "forwarded_proto"),
    [
        ({"scheme": "wss"}, b"https://testserver", None),
        ({}, b"https://portcullis.example.com", None),  # a trusted origin (the issuer)
        ({"client": ("10.0.0.2", 5000)}, b"https://testserver", b"https"),  # TLS ended at a trusted proxy
    ],
)
def test_the_live_feed_accepts_its_own_and_trusted_origins(
    staff_user, settings, scope_extra, origin, forwarded_proto
):
    settings.CSRF_TRUSTED_ORIGINS = ["https://portcullis.example.com"]
    settings.PORTCULLIS_TRUSTED_PROXIES = ["10.0.0.0/24"]
    headers = [(b"host", b"testserver"), (b"origin", origin)]
    if forwarded_proto:
        headers.append((b"x-forwarded-proto", forwarded_proto))

    async def scenario() -> bool:
        socket = Socket(staff_user, headers=headers, **scope_extra)
        connected, _ = await socket.connect()
        await socket.disconnect()
        return connected

    assert asyncio.run(scenario())


@pytest.mark.django_db(transaction=True)
def test_only_a_trusted_proxy_may_say_the_browser_used_https(staff_user, settings):
    settings.PORTCULLIS_TRUSTED_PROXIES = ["10.0.0.0/24"]
    headers = [(b"host", b"testserver"), (b"origin", b"https://testserver"), (b"x-forwarded-proto", b"https")]

    async def scenario() -> bool:
        socket = Socket(staff_user, headers=headers, client=("192.0.2.7", 5000))
        connected, _ = await socket.connect()
        await socket.disconnect()
        return connected

    assert not asyncio.run(scenario())


def asgi_feed_scope(user: Any) -> dict[str, Any]:
    """A feed handshake as a browser on the dashboard sends it to the project's ASGI application."""
    http = HttpClient()
    http.force_login(user)
    cookie = f"{settings.SESSION_COOKIE_NAME}={http.session.session_key}".encode()
    return {
        "type": "websocket",
        "scheme": "ws",
        "path": "/ws/console/live/",
        "raw_path": b"/ws/console/live/",
        "query_string": b"",
        "subprotocols": [],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "headers": [(b"host", b"127.0.0.1:8000"), (b"origin", b"http://127.0.0.1:8000"), (b"cookie", cookie)],
    }


@pytest.mark.django_db(transaction=True)
def test_a_feed_socket_through_the_asgi_application_outlives_redis_clients_5_s_timeout(
    staff_user, monkeypatch
):
    """Each socket held a receive on a Redis channel layer (BZPOPMIN, 5 s) that redis-py's 5 s socket
    timeout cut: every feed died after 5 s. Real time, as the timeout is Redis's own."""
    from config.asgi import application

    monkeypatch.setattr(LiveConsumer, "interval_s", 0.5)
    monkeypatch.setitem(settings.GATEWAY, "UPSTREAMS", [])
    scope = asgi_feed_scope(staff_user)

    async def scenario() -> tuple[float, list[str]]:
        socket = ApplicationCommunicator(application, scope)
        await socket.send_input({"type": "websocket.connect"})
        assert (await socket.receive_output(timeout=5))["type"] == "websocket.accept"
        started, kinds = time.monotonic(), []
        while time.monotonic() - started < 6.5:
            kinds.append((await socket.receive_output(timeout=5))["type"])
        await socket.send_input({"type": "websocket.disconnect", "code": 1000})
        await socket.wait(timeout=5)
        await database_sync_to_async(connections.close_all)()
        return time.monotonic() - started, kinds

    lasted, kinds = asyncio.run(scenario())
    assert lasted > 6.5
    assert set(kinds) == {"websocket.send"}  # figures all along, and no close
    assert len(kinds) >= 10


@pytest.mark.django_db(transaction=True)
def test_the_feed_takes_no_channel_even_when_a_channel_layer_is_configured(staff_user, settings, monkeypatch):
    from channels_redis.core import RedisChannelLayer

    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [settings.REDIS_URL]},
        }
    }
    settings.GATEWAY = {**settings.GATEWAY, "UPSTREAMS": []}
    channels_made: list[str] = []

    async def new_channel(self: Any, prefix: str = "specific.") -> str:
        channels_made.append(prefix)
        return f"{prefix}test"

    monkeypatch.setattr(RedisChannelLayer, "new_channel", new_channel)
    connected, _, messages = asyncio.run(first_messages(staff_user, 1))
    assert connected
    assert len(messages) == 1
    assert channels_made == []


@pytest.mark.django_db(transaction=True)
def test_a_user_may_hold_five_feed_sockets_and_one_more_is_refused_at_the_handshake(
    staff_user, admin_user, monkeypatch, caplog
):
    monkeypatch.setitem(settings.GATEWAY, "UPSTREAMS", [])
    assert LiveConsumer.max_sockets_per_user == 5

    async def connected(user: Any) -> tuple[Socket, bool]:
        socket = Socket(user)
        accepted, code = await socket.connect()
        assert accepted or code == 4403
        return socket, accepted

    async def scenario() -> list[bool]:
        held = [await connected(staff_user) for _ in range(5)]
        assert all(accepted for _, accepted in held)
        outcomes = []
        sixth, accepted = await connected(staff_user)
        outcomes.append(accepted)
        await sixth.disconnect()
        other, accepted = await connected(admin_user)  # a cap per user, not for everyone
        outcomes.append(accepted)
        await held.pop()[0].disconnect()  # the browser closes one: its place is free
        again, accepted = await connected(staff_user)
        outcomes.append(accepted)
        cancelled = held.pop()[0]  # the server ends one without a disconnect (a shutdown, a timeout)
        await cancelled.communicator.wait(timeout=0.05)  # still running then: cancelled
        after_cancel, accepted = await connected(staff_user)
        outcomes.append(accepted)
        for socket in [other, again, after_cancel, *(socket for socket, _ in held)]:
            await socket.disconnect()
        return outcomes

    assert asyncio.run(scenario()) == [False, True, True, True]
    refusals = [r.getMessage() for r in caplog.records if "one more refused" in r.getMessage()]
    assert refusals == [f"console live feed: user {staff_user.pk} already holds 5 sockets; one more refused"]


@pytest.mark.django_db(transaction=True)
def test_every_socket_sends_one_computation_of_the_figures_an_interval_and_one_ended_mid_way_stops_none(
    staff_user, admin_user, monkeypatch
):
    """The figures are the same for all: computed once an interval in a process, not once per socket."""
    monkeypatch.setattr(LiveConsumer, "interval_s", 0.5)
    monkeypatch.setitem(settings.GATEWAY, "UPSTREAMS", [])
    computations: list[float] = []
    started, finish = threading.Event(), threading.Event()

    def figures(window_s: float) -> dict[str, Any]:
        computations.append(window_s)
        started.set()
        finish.wait(5)  # the aggregate runs until the test lets it finish
        return {"computation": len(computations)}

    monkeypatch.setattr(consumers, "usage_live_figures", figures)

    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        leaver = Socket(staff_user)
        assert (await leaver.connect())[0]
        assert await asyncio.to_thread(started.wait, 5)  # its computation is under way
        await leaver.communicator.wait(timeout=0.05)  # and the server ends the socket (it is cancelled)
        finish.set()
        sockets = [Socket(user) for user in (staff_user, admin_user) for _ in range(3)]
        for socket in sockets:
            assert (await socket.connect())[0]
        first = [await socket.receive_json() for socket in sockets]
        second = [await socket.receive_json() for socket in sockets]
        for socket in sockets:
            await socket.disconnect()
        return first, second

    first, second = asyncio.run(scenario())
    assert first == [first[0]] * 6
    assert second == [{"computation": first[0]["computation"] + 1}] * 6
