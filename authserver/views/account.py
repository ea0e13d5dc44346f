"""The user's own pages outside OAuth: signing in and out, and the page a refused CSRF check gets."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from django.contrib import messages
from django.contrib.auth import views as auth_views
from django.http import HttpRequest, HttpResponse, HttpResponseBase

from audit.services import actor_for_user, audit_record
from authserver.views.authorize import asks_for_a_new_sign_in


def csrf_failure(request: HttpRequest, reason: str = "") -> HttpResponse:
    """A form post refused by the CSRF check (a forged cross-site request, or a stale page): Django's own
    403 page, and an audit record (a security event), naming the view and Django's reason, never the
    token or the form."""
    from django.views.csrf import csrf_failure as django_csrf_failure

    match = getattr(request, "resolver_match", None)
    audit_record(
        kind="csrf.denied",
        outcome="denied",
        actor=actor_for_user(getattr(request, "user", None)),
        data={
            "reason": reason[:120],
            "view": (match.view_name if match else "")[:120],
            "method": request.method,
        },
    )
    response: HttpResponse = django_csrf_failure(request, reason)
    return response


class LoginView(auth_views.LoginView):
    """Django's sign-in page. A signed-in user is sent straight on to ``next``, unless ``next`` is an
    authorization request that asks for a new sign-in (prompt=login, max_age): then the page asks."""

    template_name = "registration/login.html"
    redirect_authenticated_user = True

    signing_in_again = False

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        self.signing_in_again = request.user.is_authenticated and asks_for_a_new_sign_in(
            self.get_redirect_url()
        )
        if self.signing_in_again:
            self.redirect_authenticated_user = False
        response: HttpResponseBase = super().dispatch(request, *args, **kwargs)
        return response

    def get_redirect_url(self) -> str:
        """``next`` as Django checks it, unless it is this page itself: for a signed-in user that was a 500
        (Django's redirect-loop check) or, with a query, a redirect to itself for ever."""
        url: str = super().get_redirect_url()
        return "" if urlsplit(url).path == self.request.path else url

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context: dict[str, Any] = super().get_context_data(**kwargs)
        context["signing_in_again"] = self.signing_in_again
        return context


class LogoutView(auth_views.LogoutView):
    """Sign out (POST only, as Django's) and land on the sign-in page, which says so; not on the Django
    admin's "Logged out" page. A safe ``next`` still wins, as in Django."""

    next_page = "login"

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        response: HttpResponse = super().post(request, *args, **kwargs)
        messages.success(request, "You have signed out.")  # after the session's end: kept in a cookie
        return response
