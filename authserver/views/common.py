"""What the RFC endpoints share: the RFC 6749 §5.2 error body, and ``FormEndpoint``, which refuses a
request that is not one well-formed form by POST before DOT sees it."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any
from urllib.parse import unquote_plus

from django.core.exceptions import BadRequest, SuspiciousOperation
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.http.multipartparser import MultiPartParserError
from django.utils.cache import patch_vary_headers
from django.utils.decorators import method_decorator
from django.views.decorators.csrf import csrf_exempt
from django.views.generic import View
from oauthlib.common import Request as OauthlibRequest
from oauthlib.common import urldecode

from audit.services import audit_record
from authserver.models import Client
from authserver.selectors import client_by_client_id
from authserver.validators import repeated_parameter


def oauth_error(error: str, description: str, status: int = 400) -> JsonResponse:
    """Return an RFC 6749 §5.2 error body with ``Cache-Control: no-store``."""
    response = JsonResponse({"error": error, "error_description": description}, status=status)
    response["Cache-Control"] = "no-store"
    response["Pragma"] = "no-cache"
    return response


def client_authenticated(core: Any, request: HttpRequest) -> Client | None:
    """Authenticate the calling client as the token endpoint does (RFC 6749 §2.3: Basic credentials or the
    body's; a public client by its id, for the device grant only) and return it, or None. ``core`` is the
    view's oauthlib core (``get_oauthlib_core()``)."""
    uri, http_method, body, headers = core._extract_params(request)
    oauthlib_request = OauthlibRequest(uri, http_method, body, headers)
    if not core.server.request_validator.authenticate_client(oauthlib_request):
        return None
    client = getattr(oauthlib_request, "client", None)
    return client if isinstance(client, Client) else None


BASIC_CHALLENGE = 'Basic realm="portcullis"'  # clients authenticate by Basic (RFC 6749 §2.3.1)


def client_refused(description: str = "Client authentication failed") -> JsonResponse:
    """RFC 6749 §5.2 ``invalid_client``: 401, with the challenge of the scheme clients authenticate by."""
    response = oauth_error("invalid_client", description, status=401)
    response["WWW-Authenticate"] = BASIC_CHALLENGE
    return response


def error_code_of(response: HttpResponse) -> str:
    try:
        return str(json.loads(response.content).get("error", "unknown"))
    except (ValueError, AttributeError):
        return "unknown"


def client_id_of(request: HttpRequest) -> str:
    return str(request.POST.get("client_id") or getattr(getattr(request, "client", None), "client_id", ""))[
        :100
    ]


FORM = "application/x-www-form-urlencoded"
FORM_ERRORS = (BadRequest, SuspiciousOperation, MultiPartParserError)  # what reading request.POST raises


BASIC_NOT_ASCII = "The Basic credentials are not ASCII base64 (RFC 7617)"


# An authorization request's URL goes, encoded once more (up to three times as long), into the sign-in
# page's ``next``; Django refuses to redirect past 16,384 characters (a bare 400 page, and an error logged)
QUERY_MAX = 4096


def query_refusal(request: HttpRequest) -> str | None:
    """Why the query string is one oauthlib cannot read, or None. oauthlib decodes it itself, more strictly
    than Django (only x-www-form-urlencoded characters, every "%" followed by two hex digits): it raised
    a ValueError, a 500 whose logged message quoted the whole query string, and any secret in it. One
    longer than QUERY_MAX is refused too."""
    query = request.META.get("QUERY_STRING", "")
    if len(query) > QUERY_MAX:
        return f"The query string is longer than {QUERY_MAX} characters"
    try:
        urldecode(query)
    except ValueError:
        return "The query string is not x-www-form-urlencoded"
    return None


def named_client_id(request: HttpRequest) -> str | None:
    """The client a form request names, authenticated or not: its Basic credentials', else its
    ``client_id`` field."""
    return basic_client_id(request) or request.POST.get("client_id")


def basic_client_id(request: HttpRequest) -> str | None:
    """The client id a Basic ``Authorization`` header names, decoded as DOT decodes it (RFC 6749 §2.3.1:
    form-encoded), or None: no Basic header, or one DOT refuses as unreadable."""
    header = request.META.get("HTTP_AUTHORIZATION", "")
    if header[:6].lower() != "basic " or not header.isascii():
        return None
    try:
        decoded = base64.b64decode(header[6:]).decode(request.encoding or "utf-8")
    except (binascii.Error, ValueError):
        return None
    client_id, colon, _secret = decoded.partition(":")
    return unquote_plus(client_id) if colon else None


def _form_refusal(request: HttpRequest) -> str | None:
    """Why a readable form is still a malformed request, or None. RFC 6749 §3.2: no parameter more than
    once (DOT passes oauthlib only the last, so ``scope=a&scope=b`` was read as ``b``); §2.3: one client
    authentication method (Basic credentials and a ``client_secret`` in the body are two), and one client:
    a ``client_id`` in the body other than the client the Basic credentials name was ignored, so that a
    device authorization was made out to the client named in the body; a query string oauthlib can read
    (``query_refusal``); Basic credentials in ASCII (RFC 7617), which DOT decoded with a ValueError."""
    repeated = repeated_parameter([key for key, values in request.POST.lists() for _value in values])
    if repeated is not None:
        return f"The parameter {repeated[:40]!r} is repeated"
    refusal = query_refusal(request)
    if refusal is not None:
        return refusal
    header = request.META.get("HTTP_AUTHORIZATION", "")
    basic = header[:6].lower() == "basic "
    if basic and not header.isascii():
        return BASIC_NOT_ASCII
    if basic and "client_secret" in request.POST:
        return "The client authenticated twice (Basic credentials and a client_secret in the body)"
    named = basic_client_id(request)
    if named is not None and request.POST.get("client_id", named) != named:
        return "The client_id in the body is not the client the Basic credentials name"
    return None


def _answer_completed(response: HttpResponseBase) -> HttpResponseBase:
    """An answer of a form endpoint with what each must carry, whoever built it (DOT, oauthlib, this
    package): RFC 6749 §5.1's ``Cache-Control: no-store`` and ``Pragma: no-cache`` (the answers hold tokens,
    device codes, what a token stands for), and on a 401, which is ``invalid_client`` at each of them, the
    challenge of the scheme clients authenticate by (RFC 6749 §5.2), as ``client_refused`` gives it:
    oauthlib gave every 401 RFC 6750's ``Bearer`` challenge, a resource server's, whether or not the
    client had sent an ``Authorization`` header."""
    response["Cache-Control"] = "no-store"
    response["Pragma"] = "no-cache"
    if response.status_code == 401:
        response["WWW-Authenticate"] = BASIC_CHALLENGE
    return response


@method_decorator(csrf_exempt, name="dispatch")  # clients authenticate themselves, not with a cookie
class FormEndpoint(View):
    """An RFC endpoint that takes a form by POST (token, revocation, introspection, device authorization).

    Another method is 405 ``invalid_request`` with ``Allow``, and a body Django cannot read as a form (a
    charset other than UTF-8, multipart with no boundary, too many fields) or a malformed one
    (``_form_refusal``) is 400 ``invalid_request`` (Basic credentials that are not ASCII: 401
    ``invalid_client``); each JSON, ``no-store`` and audited as ``denied_kind``. Every answer is kept out
    of caches, and a 401 challenges ``Basic`` (``_answer_completed``).
    Django alone answered them with an empty or an HTML page (a 500 in debug), and nothing was audited.
    OPTIONS passes (CORS preflight).
    """

    denied_kind = "token.denied"
    cors = False  # whether a page of an origin the client lists may read the answers (``cors_completed``)

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
                    answer = _answer_completed(self.form_dispatch(request, *args, **kwargs))
                    return cors_completed(request, answer) if self.cors else answer
                # Basic credentials that are not ASCII: an authentication by the header that failed
                response = (
                    client_refused(refusal)
                    if refusal == BASIC_NOT_ASCII
                    else oauth_error("invalid_request", refusal)
                )
        audit_record(kind=self.denied_kind, outcome="denied", data={"error_code": error_code_of(response)})
        return response

    def form_dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        return super().dispatch(request, *args, **kwargs)


def cors_completed(request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
    """Let a page of an origin the calling client lists (``allowed_origins``) read the answer, whatever it
    is: oauthlib gives ``Access-Control-Allow-Origin`` to an authorization code's exchange alone, so a
    single-page app could get its first tokens but not read a refresh's, a revocation's, or any error (an
    ``invalid_grant`` that tells it to sign in again). The client is the one the request names (its Basic
    credentials or its ``client_id``), whether or not it authenticated: the header lets a listed page read
    what it was answered, and grants nothing. The origin is compared as it was stored, which is as a browser
    sends it (``authserver.models.origin_errors``), as the gateway compares it. No simple form POST needs a
    preflight, so none is answered."""
    origin = request.headers.get("Origin")
    if origin is None:
        return response
    patch_vary_headers(response, ["Origin"])
    client = client_by_client_id(named_client_id(request))  # NUL: None
    if client is not None and origin in client.allowed_origins.split():
        response["Access-Control-Allow-Origin"] = origin
    elif response.has_header("Access-Control-Allow-Origin"):
        del response["Access-Control-Allow-Origin"]
    return response
