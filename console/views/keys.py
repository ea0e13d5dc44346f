"""Signing-key pages: every key with its state and dates; rotate now, or revoke a leaked key, after
confirmation."""

from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_http_methods

from authserver.models import SigningFamily, SigningKey
from authserver.services import (
    signing_algorithms_rotated,
    signing_family_window_s,
    signing_key_revoke,
    signing_key_rotate,
)
from console.access import actor, console_view
from console.views.common import confirm_page


@console_view()
@require_http_methods(["GET"])
def key_list(request: HttpRequest) -> HttpResponse:
    """List signing keys, newest first, with their lifecycle dates."""
    keys = SigningKey.objects.defer("private_key_encrypted").order_by("-created_at")
    context = {
        "keys": keys,
        "conf": settings.AUTHSERVER,
        "families": SigningFamily.objects.order_by("algorithm"),
        "window": _duration(signing_family_window_s()),
    }
    return render(request, "console/keys/list.html", context)


def _duration(seconds: int) -> str:
    """A whole number of days, hours or minutes when the value is one ("7 days"), else seconds."""
    for unit, size in (("day", 86_400), ("hour", 3_600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds} s"


@console_view(write=True)
@require_http_methods(["GET", "POST"])
def key_rotate(request: HttpRequest) -> HttpResponse:
    """Ask, then rotate: publish a new key (and, for a compromised key, make it sign at once)."""
    if request.method == "POST":
        activate_now = request.POST.get("activate_now") == "on"
        result = signing_key_rotate(force=True, activate_now=activate_now, actor=actor(request))
        waiting = [kid for kid in result.created if kid not in result.activated]
        if result.activated:
            messages.success(request, f"Signing new tokens now: {', '.join(result.activated)}.")
        if waiting:
            messages.success(request, f"Published, signing once due: {', '.join(waiting)}.")
        if not (result.activated or waiting):
            messages.info(request, "A new key is already waiting to be activated; nothing was created.")
        return redirect("console:keys")
    pending = SigningKey.objects.filter(state=SigningKey.State.PENDING).defer("private_key_encrypted")
    context = {
        "pending": pending,
        "algorithms": signing_algorithms_rotated(),  # what the rotation below will rotate
        "publish_ahead_s": settings.AUTHSERVER["KEY_PUBLISH_AHEAD_S"],
    }
    return render(request, "console/keys/rotate.html", context)


@console_view(write=True)
@require_http_methods(["GET", "POST"])
def key_revoke(request: HttpRequest, kid: str) -> HttpResponse:
    """Ask, then revoke a key that leaked: unpublished at once, replaced first if it signs."""
    queryset = SigningKey.objects.exclude(state=SigningKey.State.REMOVED).defer("private_key_encrypted")
    key = get_object_or_404(queryset, kid=kid)
    if request.method == "POST":
        try:
            result = signing_key_revoke(key.kid, actor=actor(request))
        except ValidationError:  # another admin, or a rotation, removed it meanwhile
            messages.info(request, f"Key {key.kid} is no longer published.")
            return redirect("console:keys")
        if result.activated:
            messages.success(request, f"Signing new tokens now: {', '.join(result.activated)}.")
        messages.success(request, f"Key {key.kid} is unpublished; every gateway drops what it signed.")
        return redirect("console:keys")
    return confirm_page(
        request,
        title="Revoke this signing key?",
        message=(
            "For a key that leaked. It is unpublished at once, not when its tokens expire; if it signs, a "
            "new key of its family signs from now. Every token it signed stops working on every gateway, "
            "honest ones too: their clients get new ones."
        ),
        action="Revoke the key",
        cancel_url=reverse("console:keys"),
        details=[("Key id", key.kid), ("Algorithm", key.algorithm), ("State", key.state)],
    )
