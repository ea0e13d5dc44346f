"""The dashboard: live traffic (updated over a WebSocket), security events, upstreams, the active key."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_http_methods

from audit.selectors import anomalies_latest, security_events_latest, usage_live_figures
from authserver.models import SigningKey
from console.access import console_view

LIVE_WINDOW_S = 10.0  # the live figures average over this many seconds


@console_view()
@require_http_methods(["GET"])
def dashboard(request: HttpRequest) -> HttpResponse:
    """Show the dashboard; the figures are then pushed every 2 s by ``console.consumers.LiveConsumer``."""
    active = SigningKey.objects.filter(state=SigningKey.State.ACTIVE).defer("private_key_encrypted")
    active = active.order_by("algorithm")
    context = {
        "live": usage_live_figures(window_s=LIVE_WINDOW_S),
        "security_events": security_events_latest(limit=10),
        "anomalies": anomalies_latest(limit=5),
        "upstreams": settings.GATEWAY["UPSTREAMS"],
        "active_keys": list(active),
    }
    return render(request, "console/dashboard.html", context)
