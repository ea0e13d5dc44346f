"""WebSocket routes of the console (the live traffic feed)."""

from __future__ import annotations

from django.urls import URLPattern, path, re_path

from console.consumers import LiveConsumer, NoSuchSocket

websocket_urlpatterns: list[URLPattern] = [
    path("ws/console/live/", LiveConsumer.as_asgi(), name="console-live"),
    re_path(r"", NoSuchSocket.as_asgi()),  # last: any other path is refused, not a ValueError per connect
]
