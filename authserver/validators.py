"""DOT's OAuth2Validator with Portcullis's hooks: scopes per client, refresh only with offline_access,
JWT ids on token rows, code-replay tombstones and refresh-reuse events."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from django.conf import settings
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone
from oauth2_provider.oauth2_validators import OAuth2Validator
from oauth2_provider.settings import oauth2_settings
from oauthlib.oauth2.rfc6749 import errors
from oauthlib.oauth2.rfc6749.utils import scope_to_list
from oauthlib.openid.connect.core.exceptions import RequestNotSupported, RequestURINotSupported

from audit.services import audit_record
from authserver.models import GRANT_DEVICE_CODE, AccessToken, Client, Grant, RedeemedCode, RefreshToken
from authserver.selectors import client_by_client_id, token_checksum
from authserver.services import access_token_deletions_batched, access_token_insert
from authserver.tokens import id_token_hint_subject, jwt_unverified_claims

logger = logging.getLogger(__name__)

T = TypeVar("T")

OFFLINE_ACCESS = "offline_access"
# Scopes about an end-user (OIDC Core §5.4, §11): a client-credentials token has none to describe or to
# stay connected for, and userinfo answered one carrying openid with a 500
END_USER_SCOPES = frozenset({"openid", "profile", OFFLINE_ACCESS})
TOMBSTONE_LIFETIME = timedelta(days=1)  # replays after a day are refused as unknown codes anyway
# The claims an ID token carries (oauthlib: aud, iat, at_hash, and nonce when the request sent one; DOT: iss,
# exp, auth_time, jti; get_claim_dict: sub; with the profile scope, PROFILE_CLAIMS) and userinfo answers (sub,
# and PROFILE_CLAIMS with the profile scope). OIDC Discovery §3's claims_supported names these and no more:
# c_hash and s_hash belong to the hybrid flow, which is not served.
PROFILE_CLAIMS = ("family_name", "given_name", "name", "preferred_username")
OIDC_CLAIMS = tuple(
    sorted(("aud", "at_hash", "auth_time", "exp", "iat", "iss", "jti", "nonce", "sub", *PROFILE_CLAIMS))
)


_issued_access_tokens: ContextVar[list[AccessToken] | None] = ContextVar("issued_access_tokens", default=None)
_revocation_found: ContextVar[list[bool] | None] = ContextVar("revocation_found", default=None)
_session_user: ContextVar[Any] = ContextVar("session_user", default=None)


@contextmanager
def _collected(var: ContextVar[list[T] | None]) -> Iterator[list[T]]:
    collected: list[T] = []
    token = var.set(collected)
    try:
        yield collected
    finally:
        var.reset(token)


def access_tokens_issued() -> AbstractContextManager[list[AccessToken]]:
    """Collect the access-token rows the validator saves inside the block, so nobody reads them back."""
    return _collected(_issued_access_tokens)


@contextmanager
def session_user_known(user: Any) -> Iterator[None]:
    """Tell the validator, inside the block, who is signed in to the session an authorization request
    comes with: oauthlib's request knows it only once a code is issued, and the id_token_hint is then
    checked too late to spare the user a consent page for a request that will be refused."""
    token = _session_user.set(user)
    try:
        yield
    finally:
        _session_user.reset(token)


def revocations_found() -> AbstractContextManager[list[bool]]:
    """Collect, for each RFC 7009 revocation inside the block, whether the token was the calling client's
    and live (the endpoint answers 200 either way, so only this tells the audit what happened)."""
    return _collected(_revocation_found)


def _locked(rows: QuerySet[Any], *fields: str) -> list[tuple[Any, ...]]:
    """Lock these rows until the token request's transaction ends (the token endpoint opens one for the
    grants that consume a credential); outside a transaction, nothing to hold a lock for. Return the
    ``fields`` of each row, read in the same statement (none asked for: nothing is returned)."""
    if transaction.get_connection().in_atomic_block:
        rows = rows.select_for_update()
    elif not fields:
        return []
    found = list(rows.values_list(*(fields or ("pk",))))
    return found if fields else []


S256_CHALLENGE = re.compile(r"[A-Za-z0-9_-]{43}")  # RFC 7636 §4.2: BASE64URL(SHA-256), 32 bytes, unpadded
CODE_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")  # RFC 7636 §4.1
NONCE_MAX = 255  # the grant's nonce column; a longer one was a database error (a 500) on PostgreSQL
REPEATABLE = frozenset({"resource"})  # RFC 8707 §2: one resource parameter per resource


def holds_nul(values: Iterable[Any]) -> bool:
    """Whether any of these parameter names or values (strings, or lists and pairs of them) holds a NUL."""
    return any(
        "\x00" in value if isinstance(value, str) else isinstance(value, list | tuple) and holds_nul(value)
        for value in values
    )


def resources_check(request: Any, resources: Iterable[Any]) -> None:
    """Refuse (RFC 8707 §2: ``invalid_target``) any resource other than the gateway: every access token's
    ``aud`` names it alone (``tokens.access_token_claims``), while introspection reported the resource
    that was asked for."""
    if any(resource != settings.PORTCULLIS_AUDIENCE for resource in resources):
        raise errors.CustomOAuth2Error(
            error="invalid_target",
            description=f"The only resource tokens are issued for is {settings.PORTCULLIS_AUDIENCE}",
            request=request,
        )


def repeated_parameter(names: Iterable[str]) -> str | None:
    """The first name (in sorted order) of a parameter sent more than once that may not be, or None
    (RFC 6749 §3.1, §3.2: "Request and response parameters MUST NOT be included more than once")."""
    counted = Counter(names)
    repeated = sorted(name for name, count in counted.items() if count > 1 and name not in REPEATABLE)
    return repeated[0] if repeated else None


def authorization_request_check(request: Any) -> dict[str, Any]:
    """Refuse what oauthlib lets through to the grant (an oauthlib ``post_auth`` validator, run once the
    client and its redirect URI are known, so the error goes back to the client with its ``state``):
    a NUL character in any parameter, a request object (OIDC Core §6: not supported), a repeated
    parameter, a response mode other than ``query``, a resource other than the gateway, a PKCE method
    other than S256, a challenge that is no S256 value (one longer than the grant's column was a 500 on
    PostgreSQL, a shorter one a code nobody can redeem) and a nonce the grant cannot hold."""
    # Every parameter as sent (a repeated one too) and what the authorization view passes along (its
    # credentials: the consent form's fields, the resource list). PostgreSQL text and jsonb cannot hold a
    # NUL: a nonce or a resource stored on the grant was a 500 (the token endpoint refuses them too).
    sent = [*request.uri_query_params, *(request.decoded_body or [])]
    passed = vars(request)
    # Whatever is refused below is answered in the query, the one response mode served: oauthlib put an
    # error found as the consent form was answered in the fragment of response_mode=fragment.
    mode, request.response_mode = request.response_mode, None
    if holds_nul([*sent, *passed.values()]):
        raise errors.InvalidRequestError(description="A parameter holds a NUL character", request=request)
    names = [name for name, _value in request.uri_query_params]
    # OIDC Core §6.1, §6.2: an OP that does not take request objects MUST say so; oauthlib ignored them, so
    # the parameters a relying party signed were silently replaced by the unsigned ones beside them
    if "request" in names:
        raise RequestNotSupported(request=request)
    if "request_uri" in names:
        raise RequestURINotSupported(request=request)
    if (repeated := repeated_parameter(names)) is not None:  # oauthlib checks five of them only
        raise errors.InvalidRequestError(
            description=f"The parameter {repeated[:40]!r} is repeated", request=request
        )
    if mode not in (None, "query"):
        # The metadata's response_modes_supported says query; oauthlib also honoured fragment, whose
        # redirect then carried the RFC 9207 iss appended after the fragment, corrupted
        raise errors.InvalidRequestError(description="response_mode must be query", request=request)
    listed = passed.get("resource") or []  # DOT's list; a string is checked whole (never split into letters)
    listed = [listed] if isinstance(listed, str) else list(listed)
    resources_check(request, [value for key, value in sent if key == "resource"] + listed)
    if request.code_challenge is not None:
        if request.code_challenge_method != "S256":
            raise errors.InvalidRequestError(
                description="code_challenge_method must be S256", request=request
            )
        if not S256_CHALLENGE.fullmatch(request.code_challenge):
            raise errors.InvalidRequestError(
                description="code_challenge must be 43 base64url characters (RFC 7636 section 4.2)",
                request=request,
            )
    if request.nonce is not None and len(request.nonce) > NONCE_MAX:
        raise errors.InvalidRequestError(
            description=f"nonce must be at most {NONCE_MAX} characters", request=request
        )
    return {}


def claims_check(request: Any) -> dict[str, Any]:
    """Refuse a ``claims`` parameter that is no JSON object (OIDC Core §5.5), back to the client with its
    ``state``: registered before oauthlib's OpenID check, whose own refusal of one that does not parse
    names no request, so DOT's redirect to a relative ``?error=`` was refused by Django (a bare 400 page,
    and an error logged, for every such request)."""
    claims = request.claims
    if not claims or isinstance(claims, dict):
        return {}  # none, or empty: oauthlib passes over an empty one
    try:
        parsed = json.loads(claims) if isinstance(claims, str | bytes) else None
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise errors.InvalidRequestError(description="claims must be a JSON object", request=request)
    return {}


def code_verifier_check(request: Any) -> dict[str, Any]:
    """Refuse a code_verifier that is not 43-128 unreserved characters (RFC 7636 §4.1), before the code is
    looked up (an oauthlib ``pre_token`` validator of the code grants). oauthlib hashes whatever it gets,
    so a one-character verifier, which anyone can guess from its challenge, redeemed the code."""
    verifier = request.code_verifier
    if verifier is not None and not CODE_VERIFIER.fullmatch(verifier):
        raise errors.InvalidGrantError(
            description="code_verifier must be 43-128 of A-Z a-z 0-9 - . _ ~ (RFC 7636 section 4.1)",
            request=request,
        )
    return {}


def device_user_check(request: Any) -> dict[str, Any]:
    """Refuse a device code whose approving user has since been deactivated (an oauthlib ``post_token``
    validator of the device grant, which DOT's ``pre_token`` gave the grant's user): as for a code or a
    refresh token, ``invalid_grant`` (RFC 6749 §5.2: the grant is revoked). Not RFC 8628's
    ``access_denied``, which tells the client the user said no."""
    if not _user_active(request):
        raise errors.InvalidGrantError(
            description="The user who approved this device may not sign in", request=request
        )
    return {}


def _auth_time(request: Any) -> int | None:
    """When the user signed in to the session behind this request's code, in Unix seconds, if known: the
    authorization view's credentials, or the code's or the refresh token's record at the token endpoint."""
    # Only what this code set: oauthlib's request also answers any name from the client's own parameters
    signed_in = vars(request).get("auth_time")
    return signed_in if isinstance(signed_in, int) and not isinstance(signed_in, bool) else None


def _user_active(request: Any) -> bool:
    """Whether the user a code or refresh token was issued to may still get tokens: one deactivated (in the
    Django admin, or by any other path than the console's lock, which also revokes) may not."""
    user = getattr(request, "user", None)
    return user is None or bool(user.is_active)


def _rotated(token_family: Any, pk: int) -> bool:
    """Whether a revoked refresh token was rotated, i.e. a successor was minted from it: a later member of
    its family exists. DOT's own test (an access token whose source it is) forgets a rotation once the
    next one deletes that access token, so a token replayed two refreshes later looked merely revoked."""
    return bool(token_family) and RefreshToken.objects.filter(token_family=token_family, pk__gt=pk).exists()


def _code_hash(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


def _actor(request: Any) -> str:
    user = getattr(request, "user", None)
    if user is not None and getattr(user, "pk", None):
        return f"user:{user.get_username()}"
    client = getattr(request, "client", None)
    return f"client:{client.client_id}" if client is not None else "anonymous"


class PortcullisValidator(OAuth2Validator):
    def validate_silent_login(self, request: Any) -> bool:
        # oauthlib asks this for prompt=none (the base class raised NotImplementedError: a 500). The
        # oauthlib request cannot see the session; the view can: DOT's handle_no_permission answers a
        # signed-out user login_required once the request is valid, and only a signed-in one gets further.
        return True

    def validate_silent_authorization(self, request: Any) -> bool:
        # Consent is remembered per user and client (Consent), which the oauthlib request cannot see: the
        # authorization view answers prompt=none with consent_required when it would show the consent page.
        return True

    def validate_scopes(
        self, client_id: str, scopes: list[str], client: Any, request: Any, *a: Any, **k: Any
    ) -> bool:
        if not super().validate_scopes(client_id, scopes, client, request, *a, **k):
            return False
        if request.grant_type == "client_credentials" and END_USER_SCOPES.intersection(scopes):
            return False  # RFC 6749 §4.4: the client acts for itself, with no end-user
        return bool(client.may_ask_for(scopes))

    def validate_user_match(self, id_token_hint: Any, scopes: Any, claims: Any, request: Any) -> bool:
        """OIDC Core §3.1.2.1: an id_token_hint names the user the client expects to be signed in. One this
        server did not issue is ``invalid_request``; one for another user than the session's is
        ``login_required`` (oauthlib raises it on False), with prompt=none or without: the client then
        asks the user to sign in as whom it expects (prompt=login). Signing the user out here instead
        would hand any site that holds one of its own users' ID tokens a way to end a session by a GET."""
        if not id_token_hint:
            return True
        subject = id_token_hint_subject(str(id_token_hint))
        if subject is None:
            raise errors.InvalidRequestError(
                description="id_token_hint is not an ID token this server issued", request=request
            )
        # only what DOT set: oauthlib's request answers any other name from the query (``&user=x``)
        user = vars(request).get("user") or _session_user.get()
        if user is None:
            return True  # not known yet: asked again, with the user, before any code is issued
        return subject == str(user.pk)

    def get_discovery_claims(self, request: Any) -> list[str]:
        # DOT's listed ``sub`` alone, as if an ID token carried nothing else
        return list(OIDC_CLAIMS)

    def get_additional_claims(self, request: Any) -> dict[str, Any]:
        """OIDC Core §5.4's ``profile`` claims the user model holds (DOT's ``oidc_claim_scope`` gives them
        only with that scope): the consent page promised "your user name and profile details" while userinfo
        answered ``sub`` alone. A name the user has not set is left out, not sent empty (§5.3.2)."""
        user = request.user
        claims = {
            "preferred_username": user.get_username(),
            "name": user.get_full_name().strip(),
            "given_name": getattr(user, "first_name", ""),
            "family_name": getattr(user, "last_name", ""),
        }
        return {claim: value for claim, value in claims.items() if value}

    def get_userinfo_claims(self, request: Any) -> Any:
        if request.user is None:
            # A client's own token (client credentials, issued before openid was refused to them) has no
            # end-user: the same 403 as a token without openid, not DOT's AttributeError (a 500)
            raise errors.InsufficientScopeError(
                description="The token was issued to a client for itself, not for a user", request=request
            )
        return super().get_userinfo_claims(request)

    def get_original_scopes(self, refresh_token: str, request: Any, *args: Any, **kwargs: Any) -> list[str]:
        # RFC 6749 §6: the scope originally granted is the family's, which the refresh token holds; DOT read
        # the family's latest access token, so one refresh that narrowed the scope narrowed every later
        # one. A token issued before the column holds none: DOT's reading, as before.
        stored = getattr(vars(request).get("refresh_token_instance"), "scope", "")
        original = stored or super().get_original_scopes(refresh_token, request, *args, **kwargs)
        # A refresh renews only the scopes the client may still ask for: oauthlib's refresh grant never asks
        # validate_scopes, so a scope an admin took from the client lived on in every refreshed token for
        # the refresh token's lifetime. Asking for a removed one is then invalid_scope (RFC 6749 §6).
        client = request.client
        renewed = [scope for scope in scope_to_list(original) or [] if client.may_ask_for([scope])]
        request.refresh_token_scope = " ".join(renewed)  # the rotated refresh token's (_create_refresh_token)
        return renewed

    def get_default_scopes(self, client_id: str, request: Any, *args: Any, **kwargs: Any) -> list[str]:
        defaults = super().get_default_scopes(client_id, request, *args, **kwargs)
        allowed = set(request.client.scope_list())
        return [scope for scope in defaults if scope in allowed]

    def _load_application(self, client_id: str, request: Any) -> Any:
        if isinstance(client_id, str) and "\x00" in client_id:
            return None  # no client has it, and PostgreSQL would answer DOT's lookup with an error (a 500)
        if not request.client and not oauth2_settings.CIMD_ENABLED:
            # The same row DOT's ``Application.objects.get`` would load, read more cheaply; DOT still decides
            # (usable or not, and the unknown client id, which the lookup below leaves to it). With client
            # metadata documents on, DOT refreshes what it loads itself, so it loads it itself.
            request.client = client_by_client_id(client_id)
        return super()._load_application(client_id, request)

    def authenticate_client(self, request: Any, *args: Any, **kwargs: Any) -> bool:
        if not super().authenticate_client(request, *args, **kwargs):
            return False
        # A public client has no secret to authenticate with (RFC 6749 §2.1): DOT stores a hash of "" for
        # it, which an empty secret matched, so its client id alone got client-credentials tokens and
        # introspection. DOT's device-code grant identifies a public client without checking a secret.
        public = request.client.client_type == Client.CLIENT_PUBLIC
        return not public or request.grant_type == GRANT_DEVICE_CODE

    def save_bearer_token(self, token: dict[str, Any], request: Any, *args: Any, **kwargs: Any) -> Any:
        # A refresh token is issued only when the client asked for offline_access (OIDC Core §11). A refresh
        # always rotates: its grant had offline_access, and one that narrows the scope without it was left
        # unrevoked (reusable without limit, never a reuse) and its access token outside the family.
        if OFFLINE_ACCESS not in (request.scopes or []) and request.grant_type != "refresh_token":
            token.pop("refresh_token", None)
        if "refresh_token" in token or request.grant_type != "client_credentials":
            result = super().save_bearer_token(token, request, *args, **kwargs)
        else:
            # DOT's save_bearer_token wraps the writes in a transaction; without a refresh token this grant
            # writes one row, which is atomic alone (a BEGIN and a COMMIT less per token).
            result = self._save_bearer_token(token, request, *args, **kwargs)
        kind = "token.refreshed" if request.grant_type == "refresh_token" else "token.issued"
        audit_record(
            kind=kind,
            actor=_actor(request),
            client_id=request.client.client_id,
            data={
                "grant_type": request.grant_type,
                "scope": token.get("scope", ""),
                "jti": getattr(request, "access_token_jti", ""),
                "refresh": "refresh_token" in token,
            },
        )
        return result

    def revoke_token(self, token: str, token_type_hint: Any, request: Any, *args: Any, **kwargs: Any) -> None:
        collected = _revocation_found.get()
        if collected is not None:
            checksum = token_checksum(token)
            mine = {"token_checksum": checksum, "application_id": getattr(request.client, "pk", None)}
            collected.append(
                mine["application_id"] is not None
                and (
                    AccessToken.objects.filter(**mine).exists()
                    or RefreshToken.objects.filter(**mine, revoked__isnull=True).exists()
                )
            )
        super().revoke_token(token, token_type_hint, request, *args, **kwargs)

    def _validate_resource_uris(self, request: Any, resources: list[Any]) -> None:
        # DOT's check of the token request's resources and of those a code or refresh token carries, after
        # ours: only the gateway passes ours, and DOT's parse raised on a broken one ("https://[zz]/": a 500)
        resources_check(request, resources)
        super()._validate_resource_uris(request, resources)

    def _set_token_value(self, token_instance: Any, raw_token: str) -> None:
        super()._set_token_value(token_instance, raw_token)
        if isinstance(token_instance, AccessToken):
            # The row keeps only a checksum of the JWT; its jti is what revocation pushes to gateways.
            token_instance.jti = jwt_unverified_claims(raw_token).get("jti")

    def _create_access_token(
        self, expires: Any, request: Any, token: Any, source_refresh_token: Any = None
    ) -> Any:
        if token.get("id_token"):
            access_token = super()._create_access_token(expires, request, token, source_refresh_token)
        else:
            # DOT's row, written by access_token_insert rather than the ORM's save (the token endpoint's
            # costliest statement to compile)
            access_token = AccessToken(
                user=request.user,
                scope=token["scope"],
                expires=expires,
                application=request.client,
                source_refresh_token=source_refresh_token,
                resource=getattr(request, "resource", []),  # RFC 8707
            )
            self._set_token_value(access_token, token["access_token"])
            access_token_insert(access_token)
        request.issued_access_token = access_token
        collected = _issued_access_tokens.get()
        if collected is not None:
            collected.append(access_token)
        return access_token

    def _create_refresh_token(self, request: Any, code: Any, access_token: Any, previous: Any) -> Any:
        refresh_token = super()._create_refresh_token(request, code, access_token, previous)
        request.issued_token_family = refresh_token.token_family
        # RFC 6749 §6: a rotated refresh token has the scope of the one presented (get_original_scopes), not
        # the narrower one this refresh may have asked for; a code's or device code's has the grant's.
        family_scope = (
            vars(request).get("refresh_token_scope") if request.grant_type == "refresh_token" else None
        )
        recorded: dict[str, Any] = {"scope": family_scope or access_token.scope}
        signed_in = _auth_time(request)
        if signed_in is not None:  # a code flow's sign-in, or the one its family carried
            recorded["auth_time"] = datetime.fromtimestamp(signed_in, tz=UTC)
        for field, value in recorded.items():
            setattr(refresh_token, field, value)
        RefreshToken.objects.filter(pk=refresh_token.pk).update(**recorded)  # DOT has saved the row
        return refresh_token

    def _create_authorization_code(self, request: Any, code: dict[str, Any], expires: Any = None) -> Any:
        grant = super()._create_authorization_code(request, code, expires)
        signed_in = _auth_time(request)
        given = vars(request).get("redirect_uri_given") is True  # the view's credentials, not a parameter
        if signed_in is not None or given:  # what the authorization view knew (its credentials)
            grant.auth_time = datetime.fromtimestamp(signed_in, tz=UTC) if signed_in is not None else None
            grant.redirect_uri_given = given
            grant.save(update_fields=["auth_time", "redirect_uri_given"])
        return grant

    def confirm_redirect_uri(
        self,
        client_id: str,
        code: str,
        redirect_uri: str,
        client: Any,
        request: Any = None,
        *a: Any,
        **k: Any,
    ) -> bool:
        # RFC 6749 §4.1.3: the redirect URI is REQUIRED in the token request if the authorization request
        # named it. oauthlib fills in the client's only URI when it is missing (using_default_redirect_uri)
        # and DOT then compared that with the code's, which it always matched.
        defaulted = getattr(request, "using_default_redirect_uri", False)
        if defaulted and vars(request).get("code_redirect_uri_given"):
            return False  # a required parameter missing: oauthlib's invalid_request
        if super().confirm_redirect_uri(client_id, code, redirect_uri, client, request, *a, **k):
            return True
        if defaulted:
            return False
        # RFC 6749 §5.2: a grant that "does not match the redirection URI used in the authorization request"
        # is invalid_grant; oauthlib answered invalid_request
        raise errors.InvalidGrantError(
            description="redirect_uri is not the one the authorization request used", request=request
        )

    def get_id_token_dictionary(
        self, token: Any, token_handler: Any, request: Any
    ) -> tuple[dict[str, Any], Any]:
        claims, expires = super().get_id_token_dictionary(token, token_handler, request)
        signed_in = _auth_time(request)
        if signed_in is not None:  # the session's own sign-in; DOT's is the user's last sign-in anywhere
            claims["auth_time"] = signed_in
        return claims, expires

    def invalidate_authorization_code(
        self, client_id: str, code: str, request: Any, *args: Any, **kwargs: Any
    ) -> None:
        super().invalidate_authorization_code(client_id, code, request, *args, **kwargs)
        issued = getattr(request, "issued_access_token", None)
        RedeemedCode.objects.create(
            code_hash=_code_hash(code),
            client=request.client,
            user=request.user,
            access_token_jti=getattr(issued, "jti", None),
            token_family=getattr(request, "issued_token_family", None),
            expires=timezone.now() + TOMBSTONE_LIFETIME,
        )

    def validate_code(
        self, client_id: str, code: str, client: Any, request: Any, *args: Any, **kwargs: Any
    ) -> bool:
        # Two redemptions of one code at once: the second waits here until the first has committed its
        # tokens, the code's deletion and its tombstone, then finds the tombstone and revokes them. Without
        # the lock both passed this check, the loser was refused only when it came to delete the code, and
        # the winner's tokens lived on (RFC 6749 §4.1.2).
        stored = _locked(Grant.objects.filter(code=code), "auth_time", "redirect_uri_given")
        if super().validate_code(client_id, code, client, request, *args, **kwargs):
            if stored:  # read with the lock (DOT's own lookup keeps the row to itself)
                signed_in, request.code_redirect_uri_given = stored[0]
                request.auth_time = int(signed_in.timestamp()) if signed_in is not None else None
            return _user_active(request)
        tombstone = RedeemedCode.objects.filter(code_hash=_code_hash(code), client=client).first()
        if tombstone is not None:
            self._code_replayed(tombstone)
        return False

    def _code_replayed(self, tombstone: RedeemedCode) -> None:
        """RFC 6749 §4.1.2: a code used twice revokes every token issued from it."""
        family = (
            RefreshToken.objects.filter(token_family=tombstone.token_family)
            if tombstone.token_family
            else None
        )
        with transaction.atomic(), access_token_deletions_batched():
            issued = AccessToken.objects.filter(jti=tombstone.access_token_jti)
            if family is not None:
                issued = issued | AccessToken.objects.filter(pk__in=family.values("access_token_id"))
                # Refresh tokens before access tokens, the order a rotation locks them in (no deadlock).
                family.filter(revoked__isnull=True).update(revoked=timezone.now())
            revoked, _ = issued.delete()
        audit_record(
            kind="code.replayed",
            outcome="denied",
            actor=f"client:{tombstone.client.client_id}",
            client_id=tombstone.client.client_id,
            # the user the code was issued for: a code without offline_access has no family to name them by,
            # and the anomaly quarantine acts on that user's access, not on every user of the client
            data={
                "tokens_revoked": revoked,
                "token_family": str(tombstone.token_family or ""),
                "user": str(tombstone.user_id or ""),
            },
        )

    def validate_refresh_token(
        self, refresh_token: str, client: Any, request: Any, *args: Any, **kwargs: Any
    ) -> bool:
        checksum = token_checksum(refresh_token)
        # Two uses of one refresh token at once: the second waits here until the first has rotated it, then
        # finds it revoked and is a reuse (RFC 9700 §4.14.2). Without the lock both passed this check, and
        # DOT's grace path answered the second with a 200 holding empty tokens, the family left alive.
        rows = _locked(
            RefreshToken.objects.filter(token_checksum=checksum),
            "revoked",
            "token_family",
            "application_id",
            "pk",
        )
        previous = next((row for row in rows if row[0] is not None), None)  # a revoked one
        live = any(row[0] is None for row in rows)
        if previous is not None and not live and not _rotated(previous[1], previous[3]):
            # Revoked, never rotated (RFC 7009, consent withdrawn, an admin, a locked user): the token is
            # dead (RFC 7009 §2.1) but did not leak, so no reuse event (an anomaly that can quarantine the
            # user's access) and nothing more to revoke
            return False
        valid = super().validate_refresh_token(refresh_token, client, request, *args, **kwargs)
        # a client an admin no longer lets hold refresh tokens refreshes nothing more (client_update revokes
        # them too; this holds for a change saved past the services)
        valid = valid and _user_active(request) and request.client.may_ask_for([OFFLINE_ACCESS])
        signed_in = getattr(vars(request).get("refresh_token_instance"), "auth_time", None)
        # the family's sign-in, for the ID token and the next rotation (None: DOT's last_login)
        request.auth_time = int(signed_in.timestamp()) if valid and signed_in is not None else None
        if not valid and previous is not None and not live:
            # RFC 9700 §4.14.2: a rotated refresh token presented again means it leaked; DOT has revoked
            # the family (REFRESH_TOKEN_REUSE_PROTECTION), and this records it as a security event.
            _revoked, family, application_id, _pk = previous
            owner = Client.objects.filter(pk=application_id).values_list("client_id", flat=True).first()
            audit_record(
                kind="token.refresh_reuse",
                outcome="denied",
                actor=f"client:{owner}",
                client_id=owner or "",
                data={"token_family": str(family)},
            )
        return valid
