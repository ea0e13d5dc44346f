"""Thin adapters over DOT's views: audit every outcome, remember consent, publish our key set and metadata."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import nullcontext
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from django.conf import settings
from django.contrib.auth import logout
from django.contrib.auth import views as auth_views
from django.contrib.auth.views import redirect_to_login
from django.core.cache import cache
from django.core.exceptions import BadRequest, MultipleObjectsReturned, SuspiciousOperation, ValidationError
from django.db import transaction
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.http.multipartparser import MultiPartParserError
from django.shortcuts import resolve_url
from django.utils.decorators import method_decorator
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.debug import sensitive_post_parameters
from django.views.decorators.http import require_GET
from django.views.generic import View
from oauth2_provider import views as dot_views
from oauth2_provider.exceptions import FatalClientError, OAuthToolkitError
from oauth2_provider.models import get_device_grant_model
from oauth2_provider.settings import oauth2_settings
from oauth2_provider.signals import app_authorized
from oauth2_provider.views.device import DeviceGrantForm
from oauth2_provider.views.metadata import OAuthServerMetadataView
from oauthlib.common import Request as OauthlibRequest
from oauthlib.oauth2.rfc6749.errors import ConsentRequired, InvalidClientIdError, LoginRequired
from redis.exceptions import RedisError

from audit.services import actor_for_user, audit_record
from authserver.models import AUTH_TIME_SESSION_KEY, Client, Consent
from authserver.registry import consent_details_for
from authserver.selectors import client_by_client_id, jwks_get
from authserver.services import consent_grant
from authserver.validators import access_tokens_issued, holds_nul, revocations_found

logger = logging.getLogger(__name__)

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
CONSUMING_GRANTS = frozenset({"authorization_code", "refresh_token"})


def oauth_error(error: str, description: str, status: int = 400) -> JsonResponse:
    """Return an RFC 6749 §5.2 error body with ``Cache-Control: no-store``."""
    response = JsonResponse({"error": error, "error_description": description}, status=status)
    response["Cache-Control"] = "no-store"
    response["Pragma"] = "no-cache"
    return response


def _error_code(response: HttpResponse) -> str:
    try:
        return str(json.loads(response.content).get("error", "unknown"))
    except (ValueError, AttributeError):
        return "unknown"


def _client_id_of(request: HttpRequest) -> str:
    return str(request.POST.get("client_id") or getattr(getattr(request, "client", None), "client_id", ""))[
        :100
    ]


FORM = "application/x-www-form-urlencoded"
FORM_ERRORS = (BadRequest, SuspiciousOperation, MultiPartParserError)  # what reading request.POST raises
REPEATABLE = frozenset({"resource"})  # RFC 8707 §2: one resource parameter per resource


def _form_refusal(request: HttpRequest) -> str | None:
    """Why a readable form is still a malformed request, or None. RFC 6749 §3.2: no parameter more than
    once (DOT passes oauthlib only the last, so ``scope=a&scope=b`` was read as ``b``); §2.3: one client
    authentication method (Basic credentials and a ``client_secret`` in the body are two)."""
    repeated = sorted(
        key for key, values in request.POST.lists() if len(values) > 1 and key not in REPEATABLE
    )
    if repeated:
        return f"The parameter {repeated[0][:40]!r} is repeated"
    basic = request.META.get("HTTP_AUTHORIZATION", "")[:6].lower() == "basic "
    if basic and "client_secret" in request.POST:
        return "The client authenticated twice (Basic credentials and a client_secret in the body)"
    return None


@method_decorator(csrf_exempt, name="dispatch")  # clients authenticate themselves, not with a cookie
class FormEndpoint(View):
    """An RFC endpoint that takes a form by POST (token, revocation, introspection, device authorization).

    Another method is 405 ``invalid_request`` with ``Allow``, and a body Django cannot read as a form (a
    charset other than UTF-8, multipart with no boundary, too many fields) or a malformed one
    (``_form_refusal``) is 400 ``invalid_request``; each JSON, ``no-store`` and audited as ``denied_kind``.
    Django alone answered them with an empty or an HTML page (a 500 in debug), and nothing was audited.
    OPTIONS passes (CORS preflight).
    """

    denied_kind = "token.denied"

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        if request.method not in ("POST", "OPTIONS"):
            response = oauth_error("invalid_request", "This endpoint takes POST only", status=405)
            response["Allow"] = "POST"
        else:
            try:
                request.POST  # noqa: B018 (parsed here, where its failure can be answered)
            except FORM_ERRORS:
                response = oauth_error("invalid_request", f"The body must be a UTF-8 {FORM} form")
            else:
                refusal = _form_refusal(request)
                if refusal is None:
                    return self.form_dispatch(request, *args, **kwargs)
                response = oauth_error("invalid_request", refusal)
        audit_record(kind=self.denied_kind, outcome="denied", data={"error_code": "invalid_request"})
        return response

    def form_dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        return super().dispatch(request, *args, **kwargs)


def _polled_too_soon(device_code: str, interval: int) -> bool:
    """Whether this device code was polled within its interval (RFC 8628 §3.5), counted in the cache: Redis,
    which every process shares, when configured. A courtesy to the server: if the cache fails, no."""
    key = "portcullis:device-poll:" + hashlib.sha256(device_code.encode()).hexdigest()
    try:  # a second's grace: a client that polls every ``interval`` s, timed from its sends, is not slowed
        return not cache.add(key, 1, timeout=max(1, interval - 1))
    except (RedisError, OSError):
        logger.warning("the cache did not answer; a device poll was not paced")
        return False


class TokenView(FormEndpoint, dot_views.TokenView):
    """RFC 6749 §3.2 token endpoint; every refusal is audited with its RFC error code."""

    @method_decorator(sensitive_post_parameters("password", "client_secret"))
    def authorization_flow_token_response(
        self, request: HttpRequest, *args: Any, **kwargs: Any
    ) -> HttpResponse:
        # DOT's, except that DOT reads the token row it has just written back by its checksum to announce
        # it (one more query per token); the validator hands the row over instead. A grant that consumes a
        # credential (a code, a refresh token) runs in one transaction, in which the validator locks that
        # credential: a second use at the same moment waits for the first and is then seen as a replay.
        consumes = request.POST.get("grant_type") in CONSUMING_GRANTS
        with transaction.atomic() if consumes else nullcontext(), access_tokens_issued() as issued:
            _uri, headers, body, status = self.create_token_response(request)
        if status == 200 and issued:
            app_authorized.send(sender=self, request=request, token=issued[-1])
        response = HttpResponse(content=body, status=status)
        for name, value in headers.items():
            response[name] = value
        return response

    def device_flow_token_response(
        self, request: HttpRequest, device_code: str, *args: Any, **kwargs: Any
    ) -> HttpResponse:
        """DOT's, made single-use, bound to its client and to its lifetime (RFC 8628 §3.4-3.5).

        DOT finds the grant by its code alone, never checks ``expires`` and leaves an approved grant
        approved: every poll got a new token, from any client that named the code. Here the grant's row is
        locked while it is redeemed, a token the validator issued to a client other than the one the code
        was issued to is rolled back, and a code that gave its token is deleted (a replay is then an
        unknown code: ``invalid_grant``). A pending code polled again within its interval is ``slow_down``
        (DOT leaves that as a to-do)."""
        with transaction.atomic():
            grant = (
                get_device_grant_model().objects.select_for_update().filter(device_code=device_code).first()
            )
            if grant is not None:
                grant.is_expired()  # marks it expired once past ``expires``; DOT then answers expired_token
                if grant.status == grant.AUTHORIZATION_PENDING and _polled_too_soon(
                    device_code, grant.interval
                ):
                    return oauth_error("slow_down", f"Poll at most every {grant.interval} s; wait 5 s more")
            with access_tokens_issued() as issued:
                response: HttpResponse = super().device_flow_token_response(
                    request, device_code, *args, **kwargs
                )
            if grant is None or response.status_code != 200:
                return response
            if not issued or issued[-1].application.client_id != grant.client_id:
                transaction.set_rollback(True)  # the token, its refresh token and its audit event
                return oauth_error("invalid_grant", "The device code was issued to another client")
            grant.delete()
        return response

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        grant_type = request.POST.get("grant_type", "")
        if holds_nul(request.POST.lists()):  # a form field's name or value
            # No code, token or id holds one, and PostgreSQL answers a lookup of one with an error (a 500).
            response: HttpResponse = oauth_error("invalid_request", "A parameter holds a NUL character")
        elif grant_type == DEVICE_GRANT and not request.POST.get("device_code"):
            response = oauth_error("invalid_request", "device_code is required")
        else:
            response = super().post(request, *args, **kwargs)
        if response.status_code == 404:  # DOT answers an unknown device code with a non-RFC 404
            response = oauth_error("invalid_grant", "The device code is unknown or expired")
        response["Cache-Control"] = "no-store"
        response["Content-Type"] = "application/json"  # DOT's own refusals (a bad resource) said text/html
        if response.status_code >= 400:
            error = _error_code(response)
            if error not in {"authorization_pending", "slow_down"}:  # RFC 8628 §3.5: polling, not failure
                audit_record(
                    kind="token.denied",
                    outcome="denied",
                    client_id=_client_id_of(request),
                    data={"grant_type": grant_type[:60], "error_code": error},
                )
        return response


class RevokeTokenView(FormEndpoint, dot_views.RevokeTokenView):
    """RFC 7009 revocation; revoking a refresh token revokes its whole family's access tokens."""

    denied_kind = "token.revoke_denied"

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        with revocations_found() as found:
            response: HttpResponse = super().post(request, *args, **kwargs)
        response["Cache-Control"] = "no-store"
        ok = response.status_code == 200
        revoked = ok and any(found)  # RFC 7009 §2.2: 200 also for an unknown token or another client's
        audit_record(
            kind="token.revoked" if revoked else ("token.revoke_unknown" if ok else "token.revoke_denied"),
            outcome="success" if revoked else "denied",
            client_id=_client_id_of(request),
            data={"token_type_hint": request.POST.get("token_type_hint", "")[:20], "via": "rfc7009"},
        )
        return response


USER_CODE_WRONG_MAX = 10  # wrong user codes a user may enter within the window, then a pause
USER_CODE_WINDOW_S = 900


class DeviceUserCodeForm(DeviceGrantForm):
    """DOT's form, for a code several grants share (DOT's user codes are not unique, and old grants keep
    theirs): its lookup raised MultipleObjectsReturned, a 500. The one pending grant among them is the one
    meant; with none, or several, the code is wrong. (A NUL is refused by the form field itself.)"""

    def clean_user_code(self) -> Any:
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

    def form_valid(self, form: Any) -> HttpResponse:
        device = self.get_object()  # before DOT changes its status (it is looked up by that status)
        response: HttpResponse = super().form_valid(form)
        client = client_by_client_id(device.client_id)
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
        elif (refused := self._scope_refused(request)) is not None:
            response = refused
        else:
            request.META["CONTENT_TYPE"] = FORM  # the form is read; oauthlib wants the bare media type
            response = super().post(request, *args, **kwargs)
        response["Cache-Control"] = "no-store"  # it holds the device code
        if response.status_code >= 400:
            audit_record(
                kind=self.denied_kind,
                outcome="denied",
                client_id=_client_id_of(request),
                data={"error_code": _error_code(response)},
            )
        return response

    @staticmethod
    def _scope_refused(request: HttpRequest) -> HttpResponse | None:
        scopes = request.POST.get("scope", "").split()
        client = client_by_client_id(str(request.POST.get("client_id", ""))) if scopes else None
        if client is None:
            return None  # no scope asked (the client's defaults), or an unknown client: DOT answers
        if not client.may_ask_for(scopes):
            return oauth_error("invalid_scope", "The client may not ask for these scopes")
        return None


class IntrospectView(FormEndpoint, dot_views.IntrospectTokenView):
    """RFC 7662 introspection: POST only, and only for clients an admin allowed to introspect."""

    denied_kind = "introspect.denied"
    http_method_names = ["post", "options"]  # what OPTIONS advertises in Allow

    def form_dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        # Not DOT's: it would ask for a bearer token. The client authenticates as RFC 7662 §2.1 says.
        return View.dispatch(self, request, *args, **kwargs)

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        client = self._authenticated_client(request)
        if client is None:
            response = self._denied("", "invalid_client", "Client authentication failed", 401)
            response["WWW-Authenticate"] = 'Basic realm="portcullis"'
            return response
        if not client.can_introspect:
            return self._denied(
                client.client_id, "unauthorized_client", "This client may not introspect", 403
            )
        if not request.POST.get("token"):  # RFC 7662 §2.1: REQUIRED
            return self._denied(client.client_id, "invalid_request", "token is required", 400)
        answer: HttpResponse = self.get_token_response(request.POST.get("token"))
        answer["Cache-Control"] = "no-store"
        return answer

    def _denied(self, client_id: str, error: str, description: str, status: int) -> JsonResponse:
        audit_record(kind=self.denied_kind, outcome="denied", client_id=client_id, data={"error_code": error})
        return oauth_error(error, description, status=status)

    def _authenticated_client(self, request: HttpRequest) -> Client | None:
        """Authenticate the calling client (RFC 7662 §2.1) and return it, or None."""
        core = self.get_oauthlib_core()
        uri, http_method, body, headers = core._extract_params(request)
        oauthlib_request = OauthlibRequest(uri, http_method, body, headers)
        if not core.server.request_validator.authenticate_client(oauthlib_request):
            return None
        client = getattr(oauthlib_request, "client", None)
        return client if isinstance(client, Client) else None


class UserInfoView(dot_views.UserInfoView):
    """OIDC userinfo: DOT's, with its answers labelled JSON, kept out of caches, and its refusals audited."""

    def _create_userinfo_response(self, request: HttpRequest) -> HttpResponse:
        response: HttpResponse = super()._create_userinfo_response(request)
        response["Cache-Control"] = "no-store"  # claims about the user
        if response.content[:1] == b"{":
            response["Content-Type"] = "application/json"
        if response.status_code >= 400:
            audit_record(
                kind="userinfo.denied",
                outcome="denied",
                data={"error_code": _error_code(response), "status": response.status_code},
            )
        return response


class AuthorizationView(dot_views.AuthorizationView):
    """Authorization endpoint with a consent screen whose answer is remembered per user and client."""

    template_name = "authserver/consent.html"

    def get(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        if request.user.is_authenticated and self._signed_in_too_long_ago():
            # OIDC Core §3.1.2.1 max_age: as prompt=login, once the request is known to be valid (as DOT
            # validates it before its own prompt=login); without a page (prompt=none), login_required
            try:
                _scopes, credentials = self.validate_authorization_request(request)
            except OAuthToolkitError as error:
                return self.error_response(error, None)
            if "none" not in self._prompt():
                return self.handle_prompt_login()
            refusal = OAuthToolkitError(
                LoginRequired(state=credentials.get("state")), redirect_uri=credentials["redirect_uri"]
            )
            return self.error_response(refusal, client_by_client_id(credentials["client_id"]))
        if "approval_prompt" in request.GET:
            # DOT's own skip: approval_prompt=auto issued a code without the consent page whenever the user
            # held a live token for the client, prompt=consent or withdrawn consent notwithstanding. The
            # client must not choose that; remembered consent (authserver.Consent) decides instead.
            query = request.GET.copy()
            query.pop("approval_prompt")
            request.GET = query  # type: ignore[assignment]  # django-stubs: GET is typed immutable
        response: HttpResponseBase = super().get(request, *args, **kwargs)
        return response

    def _prompt(self) -> set[str]:
        """The request's ``prompt`` values (OIDC Core §3.1.2.1: space-delimited)."""
        return set(self.request.GET.get("prompt", "").split())

    def _signed_in_too_long_ago(self) -> bool:
        raw = self.request.GET.get("max_age", "")
        if not raw.isdigit() or not raw.isascii():
            return False  # none, or not a number of seconds: nothing to enforce
        signed_in = self.request.session.get(AUTH_TIME_SESSION_KEY)
        return not isinstance(signed_in, int) or time.time() - signed_in > int(raw)

    def handle_no_permission(self) -> HttpResponseBase:
        if "max_age" in self.request.GET and not self._prompt() & {"none", "create"}:
            return self.handle_prompt_login()  # signing in satisfies max_age: it leaves the next URL
        response: HttpResponseBase = super().handle_no_permission()
        return response

    def handle_prompt_login(self) -> HttpResponseBase:
        """prompt=login, or a max_age the session's sign-in is older than: the user signs in again.
        DOT only sent a signed-in user to the login page, which sends a signed-in user straight back, so a
        code was issued without the fresh sign-in the client asked for. (oauthlib refuses prompt=login
        with prompt=none before this; a max_age with prompt=none is answered in ``get``.)"""
        logout(self.request)
        query = self.request.GET.copy()
        for satisfied in ("prompt", "max_age"):  # by the sign-in it leads to; kept, they would loop
            query.pop(satisfied, None)
        target = f"{self.request.path}?{query.urlencode()}"
        return redirect_to_login(target, resolve_url(self.get_login_url()), self.get_redirect_field_name())

    def render_to_response(self, context: dict[str, Any], **kwargs: Any) -> HttpResponse:
        if "application" not in context:  # DOT renders a fatal error (no trustworthy redirect URI) here
            return super().render_to_response(context, **kwargs)
        client: Client = context["application"]
        scopes: list[str] = context["scopes"]
        prompt = self._prompt()
        consent = Consent.objects.filter(user=self.request.user, client=client).first()
        if "none" in prompt and (consent is None or not consent.covers(scopes)):
            # OIDC Core §3.1.2.1: prompt=none shows no page; the consent page would be one.
            error = ConsentRequired(state=context.get("state"))
            return self.error_response(OAuthToolkitError(error, redirect_uri=context["redirect_uri"]), client)
        if consent is not None and consent.covers(scopes) and "consent" not in prompt:
            credentials = {k: context[k] for k in self._credential_keys if context.get(k) is not None}
            if "resource" in self.request.GET:  # RFC 8707: a list, as DOT's own skip path passes it
                credentials["resource"] = self.request.GET.getlist("resource")
            try:  # what DOT's own skip path catches: the request's remaining checks (PKCE method, ...)
                uri, _headers, _body, _status = self.create_authorization_response(
                    request=self.request, scopes=" ".join(scopes), credentials=credentials, allow=True
                )
            except OAuthToolkitError as error:
                return self.error_response(error, client)
            return self.redirect(uri, client)
        context["scope_items"] = list(zip(scopes, context["scopes_descriptions"], strict=True))
        context["extra_details"] = consent_details_for(client)
        return super().render_to_response(context, **kwargs)

    _credential_keys = (
        "client_id",
        "redirect_uri",
        "response_type",
        "state",
        "code_challenge",
        "code_challenge_method",
        "nonce",
    )

    def form_valid(self, form: Any) -> HttpResponse:
        client = client_by_client_id(form.cleaned_data["client_id"])
        if client is None:  # the form's hidden fields are the user's to change (DOT's lookup was a 500)
            return self.error_response(FatalClientError(error=InvalidClientIdError()), None)
        scopes = form.cleaned_data.get("scope", "").split()
        if form.cleaned_data.get("allow"):
            self._consented = (client, scopes)  # remembered once oauthlib has accepted the request
        else:
            audit_record(
                kind="consent.denied",
                outcome="denied",
                actor=actor_for_user(self.request.user),
                client_id=client.client_id,
                data={"scope": " ".join(scopes)},
            )
        return super().form_valid(form)

    _consented: tuple[Client, list[str]] | None = None

    def create_authorization_response(
        self, request: HttpRequest, scopes: str, credentials: dict[str, Any], allow: bool
    ) -> tuple[str, dict[str, str], Any, int]:
        """DOT's, with its outcome recorded. oauthlib validates the request again (the consent form's
        fields could have been changed) and answers a refusal as a redirect, not an exception: that is
        audited as ``authorize.denied``, and only an accepted request's scopes are remembered as consent
        (the consent was recorded before, whatever oauthlib then refused, even a scope the client may not
        have)."""
        # What only this view knows, for the code's record: the session's sign-in (the ID token's
        # auth_time) and whether the request named its redirect URI (then the token request must, RFC 6749
        # §4.1.3). The consent form posts back to the request's own URL, so its query is the request's;
        # the form's redirect_uri field is always filled in.
        signed_in = self.request.session.get(AUTH_TIME_SESSION_KEY)
        credentials = {
            **credentials,
            "auth_time": signed_in if isinstance(signed_in, int) else None,
            "redirect_uri_given": "redirect_uri" in self.request.GET,
        }
        answer: tuple[str, dict[str, str], Any, int] = super().create_authorization_response(
            request, scopes, credentials, allow
        )
        query = dict(parse_qsl(urlsplit(answer[0] or "").query))
        client_id = str(credentials.get("client_id", ""))[:100]
        if "error" in query and "code" not in query:
            audit_record(
                kind="authorize.denied",
                outcome="denied",
                actor=actor_for_user(self.request.user),
                client_id=client_id,
                data={"error_code": query["error"][:60]},
            )
        elif self._consented is not None:
            client, consented = self._consented
            consent_grant(user=self.request.user, client=client, scopes=consented)
        return answer

    def redirect(self, redirect_to: str, application: Any) -> HttpResponse:
        # An error found while the request was validated comes without its client (DOT passes None), though
        # oauthlib has checked the client and its redirect URI before any error it redirects. That client's
        # schemes decide, not the https-only default, which refused a native app's loopback URI (RFC 8252).
        if application is None:
            application = client_by_client_id(self.request.GET.get("client_id"))
        response: HttpResponse = super().redirect(_with_iss(redirect_to, self.request), application)
        return response

    def error_response(self, error: Any, application: Any, **kwargs: Any) -> HttpResponse:
        oauthlib_error = getattr(error, "oauthlib_error", None)
        audit_record(
            kind="authorize.denied",
            outcome="denied",
            actor=actor_for_user(self.request.user),
            client_id=str(getattr(application, "client_id", "") or self.request.GET.get("client_id", ""))[
                :100
            ],
            data={"error_code": str(getattr(oauthlib_error, "error", "invalid_request"))},
        )
        return super().error_response(error, application, **kwargs)


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


def _with_iss(uri: str, request: HttpRequest) -> str:
    """The redirect to the client with the RFC 9207 ``iss`` parameter, which §2 asks of error responses
    too: DOT adds it to the answers oauthlib builds, not to the errors it redirects itself."""
    if "iss" in dict(parse_qsl(urlsplit(uri).query, keep_blank_values=True)):
        return uri
    issuer = oauth2_settings.oauth2_authorization_server_issuer(request)
    return uri + ("&" if "?" in uri else "?") + urlencode({"iss": issuer})


@never_cache
@require_GET
def jwks(request: HttpRequest) -> JsonResponse:
    """Publish the signing keys (RFC 7517): pending ones before they sign, retired ones until unused."""
    response = JsonResponse(jwks_get())
    response["Access-Control-Allow-Origin"] = "*"
    return response


class ServerMetadataView(OAuthServerMetadataView):
    """RFC 8414 metadata, with our JWKS, device, userinfo and protected-resource links."""

    def get(self, request: HttpRequest, *args: Any, **kwargs: Any) -> JsonResponse:
        response = super().get(request, *args, **kwargs)
        data = json.loads(response.content)
        data.update(metadata_extras())
        return JsonResponse(data, headers={"Access-Control-Allow-Origin": "*"})


class OIDCDiscoveryView(dot_views.ConnectDiscoveryInfoView):
    """OpenID Connect discovery, with the same extras as the RFC 8414 document."""

    def get(self, request: HttpRequest, *args: Any, **kwargs: Any) -> JsonResponse:
        response = super().get(request, *args, **kwargs)
        data = json.loads(response.content)
        data.update(metadata_extras())
        data["id_token_signing_alg_values_supported"] = ["RS256"]
        # Absent, OIDC Discovery §3 reads it as authorization code and implicit; implicit is not served here.
        rfc8414 = json.loads(OAuthServerMetadataView().get(request).content)
        data["grant_types_supported"] = rfc8414["grant_types_supported"]
        return JsonResponse(data, headers={"Access-Control-Allow-Origin": "*"})


def metadata_extras() -> dict[str, Any]:
    """Return the endpoints DOT's metadata does not know about."""
    base = settings.PORTCULLIS_ISSUER
    return {
        "issuer": base,
        "jwks_uri": f"{base}/.well-known/jwks.json",
        "device_authorization_endpoint": f"{base}/oauth/device-authorization/",
        "userinfo_endpoint": f"{base}/oauth/userinfo/",
        # DOT's RFC 8414 document has these; its OIDC discovery document did not
        "revocation_endpoint": f"{base}/oauth/revoke/",
        "introspection_endpoint": f"{base}/oauth/introspect/",
        "code_challenge_methods_supported": ["S256"],
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
        "protected_resources": [settings.PORTCULLIS_AUDIENCE],
    }


@require_GET
def protected_resource_metadata(request: HttpRequest) -> JsonResponse:
    """RFC 9728 metadata describing the gateway as a protected resource."""
    return JsonResponse(
        {
            "resource": settings.PORTCULLIS_AUDIENCE,
            "authorization_servers": [settings.PORTCULLIS_ISSUER],
            "scopes_supported": ["models.read", "completions", "embeddings"],
            "bearer_methods_supported": ["header"],
            "resource_name": "Portcullis OpenAI-compatible gateway",
        },
        headers={"Access-Control-Allow-Origin": "*"},
    )


class LoginView(auth_views.LoginView):
    template_name = "registration/login.html"
    redirect_authenticated_user = True


def device_entry(request: HttpRequest) -> HttpResponse:
    """The short verification URI (RFC 8628 §3.3) forwards to the device page, keeping ``user_code``."""
    from django.shortcuts import redirect
    from django.urls import reverse

    target = reverse("oauth2_provider:device")
    query = request.GET.urlencode()
    return redirect(f"{target}?{query}" if query else target)
