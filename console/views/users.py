"""User pages: list and search, one user's consents and tokens, lock and unlock."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_http_methods

from authserver.selectors import access_tokens_active, connected_apps_for_user, users_search
from authserver.services import user_lock, user_unlock
from console.access import actor, console_view
from console.views.common import confirm_page, paginate, query_text


def _user(pk: int) -> Any:
    return get_object_or_404(get_user_model(), pk=pk)


@console_view()
@require_http_methods(["GET"])
def user_list(request: HttpRequest) -> HttpResponse:
    """List users, filtered by a search query."""
    query = query_text(request, "q", 150)
    page = paginate(request, users_search(query=query))
    return render(request, "console/users/list.html", {"page": page, "query": query})


@console_view()
@require_http_methods(["GET"])
def user_detail(request: HttpRequest, pk: int) -> HttpResponse:
    """Show one user: state, the apps they connected and their live tokens."""
    user = _user(pk)
    context = {
        "subject": user,
        "apps": connected_apps_for_user(user=user),
        "tokens": access_tokens_active(user=user)[:100],
    }
    return render(request, "console/users/detail.html", context)


@console_view(write=True)
@require_http_methods(["GET", "POST"])
def user_lock_view(request: HttpRequest, pk: int) -> HttpResponse:
    """Ask, then lock a user: no sign-in, every token revoked."""
    user = _user(pk)
    if request.method == "POST":
        try:
            user_lock(user=user, actor=actor(request))
        except ValidationError as exc:
            messages.error(request, " ".join(exc.messages))
        else:
            messages.success(request, f"{user.get_username()} is locked and their tokens are revoked.")
        return redirect("console:user-detail", pk=user.pk)
    return confirm_page(
        request,
        title=f"Lock {user.get_username()}?",
        message="They cannot sign in, and every token they hold is revoked at once on every gateway.",
        action="Lock the user",
        cancel_url=reverse("console:user-detail", args=[user.pk]),
    )


@console_view(write=True)
@require_http_methods(["GET", "POST"])
def user_unlock_view(request: HttpRequest, pk: int) -> HttpResponse:
    """Ask, then unlock a user and clear their failed-sign-in lockouts."""
    user = _user(pk)
    if request.method == "POST":
        user_unlock(user=user, actor=actor(request))
        messages.success(request, f"{user.get_username()} may sign in again.")
        return redirect("console:user-detail", pk=user.pk)
    return confirm_page(
        request,
        title=f"Unlock {user.get_username()}?",
        message="They may sign in again, and failed sign-in lockouts for their user name are cleared.",
        action="Unlock the user",
        danger=False,
        cancel_url=reverse("console:user-detail", args=[user.pk]),
    )
