"""WebSocket routes of the console (the live traffic feed)."""

from __future__ import annotations

from django.urls import URLPattern

websocket_urlpatterns: list[URLPattern] = []
