"""Client pages: list and search, create (secret shown once), edit, rotate the secret, disable or enable,
revoke every token, the gateway policy, and the usage chart."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_http_methods

from audit.selectors import UsageBucket, usage_series
from authserver.models import Client
from authserver.selectors import access_tokens_active, clients_search
from authserver.services import (
    client_create,
    client_disable,
    client_enable,
    client_secret_rotate,
    client_update,
    tokens_revoke_for_client,
)
from console.access import actor, console_view
from console.forms import GRANT_ALIAS_OF, ClientForm, PolicyForm, errors_to_form
from console.views.common import confirm_page, next_url, paginate, query_text
from gateway.models import ClientPolicy
from gateway.services import policy_set

USAGE_UNITS = {"minute": timedelta(hours=1), "hour": timedelta(hours=24)}


def _client(client_id: str) -> Client:
    return get_object_or_404(Client, client_id=client_id)


@console_view()
@require_http_methods(["GET"])
def client_list(request: HttpRequest) -> HttpResponse:
    """List clients, filtered by a search query."""
    query = query_text(request, "q", 100)
    page = paginate(request, clients_search(query=query))
    return render(request, "console/clients/list.html", {"page": page, "query": query})


@console_view(write=True)
@require_http_methods(["GET", "POST"])
def client_new(request: HttpRequest) -> HttpResponse:
    """Create a client; the answer shows its secret once (never stored in clear, never shown again)."""
    form = ClientForm(request.POST or None, initial={"grant_types": ["client-credentials"]})
    if request.method == "POST" and form.is_valid():
        fields = form.service_fields()
        try:
            registered = client_create(public=form.cleaned_data["public"], actor=actor(request), **fields)
        except ValidationError as exc:
            errors_to_form(form, exc)
        else:
            return _secret_page(request, registered.client, registered.client_secret, created=True)
    return render(request, "console/clients/form.html", {"form": form, "creating": True})


def _secret_page(request: HttpRequest, client: Client, secret: str | None, *, created: bool) -> HttpResponse:
    response = render(
        request, "console/clients/secret.html", {"client": client, "secret": secret, "created": created}
    )
    response["Cache-Control"] = "no-store"  # the secret must not stay in any cache
    return response


def chart_bars(series: list[UsageBucket]) -> list[dict[str, Any]]:
    """Return one SVG bar per period, scaled so the busiest period is 100 units high."""
    peak = max((bucket.requests for bucket in series), default=0) or 1
    bars = []
    for index, bucket in enumerate(series):
        height = round(100 * bucket.requests / peak)
        bars.append({"bucket": bucket, "x": index * 10, "y": 100 - height, "height": height})
    return bars


@console_view()
@require_http_methods(["GET"])
def client_detail(request: HttpRequest, client_id: str) -> HttpResponse:
    """Show a client: its settings, policy, live tokens and usage chart."""
    client = _client(client_id)
    unit = request.GET.get("unit", "hour")
    unit = unit if unit in USAGE_UNITS else "hour"
    now = timezone.now()
    series = usage_series(client_id=client.client_id, since=now - USAGE_UNITS[unit], until=now, unit=unit)
    bars = chart_bars(series)
    context = {
        "client": client,
        "policy": ClientPolicy.objects.filter(client=client).first(),
        "tokens": access_tokens_active(client=client)[:20],
        "grant_labels": [GRANT_ALIAS_OF.get(g, g) for g in client.grant_types],
        "series": series,
        "bars": bars,
        "chart_width": len(bars) * 10,
        "unit": unit,
        "total_requests": sum(b.requests for b in series),
        "total_tokens": sum(b.tokens for b in series),
        "total_errors": sum(b.errors for b in series),
    }
    return render(request, "console/clients/detail.html", context)


@console_view(write=True)
@require_http_methods(["GET", "POST"])
def client_edit(request: HttpRequest, client_id: str) -> HttpResponse:
    """Edit a client's name, description, grants, redirect URIs, scopes and flags."""
    client = _client(client_id)
    initial = {
        "name": client.name,
        "description": client.description,
        "logo_url": client.logo_url,
        "grant_types": [GRANT_ALIAS_OF.get(g, g) for g in client.grant_types],
        "redirect_uris": "\n".join(client.redirect_uris.split()),
        "post_logout_redirect_uris": "\n".join(client.post_logout_redirect_uris.split()),
        "allowed_origins": "\n".join(client.allowed_origins.split()),
        "scopes": client.scope_list(),
        "can_introspect": client.can_introspect,
        "is_admin_client": client.is_admin_client,
    }
    form = ClientForm(request.POST or None, initial=initial, editing=True)
    if request.method == "POST" and form.is_valid():
        fields = form.service_fields()
        fields["redirect_uris"] = " ".join(fields["redirect_uris"])
        fields["post_logout_redirect_uris"] = " ".join(fields["post_logout_redirect_uris"])
        fields["allowed_origins"] = " ".join(fields["allowed_origins"])
        fields["allowed_scopes"] = " ".join(fields.pop("scopes"))
        try:
            client_update(client=client, actor=actor(request), **fields)
        except ValidationError as exc:
            errors_to_form(form, exc)
            client.refresh_from_db()
        else:
            messages.success(request, f"Saved {client.name}.")
            return redirect("console:client-detail", client_id=client.client_id)
    return render(request, "console/clients/form.html", {"form": form, "client": client, "creating": False})


@console_view(write=True)
@require_http_methods(["GET", "POST"])
def client_rotate_secret(request: HttpRequest, client_id: str) -> HttpResponse:
    """Ask, then give the client a new secret and show it once; the old one stops working."""
    client = _client(client_id)
    if request.method == "POST":
        try:
            secret = client_secret_rotate(client=client, actor=actor(request))
        except ValidationError as exc:
            messages.error(request, " ".join(exc.messages))
            return redirect("console:client-detail", client_id=client.client_id)
        return _secret_page(request, client, secret, created=False)
    return confirm_page(
        request,
        title=f"Rotate the secret of {client.name}?",
        message="A new secret is generated and shown once. The current secret stops working at once: "
        "the app cannot get new tokens until it uses the new one. Tokens already issued keep working "
        "until they expire.",
        action="Rotate the secret",
        cancel_url=reverse("console:client-detail", args=[client.client_id]),
    )


@console_view(write=True)
@require_http_methods(["GET", "POST"])
def client_disable_view(request: HttpRequest, client_id: str) -> HttpResponse:
    """Ask, then disable a client: every token it holds stops working at once, on every gateway."""
    client = _client(client_id)
    if request.method == "POST":
        client_disable(client=client, actor=actor(request))
        messages.success(request, f"{client.name} is disabled and its tokens are revoked.")
        return redirect("console:client-detail", client_id=client.client_id)
    return confirm_page(
        request,
        title=f"Disable {client.name}?",
        message="The app can no longer get tokens, and every token it holds is revoked at once on every "
        "gateway, cutting any stream in flight. You can enable it again later.",
        action="Disable the client",
        cancel_url=reverse("console:client-detail", args=[client.client_id]),
        details=[
            ("Client id", client.client_id),
            ("Live tokens", str(access_tokens_active(client=client).count())),
        ],
    )


@console_view(write=True)
@require_http_methods(["GET", "POST"])
def client_enable_view(request: HttpRequest, client_id: str) -> HttpResponse:
    """Ask, then enable a disabled client again."""
    client = _client(client_id)
    if request.method == "POST":
        client_enable(client=client, actor=actor(request))
        messages.success(request, f"{client.name} is enabled.")
        return redirect("console:client-detail", client_id=client.client_id)
    return confirm_page(
        request,
        title=f"Enable {client.name}?",
        message="The app may get tokens again.",
        action="Enable the client",
        danger=False,
        cancel_url=reverse("console:client-detail", args=[client.client_id]),
    )


@console_view(write=True)
@require_http_methods(["GET", "POST"])
def client_revoke_tokens(request: HttpRequest, client_id: str) -> HttpResponse:
    """Ask, then revoke every access and refresh token of a client (it stays enabled)."""
    client = _client(client_id)
    if request.method == "POST":
        count = tokens_revoke_for_client(client=client, actor=actor(request), reason="revoked by an admin")
        messages.success(request, f"Revoked {count} access tokens of {client.name}.")
        return redirect(next_url(request, reverse("console:client-detail", args=[client.client_id])))
    return confirm_page(
        request,
        title=f"Revoke every token of {client.name}?",
        message="Every access and refresh token of this app is revoked at once on every gateway. The app "
        "stays enabled and may get new tokens.",
        action="Revoke all tokens",
        cancel_url=reverse("console:client-detail", args=[client.client_id]),
    )


@console_view(write=True)
@require_http_methods(["GET", "POST"])
def client_policy(request: HttpRequest, client_id: str | None = None) -> HttpResponse:
    """Edit a client's gateway policy (or the default policy); the gateways get it within a second."""
    client = _client(client_id) if client_id else None
    row = ClientPolicy.objects.filter(client=client).first()
    form = PolicyForm(request.POST or None, initial=PolicyForm.initial_for(row))
    if request.method == "POST" and form.is_valid():
        try:
            policy_set(client=client, actor=actor(request), **form.policy_fields())
        except ValidationError as exc:
            errors_to_form(form, exc)
        else:
            messages.success(request, "Policy saved; every gateway applies it within a second.")
            if client is None:
                return redirect("console:clients")
            return redirect("console:client-detail", client_id=client.client_id)
    return render(request, "console/clients/policy.html", {"form": form, "client": client, "row": row})
