"""Helpers shared by the console pages: paging, where to go back to, and the confirmation page."""

from __future__ import annotations

from typing import Any

from django.core.paginator import Page, Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils.http import url_has_allowed_host_and_scheme

PAGE_SIZE = 50


def paginate(request: HttpRequest, items: Any, per_page: int = PAGE_SIZE) -> Page[Any]:
    """Return the requested page of a list or queryset (bad page numbers give the nearest page)."""
    return Paginator(items, per_page).get_page(request.GET.get("page"))


def next_url(request: HttpRequest, default: str) -> str:
    """Return the posted ``next`` if it is a page of this site, else ``default`` (never another site)."""
    target = request.POST.get("next", "")
    if target and url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()}):
        return target
    return default


def query_text(request: HttpRequest, name: str, max_length: int) -> str:
    """Return a search parameter trimmed, shortened and without NUL characters (PostgreSQL refuses them)."""
    return request.GET.get(name, "").replace("\x00", "").strip()[:max_length]


def confirm_page(
    request: HttpRequest,
    *,
    title: str,
    message: str,
    action: str,
    cancel_url: str,
    danger: bool = True,
    details: list[tuple[str, str]] | None = None,
) -> HttpResponse:
    """Render a page that asks the admin to confirm a sensitive action with a POST."""
    context = {
        "title": title,
        "message": message,
        "action": action,
        "cancel_url": cancel_url,
        "danger": danger,
        "details": details or [],
    }
    return render(request, "console/confirm.html", context)
