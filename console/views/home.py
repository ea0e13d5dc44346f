"""The site's front door, ``/`` (the header's "Portcullis" link): each visitor goes where they can act.

Staff go to the console, anyone else signed in to their connected apps (the only page they have), and a
visitor who is not signed in sees what this server is, a way to sign in, and, for developers, where the
OAuth metadata and the API are.
"""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_http_methods

from console.access import can_read


@never_cache  # who is asking decides the answer
@require_http_methods(["GET", "HEAD"])
def home(request: HttpRequest) -> HttpResponse:
    """Send staff to the console and other users to their connected apps; show anyone else the way in."""
    if can_read(request.user):
        return redirect("console:dashboard")
    if request.user.is_authenticated:
        return redirect("console:connected-apps")
    return render(request, "home.html", {"api_base": f"{settings.PORTCULLIS_ISSUER}/v1"})
