"""Connected apps: a signed-in user sees which apps hold access to their account and withdraws it."""

from __future__ import annotations

from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_http_methods

from authserver.models import Client
from authserver.selectors import connected_apps_for_user
from authserver.services import consent_withdraw
from console.access import signed_in_view
from console.views.common import confirm_page


@signed_in_view
@require_http_methods(["GET"])
def connected_apps(request: HttpRequest) -> HttpResponse:
    """List the apps that hold access to the signed-in user's account."""
    return render(
        request, "console/connected_apps.html", {"apps": connected_apps_for_user(user=request.user)}
    )


@signed_in_view
@require_http_methods(["GET", "POST"])
def connected_app_withdraw(request: HttpRequest, client_id: str) -> HttpResponse:
    """Withdraw the user's consent for one app; its tokens for this user stop working at once."""
    client = get_object_or_404(Client, client_id=client_id)
    if not any(app.client.pk == client.pk for app in connected_apps_for_user(user=request.user)):
        raise Http404("This app has no access to your account.")
    if request.method == "POST":
        consent_withdraw(user=request.user, client=client)
        messages.success(request, f"{client.name} no longer has access to your account.")
        return redirect("console:connected-apps")
    return confirm_page(
        request,
        title=f"Remove access for {client.name}?",
        message="The app loses access to your account at once. It will have to ask you again to get it back.",
        action="Remove access",
        cancel_url=reverse("console:connected-apps"),
    )
