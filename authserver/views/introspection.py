"""What a token stands for: RFC 7662 introspection for the clients allowed it, OIDC userinfo for the
token's holder; refusals audited, answers kept out of caches."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.views.generic import View
from oauth2_provider import views as dot_views
from oauth2_provider.settings import oauth2_settings

from audit.services import audit_record
from authserver.selectors import access_token_live
from authserver.tokens import access_token_introspection, jwt_signed_by_published_key
from authserver.views.common import (
    FORM,
    FORM_ERRORS,
    FormEndpoint,
    client_authenticated,
    client_refused,
    error_code_of,
    oauth_error,
    query_refusal,
)


class IntrospectView(FormEndpoint, dot_views.IntrospectTokenView):
    """RFC 7662 introspection: POST only, and only for clients an admin allowed to introspect; an active
    answer says what the access token itself says (``tokens.access_token_introspection``)."""

    denied_kind = "introspect.denied"
    http_method_names = ["post", "options"]  # what OPTIONS advertises in Allow

    def form_dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        # Not DOT's: it would ask for a bearer token. The client authenticates as RFC 7662 §2.1 says.
        return View.dispatch(self, request, *args, **kwargs)

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        client = client_authenticated(self.get_oauthlib_core(), request)
        if client is None:
            audit_record(kind=self.denied_kind, outcome="denied", data={"error_code": "invalid_client"})
            return client_refused()
        if not client.can_introspect:
            return self._denied(
                client.client_id, "unauthorized_client", "This client may not introspect", 403
            )
        if not request.POST.get("token"):  # RFC 7662 §2.1: REQUIRED
            return self._denied(client.client_id, "invalid_request", "token is required", 400)
        # Not DOT's answer (get_token_response): it gave no sub, iss, iat or token_type, and an aud only for
        # a token whose request named a resource, while every token names the gateway (RFC 7662 §2.2)
        return JsonResponse(access_token_introspection(request.POST["token"]))

    def _denied(self, client_id: str, error: str, description: str, status: int) -> JsonResponse:
        audit_record(kind=self.denied_kind, outcome="denied", client_id=client_id, data={"error_code": error})
        return oauth_error(error, description, status=status)


class UserInfoView(dot_views.UserInfoView):
    """OIDC userinfo: DOT's, with its answers labelled JSON, kept out of caches, and its refusals audited;
    and with what DOT lets through refused: a token in the query string (RFC 9700 §4.3.2, which DOT's
    ``COMPLIANT_BCP_RFC9700_ACCESS_TOKEN_TRANSPORT`` gate checks for protected resources, not here) and a
    token under a key no longer published (revoked: every gateway refuses it, introspection says
    inactive, while DOT found its row and answered)."""

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        refusal = query_refusal(request)
        if refusal is not None:
            return _userinfo_denied("invalid_request", refusal, 400)  # oauthlib raised reading it (a 500)
        if request.method == "POST":
            try:
                request.POST  # noqa: B018 (parsed here, where its failure can be answered and audited)
            except FORM_ERRORS:  # Django's own bare 400, unaudited (and an error logged for some)
                return _userinfo_denied("invalid_request", f"The body must be a UTF-8 {FORM} form", 400)
        response: HttpResponseBase = super().dispatch(request, *args, **kwargs)
        return response

    def _create_userinfo_response(self, request: HttpRequest) -> HttpResponse:
        if "access_token" in request.GET and oauth2_settings.COMPLIANT_BCP_RFC9700_ACCESS_TOKEN_TRANSPORT:
            # RFC 6750 §3.1: a request with an unsupported parameter (a token where none may be) is 400
            return _userinfo_denied("invalid_request", "No access token may be sent in the query", 400)
        if "HTTP_AUTHORIZATION" in request.META and "access_token" in request.POST:
            # RFC 6750 §3.1: a request that "uses more than one method for including an access token" is
            # invalid_request; oauthlib read the header and let the body's pass unseen
            return _userinfo_denied("invalid_request", "Send the access token by one method only", 400)
        token = _bearer_token(request)
        if token and not jwt_signed_by_published_key(token):
            return _userinfo_denied("invalid_token", "The access token is not valid", 401)
        response: HttpResponse = super()._create_userinfo_response(request)
        live = access_token_live(token=token) if response.status_code == 401 and token else None
        if live is not None and "openid" not in live.scope.split():
            # RFC 6750 §3.1: a live token without the scope userinfo needs is insufficient_scope, 403, with
            # the scope it needs. DOT checked the token and the scope in one, and answered invalid_token:
            # a client then refreshed a good token, and was refused again.
            return _userinfo_denied(
                "insufficient_scope", "The access token was not granted openid", 403, scope="openid"
            )
        response["Cache-Control"] = "no-store"  # claims about the user
        sent = "HTTP_AUTHORIZATION" in request.META or "access_token" in request.GET
        if response.status_code == 401 and not sent and "access_token" not in request.POST:
            # RFC 6750 §3.1: a request with no credentials at all is told how to send them, with no error
            response["WWW-Authenticate"] = 'Bearer realm="userinfo"'
        if response.status_code == 403 and not response.has_header("WWW-Authenticate"):
            response["WWW-Authenticate"] = 'Bearer error="insufficient_scope"'  # RFC 6750 §3
        if response.content[:1] == b"{":
            response["Content-Type"] = "application/json"
        if response.status_code >= 400:
            audit_record(
                kind="userinfo.denied",
                outcome="denied",
                data={"error_code": error_code_of(response), "status": response.status_code},
            )
        return response


def _bearer_token(request: HttpRequest) -> str:
    """The access token as oauthlib reads it: an ``Authorization: Bearer`` header, else the form body."""
    header = request.META.get("HTTP_AUTHORIZATION")
    if header is None:
        return str(request.POST.get("access_token", ""))
    parts = header.split()
    return parts[1] if len(parts) == 2 and parts[0].lower() == "bearer" else ""


def _userinfo_denied(error: str, description: str, status: int, *, scope: str = "") -> JsonResponse:
    """An RFC 6750 §3 refusal: the §5.2-style body, its challenge, and the audit record. With ``scope``
    (insufficient_scope: the scope the request needs), the challenge names it instead of the description."""
    refused = oauth_error(error, description, status=status)
    detail = f'scope="{scope}"' if scope else f'error_description="{description}"'
    refused["WWW-Authenticate"] = f'Bearer error="{error}", {detail}'
    audit_record(kind="userinfo.denied", outcome="denied", data={"error_code": error, "status": status})
    return refused
