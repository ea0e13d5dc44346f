"""Token pages: live access tokens by client and user; revoke one, or all of a client's."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.contrib.auth import get_user_model
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_http_methods

from authserver.models import AccessToken, Client
from authserver.selectors import access_tokens_active
from authserver.services import access_token_revoke
from console.access import actor, console_view
from console.views.common import confirm_page, next_url, paginate, query_text


@console_view()
@require_http_methods(["GET"])
def token_list(request: HttpRequest) -> HttpResponse:
    """List live access tokens, optionally of one client and/or one user."""
    client_id = query_text(request, "client", 100)
    username = query_text(request, "user", 150)
    client = Client.objects.filter(client_id=client_id).first() if client_id else None
    user: Any = get_user_model().objects.filter(username=username).first() if username else None
    unknown = (client_id and client is None) or (username and user is None)
    tokens = AccessToken.objects.none() if unknown else access_tokens_active(client=client, user=user)
    context = {
        "page": paginate(request, tokens),
        "client": client,
        "filter_client": client_id,
        "filter_user": username,
        "clients": Client.objects.order_by("name").only("client_id", "name"),
    }
    return render(request, "console/tokens/list.html", context)


@console_view(write=True)
@require_http_methods(["GET", "POST"])
def token_revoke(request: HttpRequest, pk: int) -> HttpResponse:
    """Revoke one access token (GET asks first; the tokens list posts here directly)."""
    token = get_object_or_404(AccessToken.objects.select_related("application", "user"), pk=pk)
    if request.method == "POST":
        access_token_revoke(token=token, actor=actor(request))
        messages.success(request, "The token is revoked on every gateway.")
        return redirect(next_url(request, reverse("console:tokens")))
    return confirm_page(
        request,
        title="Revoke this token?",
        message="The token stops working at once on every gateway, and any stream it runs is cut.",
        action="Revoke the token",
        cancel_url=reverse("console:tokens"),
        details=[
            ("Client", token.application.name if token.application else "-"),
            ("User", token.user.get_username() if token.user else "- (the client itself)"),
            ("Scope", token.scope),
            ("Expires", token.expires.isoformat(timespec="seconds")),
        ],
    )
