"""The authorization endpoint (RFC 6749 §4.1) and its consent page: consent remembered per user and
client, OIDC ``prompt`` and ``max_age`` honoured, every outcome audited, ``iss`` on every redirect."""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from django.contrib.auth.views import redirect_to_login
from django.core.signing import BadSignature, Signer
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.shortcuts import resolve_url
from django.urls import reverse
from oauth2_provider import views as dot_views
from oauth2_provider.exceptions import FatalClientError, OAuthToolkitError
from oauth2_provider.settings import oauth2_settings
from oauthlib.oauth2.rfc6749.errors import (
    ConsentRequired,
    InvalidClientIdError,
    InvalidRequestFatalError,
    LoginRequired,
)

from audit.services import actor_for_user, audit_record
from authserver.models import AUTH_TIME_SESSION_KEY, Client, Consent, uri_parses
from authserver.registry import consent_details_for
from authserver.selectors import client_by_client_id
from authserver.services import consent_grant
from authserver.validators import session_user_known
from authserver.views.common import query_refusal

# prompt=login or an exceeded max_age sends the user to sign in again, and the request comes back with this
# parameter: the moment (Unix seconds, signed by this server) the session's sign-in must not be older than.
SIGN_IN_AFTER = "sign_in_after"
_sign_in_after = Signer(salt="authserver.authorize.sign_in_after")


def asks_for_a_new_sign_in(url: str) -> bool:
    """Whether ``url`` (the sign-in page's next URL) is an authorization request waiting for a new sign-in:
    the sign-in page then asks a signed-in user too, instead of sending them straight back."""
    parts = urlsplit(url)
    authorize = reverse("oauth2_provider:authorize")
    return parts.path == authorize and SIGN_IN_AFTER in dict(parse_qsl(parts.query))


class AuthorizationView(dot_views.AuthorizationView):
    """Authorization endpoint with a consent screen whose answer is remembered per user and client."""

    template_name = "authserver/consent.html"

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        refusal = query_refusal(request)
        if refusal is not None:  # oauthlib would raise reading it (a 500): a page, as for a bad client
            return self.error_response(FatalClientError(InvalidRequestFatalError(description=refusal)), None)
        if SIGN_IN_AFTER in request.GET and request.user.is_authenticated and not self._signed_in_since():
            # Back from the sign-in page without signing in (or with a marker this server did not sign):
            # to the sign-in page again, for the consent page's GET and its POST alike
            return self.handle_prompt_login()
        response: HttpResponseBase = super().dispatch(request, *args, **kwargs)
        return response

    def handle_prompt_create(self) -> HttpResponseBase:
        """prompt=create (OIDC Prompt Create 1.0) is not offered: §4.1.1's invalid_request, as a 400 page
        the user sees, audited. DOT answered the browser a bare JSON body, and audited nothing."""
        unsupported = InvalidRequestFatalError(description="prompt=create is not supported")
        return self.error_response(FatalClientError(unsupported), None)

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
        # The id_token_hint is checked against the session's user (validators.validate_user_match); with
        # prompt=login, against the user who signs in next, when the request comes back without it.
        signing_in_again = "login" in self._prompt()
        with nullcontext() if signing_in_again else session_user_known(request.user):
            response: HttpResponseBase = super().get(request, *args, **kwargs)
        return response

    def _prompt(self) -> set[str]:
        """The request's ``prompt`` values (OIDC Core §3.1.2.1: space-delimited)."""
        return set(self.request.GET.get("prompt", "").split())

    def _signed_in_since(self) -> bool:
        """Whether the session's sign-in is no older than the request's ``sign_in_after`` (seconds, as the
        ID token's auth_time: a sign-in in the same second counts)."""
        try:
            after = int(_sign_in_after.unsign(self.request.GET[SIGN_IN_AFTER]))
        except (BadSignature, ValueError):
            return False
        signed_in = self.request.session.get(AUTH_TIME_SESSION_KEY)
        return isinstance(signed_in, int) and signed_in >= after

    def _signed_in_too_long_ago(self) -> bool:
        raw = self.request.GET.get("max_age", "")
        if not raw.isdigit() or not raw.isascii():
            return False  # none, or not a number of seconds: nothing to enforce
        signed_in = self.request.session.get(AUTH_TIME_SESSION_KEY)
        # past 19 digits it is longer than any sign-in's age (and int() refuses 4,300 digits: a 500)
        seconds = int(raw.lstrip("0")[:19] or "0")
        return not isinstance(signed_in, int) or time.time() - signed_in > seconds

    def handle_no_permission(self) -> HttpResponseBase:
        if "max_age" in self.request.GET and not self._prompt() & {"none", "create"}:
            return self.handle_prompt_login()  # signing in satisfies max_age: it leaves the next URL
        response: HttpResponseBase = super().handle_no_permission()
        return response

    def handle_prompt_login(self) -> HttpResponseBase:
        """prompt=login, or a max_age the session's sign-in is older than: the user signs in again.
        DOT only sent a signed-in user to the login page, which sends a signed-in user straight back, so a
        code was issued without the fresh sign-in the client asked for. Signing the user out first (as
        this did before) let any page end the session with a GET; instead the request comes back with
        ``sign_in_after`` = now, signed, and is sent to sign in again until the session's sign-in is that
        recent. (oauthlib refuses prompt=login with prompt=none before this; a max_age with prompt=none is
        answered in ``get``.)"""
        query = self.request.GET.copy()
        query.pop("max_age", None)  # satisfied by the sign-in this leads to; kept, max_age=0 would loop
        others = [value for value in query.pop("prompt", [""])[-1].split() if value != "login"]
        if others:  # prompt=consent still shows the consent page after the sign-in
            query["prompt"] = " ".join(others)
        query[SIGN_IN_AFTER] = _sign_in_after.sign(str(int(time.time())))
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
        if not all(map(uri_parses, (form.cleaned_data.get("resource") or "").split())):
            # the request's own resources passed when the page was shown: a field changed into no URI
            # (DOT's parse of "https://[zz]/" was a 500; one that parses goes back invalid_target)
            refused = InvalidRequestFatalError(description="The resource field holds no URI")
            return self.error_response(FatalClientError(error=refused), None)
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


def _with_iss(uri: str, request: HttpRequest) -> str:
    """The redirect to the client with the RFC 9207 ``iss`` parameter, which §2 asks of error responses
    too: DOT adds it to the answers oauthlib builds, not to the errors it redirects itself."""
    if "iss" in dict(parse_qsl(urlsplit(uri).query, keep_blank_values=True)):
        return uri
    issuer = oauth2_settings.oauth2_authorization_server_issuer(request)
    return uri + ("&" if "?" in uri else "?") + urlencode({"iss": issuer})
