"""OpenID Connect RP-Initiated Logout 1.0 at ``/oauth/logout/`` (discovery's ``end_session_endpoint``): DOT's
view, with the ID token hint checked against every published key, the page asking before a session ends
unless the client proves the request comes from this very session, the user's tokens at that client
revoked, a ``post_logout_redirect_uri`` followed only when registered, and every outcome audited."""

from __future__ import annotations

import time
from typing import Any

from django.contrib import messages
from django.contrib.auth import get_user_model, logout
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse, HttpResponseBase, QueryDict
from django.middleware.csrf import CsrfViewMiddleware
from django.shortcuts import redirect
from django.utils.decorators import method_decorator
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt
from oauth2_provider import views as dot_views
from oauth2_provider.exceptions import (
    ClientIdMissmatch,
    InvalidIDTokenError,
    InvalidOIDCClientError,
    InvalidOIDCRedirectURIError,
    LogoutDenied,
    OIDCError,
)
from oauth2_provider.http import OAuth2ResponseRedirect
from oauth2_provider.settings import oauth2_settings
from oauthlib.common import add_params_to_uri

from audit.services import actor_for_user, audit_record
from authserver.models import AUTH_TIME_SESSION_KEY, SIGN_OUT_DETAILS, Client
from authserver.selectors import client_by_client_id
from authserver.services import tokens_revoke_for_user
from authserver.tokens import id_token_hint_claims

LOGOUT_PARAMETERS = ("id_token_hint", "client_id", "post_logout_redirect_uri", "state")


class _CsrfCheck(CsrfViewMiddleware):
    """Django's CSRF check, asked by the view itself, answering the reason instead of the failure page (an
    RP's logout request sent by POST is expected to fail it, and is not a forgery to record)."""

    def _reject(self, request: HttpRequest, reason: str) -> Any:
        return reason


def _csrf_passes(request: HttpRequest) -> bool:
    """Whether a POST carries this site's CSRF token (the confirmation page's form), as Django checks it."""

    def unused(_request: HttpRequest) -> HttpResponse:  # the middleware's next step: never called here
        return HttpResponse()

    check = _CsrfCheck(unused)
    check.process_request(request)
    return check.process_view(request, unused, (), {}) is None  # not csrf_exempt: checked in full


@method_decorator(csrf_exempt, name="dispatch")  # checked in post(): an RP's POST is a logout request
@method_decorator(never_cache, name="dispatch")  # the page holds the hint; every answer is one user's
class RPInitiatedLogoutView(dot_views.RPInitiatedLogoutView):
    """End the user's session here at a relying party's request (GET or POST, §2), and send the user back
    to a ``post_logout_redirect_uri`` registered for that client, with its ``state``.

    A GET with an ``id_token_hint`` from the session being ended signs out at once; any other request shows
    a page (``authserver/logout_confirm.html``) whose CSRF-protected form signs out only when the user says
    so, so that no site can end a session with a link alone (as ``AuthorizationView.handle_prompt_login``
    refuses to). A POST without this site's CSRF token is a relying party's request, read as the GET one
    is; as its session cookie is ``SameSite=Lax``, a browser withholds it from another site's POST, so the
    page is shown there even to a user who seems signed out, and the click on it, from this site, carries
    the session."""

    template_name = "authserver/logout_confirm.html"
    hint: dict[str, Any] | None = None  # the id_token_hint's claims, verified (id_token_hint_claims)
    client: Client | None = None  # the client the request names, once known: the refusal's record names it

    def get(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        return self._logout_request(request.GET)

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        if not _csrf_passes(request):
            return self._logout_request(request.POST)
        response: HttpResponseBase = super().post(request, *args, **kwargs)  # the page's form: form_valid
        return response

    def _logout_request(self, params: QueryDict) -> HttpResponseBase:
        """A relying party's logout request (§2): refused, answered at once, or asked about on the page."""
        hint, client_id, uri, state = (params.get(name) or None for name in LOGOUT_PARAMETERS)
        try:
            application, token_user = self.validate_logout_request(hint, client_id, uri)
        except OIDCError as error:
            return self.error_response(error)
        if not self.must_prompt(token_user):
            return self.do_logout(application, uri, state, token_user)
        self.oidc_data = dict(zip(LOGOUT_PARAMETERS, (hint, client_id, uri, state), strict=True))
        form = self.get_form_class()(initial=self.get_initial())  # unbound: an RP's POST is no answer
        return self.render_to_response(self.get_context_data(form=form, application=application))

    def form_valid(self, form: Any) -> HttpResponseBase:
        """The page's own form (its CSRF token checked): the request it carries is checked again, and the
        user's button decides, whatever the hint says."""
        data = form.cleaned_data
        uri, state = data.get("post_logout_redirect_uri") or None, data.get("state") or None
        try:
            application, token_user = self.validate_logout_request(
                data.get("id_token_hint") or None, data.get("client_id") or None, uri
            )
        except OIDCError as error:
            return self.error_response(error)
        if not data.get("allow"):
            return self.error_response(LogoutDenied())
        return self.do_logout(application, uri, state, token_user)

    def validate_logout_request(
        self, id_token_hint: str | None, client_id: str | None, post_logout_redirect_uri: str | None
    ) -> tuple[Client | None, Any]:
        """Return the client the request comes from (the ``client_id``, else the hint's ``aud``) and the
        user the hint names, or raise what §2 refuses: a hint this server did not issue, a ``client_id``
        other than the hint's, a client unknown or disabled, a ``post_logout_redirect_uri`` not registered
        for the client (DOT's ``validate_post_logout_redirect_uri``, with ``Client``'s exact comparison).
        DOT read the hint with the active key alone (a hint signed before a rotation was refused), needed
        its ID token row (deleted by a refresh), and answered an unknown ``client_id`` with a 500."""
        self.hint, self.client = None, None
        audience = None
        if id_token_hint is not None:
            self.hint = id_token_hint_claims(id_token_hint)
            if self.hint is None or not self._hint_in_date(self.hint):
                raise InvalidIDTokenError()
            audience = self.hint.get("aud")  # oauthlib names the one client, as a string
            if client_id is not None and client_id != audience:
                raise ClientIdMissmatch()
        named = client_id or (audience if isinstance(audience, str) else None)
        found = client_by_client_id(named) if named else None
        self.client = found if found is not None and not found.disabled else None
        if client_id is not None and self.client is None:
            raise InvalidOIDCClientError()
        self.validate_post_logout_redirect_uri(self.client, post_logout_redirect_uri)
        return self.client, _user_of(self.hint)

    def validate_post_logout_redirect_uri(self, application: Any, post_logout_redirect_uri: Any) -> None:
        try:
            super().validate_post_logout_redirect_uri(application, post_logout_redirect_uri)
        except ValueError:  # DOT's urlparse of a broken one ("https://[zz]/") was a 500
            raise InvalidOIDCRedirectURIError("The post_logout_redirect_uri is not a URI.") from None

    @staticmethod
    def _hint_in_date(claims: dict[str, Any]) -> bool:
        """§2: an expired hint SHOULD be taken (OIDC_RP_INITIATED_LOGOUT_ACCEPT_EXPIRED_TOKENS, on here)."""
        if oauth2_settings.OIDC_RP_INITIATED_LOGOUT_ACCEPT_EXPIRED_TOKENS:
            return True
        return isinstance(claims.get("exp"), int) and claims["exp"] > time.time()

    def must_prompt(self, token_user: Any) -> bool:
        """Whether to ask the user (§2: the OP MUST ask unless the hint belongs to the current OP session
        with the RP and to the signed-in user). Belonging to this session is its ``auth_time`` being the
        session's sign-in: DOT asked only whether the hint named the same user, so an old ID token of
        theirs (from a log, a Referer, a browser's storage, valid for ever as hints are) ended every later
        session by a link. A GET that shows no session has nothing to end; a relying party's POST may have
        been sent without the session cookie (``SameSite=Lax``), so it is asked about on the page."""
        user = self.request.user
        if not user.is_authenticated:
            return self.request.method == "POST"
        if oauth2_settings.OIDC_RP_INITIATED_LOGOUT_ALWAYS_PROMPT or token_user is None or token_user != user:
            return True
        signed_in = self.request.session.get(AUTH_TIME_SESSION_KEY)
        return not isinstance(signed_in, int) or (self.hint or {}).get("auth_time") != signed_in

    def do_logout(
        self,
        application: Client | None = None,
        post_logout_redirect_uri: str | None = None,
        state: str | None = None,
        token_user: Any = None,
    ) -> HttpResponseBase:
        """End the session, revoke what the signed-out user holds at the client that asked, and send the
        user to the registered ``post_logout_redirect_uri`` with ``state``, else to the sign-in page.

        Revoked: the access and refresh tokens (and codes not yet redeemed) the user holds at that client,
        as DOT's ``OIDC_RP_INITIATED_LOGOUT_DELETE_TOKENS`` does, but there only. Signing out of an app is
        the user saying it should act for them no more, and an app that keeps its tokens in the browser
        (a public client) leaves them behind on a shared machine; the app asked for it too. DOT revoked the
        user's tokens at every client, the CLI signed in by the device flow among them, which signing out
        of one web app should not touch. Consent stays: signing in again is not asking anew. Nothing is
        revoked when no one is signed in here: a hint alone, possibly old and leaked, proves no one's wish.
        """
        request = self.request
        user = request.user if request.user.is_authenticated else None
        if user is not None and _ends_access(application):
            tokens_revoke_for_user(
                user=user, client=application, actor=actor_for_user(user), reason="signed out of the client"
            )
        # the sign-out's audit record (receivers.logout_succeeded) says which client asked
        setattr(request, SIGN_OUT_DETAILS, {"client_id": application.client_id if application else ""})
        logout(request)
        if post_logout_redirect_uri and application is not None:  # registered: validate_logout_request
            target = post_logout_redirect_uri
            if state:
                target = add_params_to_uri(target, [("state", state)])
            return OAuth2ResponseRedirect(target, application.get_allowed_schemes())
        if user is not None:
            messages.success(request, "You have signed out.")  # after the session's end: kept in a cookie
        return redirect("login")

    def error_response(self, error: OIDCError) -> HttpResponse:
        """The page, saying why; a refused request is audited (a redirect URI not registered is how an
        open redirect is tried), the user's own "stay signed in" is not a refusal and is not."""
        if isinstance(error, LogoutDenied):
            response: HttpResponse = self.render_to_response({"cancelled": True})
            return response
        audit_record(
            kind="logout.denied",
            outcome="denied",
            actor=actor_for_user(self.request.user),
            client_id=self.client.client_id if self.client is not None else "",
            data={"error_code": error.error, "reason": str(error.description)[:120]},
        )
        refused: HttpResponse = self.render_to_response({"error": error}, status=error.status_code)
        return refused

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context: dict[str, Any] = super().get_context_data(**kwargs)
        context["ends_access"] = _ends_access(kwargs.get("application"))
        return context


def _ends_access(client: Client | None) -> bool:
    """Whether signing out at this client's request revokes the user's tokens there (do_logout)."""
    return client is not None and bool(oauth2_settings.OIDC_RP_INITIATED_LOGOUT_DELETE_TOKENS)


def _user_of(hint: dict[str, Any] | None) -> Any:
    """The user a verified hint names (its ``sub``: ``tokens.access_token_claims``'s user id), or None."""
    if hint is None:
        return None
    try:
        return get_user_model().objects.filter(pk=hint["sub"]).first()
    except (ValueError, TypeError, ValidationError):
        return None  # not a value this user model's ids can take: no user of ours
