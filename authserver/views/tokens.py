"""The token endpoint (RFC 6749 §3.2, RFC 8628 §3.4) and revocation (RFC 7009): DOT's, with each
refusal audited, a consumed credential locked while it is redeemed, and device polls paced."""

from __future__ import annotations

import hashlib
import logging
from contextlib import nullcontext
from typing import Any

from django.core.cache import cache
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.utils.decorators import method_decorator
from django.views.decorators.debug import sensitive_post_parameters
from oauth2_provider import views as dot_views
from oauth2_provider.models import get_device_grant_model
from oauth2_provider.signals import app_authorized
from redis.exceptions import RedisError

from audit.services import audit_record
from authserver.selectors import client_lock_shared
from authserver.validators import access_tokens_issued, holds_nul, revocations_found
from authserver.views.common import (
    FORM,
    FormEndpoint,
    client_authenticated,
    client_id_of,
    client_refused,
    error_code_of,
    named_client_id,
    oauth_error,
)

logger = logging.getLogger(__name__)

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
CONSUMING_GRANTS = frozenset({"authorization_code", "refresh_token"})


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

    cors = True

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
            if consumes:  # the client first, then its code or refresh token: as a change to it locks them
                client_lock_shared(named_client_id(request))
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
        (DOT leaves that as a to-do). The client authenticates first (RFC 8628 §3.4, RFC 6749 §3.2.1), and
        only the code's own client is answered about it: DOT answered a pending code's poll before it
        authenticated anyone, so an unknown client, or a confidential one without its secret, was told
        ``authorization_pending`` and took the client's pacing slot."""
        client = client_authenticated(self.get_oauthlib_core(), request)
        if client is None:
            return client_refused()
        with transaction.atomic():
            client_lock_shared(client.client_id)  # as for a code (authorization_flow_token_response)
            grant = (
                get_device_grant_model().objects.select_for_update().filter(device_code=device_code).first()
            )
            if grant is not None and grant.client_id != client.client_id:
                return oauth_error("invalid_grant", "The device code was issued to another client")
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
        elif not grant_type:  # oauthlib fell back to the code grant: unsupported_grant_type (RFC 6749 §5.2)
            response = oauth_error("invalid_request", f"grant_type is required, in an {FORM} body")
        elif grant_type == DEVICE_GRANT and not request.POST.get("device_code"):
            response = oauth_error("invalid_request", "device_code is required")
        else:
            response = super().post(request, *args, **kwargs)
        if response.status_code == 404:  # DOT answers an unknown device code with a non-RFC 404
            response = oauth_error("invalid_grant", "The device code is unknown or expired")
        response["Content-Type"] = "application/json"  # DOT's own refusals (a bad resource) said text/html
        if response.status_code >= 400:
            error = error_code_of(response)
            if error not in {"authorization_pending", "slow_down"}:  # RFC 8628 §3.5: polling, not failure
                audit_record(
                    kind="token.denied",
                    outcome="denied",
                    client_id=client_id_of(request),
                    data={"grant_type": grant_type[:60], "error_code": error},
                )
        return response


class RevokeTokenView(FormEndpoint, dot_views.RevokeTokenView):
    """RFC 7009 revocation; revoking a refresh token revokes its whole family's access tokens."""

    cors = True

    denied_kind = "token.revoke_denied"

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        with revocations_found() as found:
            response: HttpResponse = super().post(request, *args, **kwargs)
        ok = response.status_code == 200
        if ok and not response.content:
            # RFC 7009 §2.2: the status says it all and the body is ignored; oauthlib's empty one was
            # labelled Django's default text/html
            del response["Content-Type"]
        revoked = ok and any(found)  # RFC 7009 §2.2: 200 also for an unknown token or another client's
        audit_record(
            kind="token.revoked" if revoked else ("token.revoke_unknown" if ok else "token.revoke_denied"),
            outcome="success" if revoked else "denied",
            client_id=client_id_of(request),
            data={
                "token_type_hint": request.POST.get("token_type_hint", "")[:20],
                "via": "rfc7009",
                **({} if ok else {"error_code": error_code_of(response)}),  # as the endpoint's other refusals
            },
        )
        return response
