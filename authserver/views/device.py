"""The device flow's other pages (RFC 8628): device authorization, where the user enters the code, and
where they approve the device; wrong codes are counted and the answer is remembered as consent."""

from __future__ import annotations

import logging
from typing import Any

from django.core.cache import cache
from django.core.exceptions import MultipleObjectsReturned, ValidationError
from django.db.models import Q
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.shortcuts import redirect
from oauth2_provider import views as dot_views
from oauth2_provider.models import get_device_grant_model
from oauth2_provider.settings import oauth2_settings
from oauth2_provider.utils import user_code_generator
from oauth2_provider.views.device import DeviceGrantForm
from redis.exceptions import RedisError

from audit.services import actor_for_user, audit_record
from authserver.models import GRANT_DEVICE_CODE, Client
from authserver.registry import consent_details_for
from authserver.selectors import client_by_client_id
from authserver.services import consent_grant
from authserver.views.common import (
    FORM,
    QUERY_MAX,
    FormEndpoint,
    client_id_of,
    client_refused,
    error_code_of,
    named_client_id,
    oauth_error,
)

logger = logging.getLogger(__name__)

USER_CODE_WRONG_MAX = 10  # wrong user codes a user may enter within the window, then a pause
USER_CODE_WINDOW_S = 900


def user_code_normalised(entered: str) -> str:
    """The user code as DOT's generator writes it (RFC 8628 §6.1: upper case, no separators), from what a
    user typed: ``0ief-6t6h`` is ``0IEF6T6H``. DOT's lookup is exact, so a code typed in lower case, or
    grouped as a device may show it, was a wrong code (and counted toward the pause). Another generator's
    codes are taken as typed: its alphabet may hold lower-case letters."""
    if oauth2_settings.OAUTH_DEVICE_USER_CODE_GENERATOR is not user_code_generator:
        return entered
    return "".join(entered.split()).replace("-", "").upper()


class DeviceUserCodeForm(DeviceGrantForm):
    """DOT's form, for a code several grants share (DOT's user codes are not unique, and old grants keep
    theirs): its lookup raised MultipleObjectsReturned, a 500. The one pending grant among them is the one
    meant; with none, or several, the code is wrong. (A NUL is refused by the form field itself.)"""

    def clean_user_code(self) -> Any:
        self.cleaned_data["user_code"] = user_code_normalised(self.cleaned_data["user_code"])
        try:
            return super().clean_user_code()
        except MultipleObjectsReturned:
            code = self.cleaned_data["user_code"]
            model = get_device_grant_model()
            shared = model.objects.filter(user_code=code, status=model.AUTHORIZATION_PENDING)
            pending = [grant for grant in shared if not grant.is_expired()]
            if len(pending) != 1:
                raise ValidationError("Incorrect user code", code="incorrect_user_code") from None
            self.cleaned_data["device_grant"] = pending[0]
            return code


class DeviceUserCodeView(dot_views.DeviceUserCodeView):
    """Where a signed-in user enters the code a device shows: DOT's page, with wrong codes counted and
    audited, and a pause after ``USER_CODE_WRONG_MAX`` of them (RFC 8628 §5.1: user codes are short enough
    to guess; a pending code found by guessing lets its finder approve someone's device as themselves)."""

    form_class = DeviceUserCodeForm

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        if len(request.META.get("QUERY_STRING", "")) > QUERY_MAX:
            # no code is that long; its sign-in redirect would be refused (a 400 page, an error logged)
            return redirect(request.path)
        response: HttpResponseBase = super().dispatch(request, *args, **kwargs)
        return response

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if self._wrong_count() >= USER_CODE_WRONG_MAX:
            audit_record(
                kind="device.code_throttled",
                outcome="denied",
                actor=actor_for_user(request.user),
                data={"limit": USER_CODE_WRONG_MAX, "window_s": USER_CODE_WINDOW_S},
            )
            form = self.get_form()
            form.errors.clear()
            form.add_error(None, "Too many wrong codes. Wait a few minutes, then try again.")
            return self.render_to_response(self.get_context_data(form=form), status=429)
        response: HttpResponse = super().post(request, *args, **kwargs)
        return response

    def form_valid(self, form: Any) -> HttpResponse:
        """Bind the grant to this user, unless another user entered its code first (DOT moved it to whoever
        entered the code last: a code seen over Alice's shoulder let Bob take her device's grant away, or
        her approval page then answered 404). To this user, such a code is a wrong one: counted toward the
        pause like any guess, so the page tells no one that the code exists."""
        grant = form.cleaned_data["device_grant"]
        model = get_device_grant_model()
        claimed = model.objects.filter(
            Q(user__isnull=True) | Q(user=self.request.user), pk=grant.pk, status=model.AUTHORIZATION_PENDING
        ).update(user=self.request.user)
        if not claimed:
            form.add_error("user_code", ValidationError("Incorrect user code", code="incorrect_user_code"))
            return self.form_invalid(form)
        response: HttpResponse = super().form_valid(form)  # DOT's: binds it to this user, as it now is
        return response

    def form_invalid(self, form: Any) -> HttpResponse:
        if form.has_error("user_code", "incorrect_user_code"):
            audit_record(
                kind="device.code_wrong",
                outcome="denied",
                actor=actor_for_user(self.request.user),
                data={"count": self._wrong_counted()},
            )
        response: HttpResponse = super().form_invalid(form)
        return response

    def _key(self) -> str:
        return f"portcullis:device-code-wrong:{self.request.user.pk}"

    def _wrong_count(self) -> int:
        try:
            return int(cache.get(self._key(), 0))
        except (RedisError, OSError):
            logger.warning("the cache did not answer; wrong device codes are not counted")
            return 0

    def _wrong_counted(self) -> int:
        """Count one more wrong code in the window that the first one opened."""
        try:
            cache.add(self._key(), 0, timeout=USER_CODE_WINDOW_S)
            return int(cache.incr(self._key()))
        except (RedisError, OSError, ValueError):  # ValueError: the key expired between the two calls
            return 0


class DeviceConfirmView(dot_views.DeviceConfirmView):
    """The user approves or denies a device: DOT's page, with the answer remembered and audited as the
    consent page's is. Without it a device app's approval left no ``consent.granted`` record, and once its
    access token expired the app vanished from the user's connected apps, its refresh token still live."""

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        """DOT's context, with what the consent page also shows: the models and limits the app would get."""
        context: dict[str, Any] = super().get_context_data(**kwargs)
        context["extra_details"] = consent_details_for(context["application"])
        return context

    def get(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        """DOT's page, or, for a code that may no longer be approved, why (no Allow or Deny to press: the
        page offered them for an expired code, and refused only once one was pressed)."""
        device = self.get_object()  # a 404 for a code not pending for this user, as DOT's page
        refusal = _confirm_refusal(device, client_by_client_id(device.client_id))
        if refusal is None:
            response: HttpResponse = super().get(request, *args, **kwargs)
            return response
        status, _reason, message = refusal
        return self.render_to_response(self.get_context_data(refused=message), status=status)

    def form_valid(self, form: Any) -> HttpResponse:
        if form.cleaned_data["action"] not in ("accept", "deny"):  # DOT answered an empty 400
            form.add_error("action", "Choose Allow or Deny.")
            page: HttpResponse = self.form_invalid(form)
            page.status_code = 400
            return page
        device = self.get_object()  # before DOT changes its status (it is looked up by that status)
        client = client_by_client_id(device.client_id)
        refusal = _confirm_refusal(device, client)
        if refusal is not None:
            # DOT approved it all the same, and the approval was recorded as consent: an expired code then
            # gave nothing, but the app was listed as connected; a disabled client's code gave tokens once
            # the client was enabled again
            status, reason, message = refusal
            audit_record(
                kind="device.confirm_refused",
                outcome="denied",
                actor=actor_for_user(self.request.user),
                client_id=device.client_id,
                data={"reason": reason},
            )
            return self.render_to_response(self.get_context_data(form=form, refused=message), status=status)
        response: HttpResponse = super().form_valid(form)
        if client is None:
            return response
        if form.cleaned_data["action"] == "accept":
            consent_grant(user=self.request.user, client=client, scopes=device.scope.split())
        elif form.cleaned_data["action"] == "deny":
            audit_record(
                kind="consent.denied",
                outcome="denied",
                actor=actor_for_user(self.request.user),
                client_id=client.client_id,
                data={"scope": device.scope, "flow": "device"},
            )
        return response


def _confirm_refusal(device: Any, client: Client | None) -> tuple[int, str, str] | None:
    """Why a device grant may no longer be approved or denied (its status, reason and message), or None."""
    if device.is_expired():  # RFC 8628 §3.5: dead past ``expires``; DOT checked this on entry only
        return 410, "expired", "This code has expired. Start again on your device to get a new one."
    if client is None or client.disabled:
        return 400, "client disabled", "This app has been disabled. It can no longer be connected."
    return None


class DeviceAuthorizationView(FormEndpoint, dot_views.DeviceAuthorizationView):
    """RFC 8628 §3.1-3.2 device authorization: DOT's, with the checks it leaves out, audited, ``no-store``.

    oauthlib compares the Content-Type header with the media type exactly: no header was a ``KeyError``
    (a 500) and ``; charset=UTF-8`` a refusal. DOT stores whatever scope is asked, so a scope the client
    may not have reached the user's approval page and failed only at the token endpoint.
    """

    denied_kind = "device.denied"

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        media_type = (request.content_type or "").strip().lower()
        if media_type != FORM:
            response: HttpResponse = oauth_error("invalid_request", f"The Content-Type must be {FORM}")
        elif (refused := self._client_refused(request)) is not None:
            response = refused
        else:
            request.META["CONTENT_TYPE"] = FORM  # the form is read; oauthlib wants the bare media type
            response = super().post(request, *args, **kwargs)
        if response.status_code >= 400:
            audit_record(
                kind=self.denied_kind,
                outcome="denied",
                client_id=client_id_of(request),
                data={"error_code": error_code_of(response)},
            )
        return response

    @staticmethod
    def _client_refused(request: HttpRequest) -> HttpResponse | None:
        """An unknown or disabled client, a client registered without the device grant (DOT made it a device
        code all the same), or scopes it may not ask for. Which client: the one its Basic credentials name,
        else its client_id (``FormEndpoint`` has refused the two disagreeing)."""
        client = client_by_client_id(named_client_id(request))
        if client is None or client.disabled:
            return client_refused()  # RFC 8628 §3.2, RFC 6749 §5.2 (oauthlib: 400 invalid_request)
        if not client.allows_grant_type(GRANT_DEVICE_CODE):
            return oauth_error("unauthorized_client", "The client may not use the device authorization grant")
        scopes = request.POST.get("scope", "").split()
        if scopes and not client.may_ask_for(scopes):
            return oauth_error("invalid_scope", "The client may not ask for these scopes")
        return None


def device_entry(request: HttpRequest) -> HttpResponse:
    """The short verification URI (RFC 8628 §3.3) forwards to the device page, keeping ``user_code``."""
    from django.urls import reverse

    target = reverse("oauth2_provider:device")
    query = request.GET.urlencode()
    # a query no code needs (Django refused a redirect past 16,384 characters: a 400 page, an error logged)
    return redirect(f"{target}?{query}" if query and len(query) <= QUERY_MAX else target)
