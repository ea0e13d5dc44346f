"""WebSocket routes of the console (the live traffic feed)."""

from __future__ import annotations

from django.urls import URLPattern, path

from console.consumers import LiveConsumer

websocket_urlpatterns: list[URLPattern] = [
    path("ws/console/live/", LiveConsumer.as_asgi(), name="console-live"),
]
