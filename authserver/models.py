"""Authorization-server data: the swapped DOT models, revoked token ids, signing keys, code tombstones and
consents.

Every DOT model is swapped here, in the first migration, so later issues can extend them without the
migration knot DOT documents for late swaps.
"""

from __future__ import annotations

import ipaddress
import socket
from functools import cached_property
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from jwcrypto import jwk
from oauth2_provider import models as dot
from oauth2_provider.validators import AllowedURIValidator

GRANT_DEVICE_CODE = "urn:ietf:params:oauth:grant-type:device_code"
GRANT_TYPE_CHOICES = [
    (dot.AbstractApplication.GRANT_AUTHORIZATION_CODE, "Authorization code (with PKCE)"),
    (dot.AbstractApplication.GRANT_CLIENT_CREDENTIALS, "Client credentials"),
    (GRANT_DEVICE_CODE, "Device authorization"),
]
ALLOWED_GRANT_TYPES = {value for value, _ in GRANT_TYPE_CHOICES}


def _is_loopback_http(uri: str) -> bool:
    parts = urlsplit(uri)
    if parts.scheme != "http" or not parts.hostname:
        return False
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


def uri_parses(uri: str) -> bool:
    """Whether a URI parses with its port (urlsplit raises for a port out of range only when asked)."""
    try:
        urlsplit(uri).port  # noqa: B018 (reading the port is what checks it)
    except ValueError:
        return False
    return True


def redirect_uri_errors(uris: list[str]) -> list[str]:
    """Name the redirect URIs that hold whitespace, cannot even be parsed, or are listed twice: the model,
    the console's form, the admin API and ``client_register`` refuse them with these messages.

    Unparsable ones (a broken IPv6 literal, a port out of range) raised when read later: one stored made
    every authorization request of its client a 500. The list is stored joined with spaces and read back
    split on any whitespace (``str.split``), so one item holding whitespace, U+00A0 or U+2028 included,
    became several URIs (past the API's cap of 50): only a list the caller gave can show it.
    """
    errors, seen = [], set()
    for uri in uris:
        if any(c.isspace() for c in uri):
            errors.append(f"{uri!r}: a redirect URI holds no whitespace; give each URI as its own item")
        elif not uri_parses(uri):
            errors.append(f"{uri}: not a valid URL (check the host and the port)")
        elif uri in seen:
            errors.append(f"{uri}: listed twice")
        seen.add(uri)
    return errors


def origin_errors(origins: list[str]) -> list[str]:
    """Name the web origins a client may not list (``allowed_origins``: the pages whose scripts may call the
    token endpoint and the gateway, CORS): each must be written exactly as a browser sends its ``Origin``
    header, ``https://host[:port]``, lowercase, without a path or the default port, for the gateway and
    DOT compare that header with what is stored. ``http`` only for a loopback IP literal
    (``http://127.0.0.1:5173``, ``http://[::1]:3000``), as for redirect URIs (RFC 8252): a single-page app's
    development server, which can serve its code flow too; ``http://localhost`` is refused as its redirect
    URIs are, since the name can be made to resolve elsewhere. Any other http origin (its pages can be
    rewritten on the way), a wildcard, ``null`` (a sandboxed or local page, any site can be one), a path or
    a user, or one listed twice: refused, with the spelling to use where there is one.
    """
    errors, seen = [], set()
    for origin in origins:
        if any(c.isspace() for c in origin):
            errors.append(f"{origin!r}: an origin holds no whitespace; give each origin as its own item")
            continue
        canonical = _origin_canonical(origin)
        if canonical is None and origin.lower().startswith("http://"):
            errors.append(
                f"{origin}: an origin must be https (http only for a loopback IP such as http://127.0.0.1:5173)"
            )
        elif canonical is None:
            shown = origin if origin.isprintable() else repr(origin)
            errors.append(f"{shown}: not a web origin; write https://host or https://host:port")
        elif canonical != origin:
            errors.append(f"{origin}: write it as a browser sends it: {canonical}")
        elif origin in seen:
            errors.append(f"{origin}: listed twice")
        seen.add(origin)
    return errors


def _origin_canonical(origin: str) -> str | None:
    """The serialized origin (the Fetch standard's) a browser would send for this https URL (or http URL of a
    loopback IP), or None when it is not one: another scheme, a user, a query or a fragment, a path other
    than "/", an unparsable port, no host, or a wildcard."""
    if not origin.isascii():
        return None  # a browser sends an IDN host in its ASCII form (xn--)
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return None
    host = parts.hostname
    scheme = parts.scheme.lower()
    if (
        scheme not in ("https", "http")
        or not host
        or "*" in host
        or "@" in parts.netloc
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or origin.endswith(("?", "#"))
    ):
        return None
    host = _origin_host(host)
    if host is None or (scheme == "http" and not _is_loopback_http(f"http://{host}")):
        return None
    default = 443 if scheme == "https" else 80
    return f"{scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


ORIGIN_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-")


def _origin_host(host: str) -> str | None:
    """A host as a browser serializes it in an origin (the URL Standard's host serializer), or None when no
    browser would send it: an IPv6 address compressed, in brackets; an IPv4 address in dotted decimal
    (``127.1`` and ``0x7f.0.0.1`` are 127.0.0.1 to a browser); a name in lowercase letters, digits, dots
    and hyphens alone (a percent-escape or another character is no host a browser sends)."""
    if ":" in host:
        try:
            return f"[{ipaddress.IPv6Address(host).compressed}]"
        except ValueError:
            return None
    if not set(host) <= ORIGIN_HOST_CHARS:
        return None
    last = host.rstrip(".").rsplit(".", 1)[-1]
    if last.isdigit() or last.startswith("0x"):  # the URL Standard's "ends in a number": an IPv4 address
        try:
            return socket.inet_ntoa(socket.inet_aton(host))
        except OSError:
            return None
    return host


def _uri_registered(uri: str, registered_text: str) -> bool:
    """Whether ``uri`` is one of the URIs registered in ``registered_text`` (space-separated): DOT's check,
    and the registered string itself, or for a loopback IP the same string but for the port."""
    # A URI that does not parse (a port out of range, a broken IPv6 literal: stored before clean()
    # refused them) matches nothing, and must not make DOT's check raise for the others.
    registered = [r for r in registered_text.split() if uri_parses(r)]
    if not uri_parses(uri):
        return False
    allowed, _reasons = dot.check_redirect_to_uri_allowed(uri, registered)
    return allowed and any(_same_redirect_uri(uri, r) for r in registered)


def _same_redirect_uri(uri: str, registered: str) -> bool:
    """The same string; for a loopback IP, the same string but for the port (RFC 8252 §7.3)."""
    if uri == registered:
        return True
    if not _is_loopback_http(registered):
        return False
    asked, mine = urlsplit(uri), urlsplit(registered)
    return asked._replace(netloc=_without_port(asked.netloc)) == mine._replace(
        netloc=_without_port(mine.netloc)
    )


def _without_port(netloc: str) -> str:
    host, colon, port = netloc.rpartition(":")
    return host if colon and not host.endswith(":") and (port.isdigit() or not port) else netloc


ADMIN_SCOPES = frozenset({"admin.read", "admin.write"})  # the admin API's scopes
AUTH_TIME_SESSION_KEY = "portcullis_auth_time"  # when the session's user signed in (Unix seconds): max_age
# A request attribute: what the RP-initiated logout that ends the session knows (the client that asked), for
# the sign-out's audit record (receivers.logout_succeeded)
SIGN_OUT_DETAILS = "portcullis_sign_out"


class Client(dot.AbstractApplication):
    """An OAuth client (DOT's Application) with the fields Portcullis needs."""

    description = models.TextField(blank=True)
    logo_url = models.URLField(blank=True)
    disabled = models.BooleanField(default=False)
    grant_types = models.JSONField(default=list, blank=True, help_text="Grant types this client may use")
    allowed_scopes = models.TextField(blank=True, help_text="Space-separated scopes this client may request")
    can_introspect = models.BooleanField(default=False)
    is_admin_client = models.BooleanField(default=False)

    class Meta(dot.AbstractApplication.Meta):
        swappable = "OAUTH2_PROVIDER_APPLICATION_MODEL"

    def allows_grant_type(self, *grant_types: str) -> bool:
        """Return whether any of these grant types is one this client may use."""
        allowed = set(self.grant_types or [self.authorization_grant_type])
        if self.client_type == self.CLIENT_PUBLIC:
            allowed.discard(self.GRANT_CLIENT_CREDENTIALS)  # RFC 6749 §4.4: confidential clients only
        return bool(allowed.intersection(grant_types))

    def is_usable(self, request: Any) -> bool:
        """A disabled client can do nothing (DOT calls this on every flow)."""
        return not self.disabled

    def scope_list(self) -> list[str]:
        """Return the scopes this client may request."""
        return self.allowed_scopes.split()

    def may_ask_for(self, scopes: list[str]) -> bool:
        """Whether this client may ask for these scopes: its own, and admin scopes only if an admin marked it
        administrative (the token endpoint and device authorization both ask)."""
        if ADMIN_SCOPES.intersection(scopes) and not self.is_admin_client:
            return False
        return set(scopes) <= set(self.scope_list())

    def redirect_uri_allowed(self, uri: str) -> bool:
        """DOT's check, and the registered string itself (OpenID Connect Core §3.1.2.1: simple string
        comparison): DOT compares the host without regard to case, and sent a code to a spelling that was
        never registered. A loopback IP redirect may differ in its port alone (RFC 8252 §7.3)."""
        return _uri_registered(uri, self.redirect_uris)

    def post_logout_redirect_uri_allowed(self, uri: str) -> bool:
        """Where RP-initiated logout may send the user: one of ``post_logout_redirect_uris`` (RP-Initiated
        Logout §2: it MUST have been registered), compared as ``redirect_uri_allowed`` compares. Anything
        else is refused, never followed: an endpoint that redirects anywhere is an open redirect."""
        return _uri_registered(uri, self.post_logout_redirect_uris)

    def get_allowed_schemes(self) -> list[str]:
        # http is let through to DOT's validator only so that clean() can accept loopback redirect
        # URIs for native apps (RFC 8252 §7.3); clean() refuses every other http URI.
        return ["https", "http"]

    def clean(self) -> None:
        errors: dict[str, list[str]] = {}
        for field, what in (("redirect_uris", "redirect"), ("post_logout_redirect_uris", "post-logout")):
            uris = getattr(self, field).split()
            if unparsable := redirect_uri_errors(uris):
                errors[field] = unparsable
            for uri in filter(uri_parses, uris):
                if uri.startswith("http:") and not _is_loopback_http(uri):
                    errors.setdefault(field, []).append(
                        f"{uri}: {what} URIs must use https (http only for a loopback IP, RFC 8252)"
                    )
        # DOT checks the redirect URIs' form (a scheme it allows, a host, no fragment); not these
        check = AllowedURIValidator(
            self.get_allowed_schemes(), "post logout redirect uri", allow_path=True, allow_query=True
        )
        for uri in filter(uri_parses, self.post_logout_redirect_uris.split()):
            try:
                check(uri)
            except ValidationError as exc:
                errors.setdefault("post_logout_redirect_uris", []).extend(exc.messages)
        if bad_origins := origin_errors(self.allowed_origins.split()):
            errors["allowed_origins"] = bad_origins
        bad = set(self.grant_types) - ALLOWED_GRANT_TYPES
        if bad:
            errors["grant_types"] = [f"unsupported grant types: {', '.join(sorted(bad))}"]
        if self.client_type == self.CLIENT_PUBLIC:
            for field, message in self._public_refusals():
                errors.setdefault(field, []).append(message)
        try:
            super().clean()
        except ValidationError as exc:
            for field, messages in exc.message_dict.items():
                if field == "allowed_origins":
                    continue  # DOT's check is https alone; origin_errors is stricter but for a loopback IP
                errors.setdefault(field, []).extend(messages)
        if errors:
            raise ValidationError(errors)

    def _public_refusals(self) -> list[tuple[str, str]]:
        """What a public client may not have: it has no secret, so it cannot authenticate (RFC 6749 §2.1),
        and its stored secret is a hash of "", which an empty secret matched (DOT's check)."""
        refusals = []
        if self.GRANT_CLIENT_CREDENTIALS in self.grant_types:
            refusals.append(
                ("grant_types", "client credentials are for confidential clients (RFC 6749 §4.4)")
            )
        if self.can_introspect:
            refusals.append(("can_introspect", "a public client cannot authenticate to introspect"))
        if self.is_admin_client:
            refusals.append(("is_admin_client", "a public client cannot be administrative"))
        return refusals

    @cached_property
    def jwk_key(self) -> jwk.JWK:
        """Sign ID tokens with the active rotating key (replaces DOT's static OIDC_RSA_PRIVATE_KEY).

        Read once per client object, so once per request: DOT reads it once for the ``kid`` and again to
        sign, and a rotation between the two reads must not give a ``kid`` naming another key."""
        from authserver.crypto import ID_TOKEN_ALGORITHM
        from authserver.selectors import signing_key_active

        return signing_key_active(ID_TOKEN_ALGORITHM).private_jwk()


class AccessToken(dot.AbstractAccessToken):
    """A record of an issued JWT access token; the token itself is stored only as a checksum."""

    jti = models.UUIDField(unique=True, null=True, editable=False)

    class Meta(dot.AbstractAccessToken.Meta):
        swappable = "OAUTH2_PROVIDER_ACCESS_TOKEN_MODEL"


class RevokedAccessToken(models.Model):
    """A revoked access token's id, kept until the token would have expired.

    DOT revokes an access token by deleting its row, and the pushes that tell gateways live in memory (and
    in Redis, which may restart empty): without this row a gateway that starts later would take the token
    again. Each gateway process loads the live rows at start and every few seconds
    (``selectors.revocations_live``); ``revoked_access_tokens_prune`` deletes them once they have expired.
    """

    jti = models.UUIDField(primary_key=True)
    expires = models.DateTimeField(db_index=True)
    # Indexed: after its first read a gateway reads only the rows revoked since (``revocations_live``).
    revoked_at = models.DateTimeField(auto_now_add=True, db_index=True)


class RefreshToken(dot.AbstractRefreshToken):
    # The user's sign-in that the code this family came from was approved in: an ID token a refresh gives
    # keeps it (OIDC Core §12.2), where DOT put the user's last sign-in anywhere.
    auth_time = models.DateTimeField(null=True, blank=True)
    # The scope its family was granted (RFC 6749 §6: a refresh token's scope is the one originally granted,
    # and a rotation keeps it, whatever narrower scope the refresh asked for). DOT keeps none and reads the
    # scope of the family's latest access token, which one narrowed refresh narrowed for good. Empty on a
    # token issued before this column (or by a replica still on the code before it: the database default):
    # DOT's reading then holds.
    scope = models.TextField(blank=True, default="", db_default="")

    class Meta(dot.AbstractRefreshToken.Meta):
        swappable = "OAUTH2_PROVIDER_REFRESH_TOKEN_MODEL"


class IDToken(dot.AbstractIDToken):
    class Meta(dot.AbstractIDToken.Meta):
        swappable = "OAUTH2_PROVIDER_ID_TOKEN_MODEL"


class Grant(dot.AbstractGrant):
    # When the user signed in to the session that approved this code: the ID tokens it leads to say so in
    # auth_time (OIDC Core §2). None for a session that predates the record (DOT's last_login is used).
    auth_time = models.DateTimeField(null=True, blank=True)
    # Whether the authorization request named its redirect URI: then the token request must name it too
    # (RFC 6749 §4.1.3). oauthlib fills in a client's only URI at both ends and could not tell. The
    # database default lets a replica still on the code before this column insert grants during a deploy.
    redirect_uri_given = models.BooleanField(default=False, db_default=False)

    class Meta(dot.AbstractGrant.Meta):
        swappable = "OAUTH2_PROVIDER_GRANT_MODEL"


class RedeemedCode(models.Model):
    """A tombstone for a redeemed authorization code (RFC 6749 §4.1.2: a replay revokes what it issued).

    DOT deletes a grant when it is redeemed; this row keeps the code's hash and what it issued so that a
    replayed code can be recognised and its tokens revoked.
    """

    code_hash = models.CharField(max_length=64, unique=True)
    client = models.ForeignKey(settings.OAUTH2_PROVIDER_APPLICATION_MODEL, on_delete=models.CASCADE)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.CASCADE)
    access_token_jti = models.UUIDField(null=True)
    token_family = models.UUIDField(null=True)
    redeemed_at = models.DateTimeField(auto_now_add=True)
    expires = models.DateTimeField(help_text="When the tombstone may be cleaned up")


class Consent(models.Model):
    """A user's remembered consent for a client and a set of scopes."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="consents")
    client = models.ForeignKey(
        settings.OAUTH2_PROVIDER_APPLICATION_MODEL, on_delete=models.CASCADE, related_name="consents"
    )
    scope = models.TextField()
    granted_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "client"], name="one_consent_per_user_client")]

    def covers(self, scopes: list[str]) -> bool:
        """Return whether this consent already includes every one of these scopes."""
        return set(scopes) <= set(self.scope.split())


class SigningKey(models.Model):
    """A JWS signing key; the private part is encrypted at rest with the key-encryption key."""

    class State(models.TextChoices):
        PENDING = "pending"
        ACTIVE = "active"
        RETIRED = "retired"
        REMOVED = "removed"

    kid = models.CharField(max_length=64, unique=True)
    algorithm = models.CharField(max_length=10, default="RS256")
    public_jwk = models.JSONField()
    private_key_encrypted = models.BinaryField()
    state = models.CharField(max_length=10, choices=State.choices, default=State.PENDING, db_index=True)
    created_at = models.DateTimeField(auto_now_add=True)
    publish_at = models.DateTimeField(help_text="Published in the JWKS from this time")
    activate_after = models.DateTimeField(help_text="May start signing from this time")
    activated_at = models.DateTimeField(null=True, blank=True)
    retired_at = models.DateTimeField(null=True, blank=True)
    remove_after = models.DateTimeField(null=True, blank=True, help_text="Unpublish after this time")
    removed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.kid} ({self.state})"

    def private_jwk(self) -> jwk.JWK:
        """Return the decrypted private key as a JWK (decrypted once per process)."""
        from authserver.selectors import private_jwk_for

        return private_jwk_for(self.kid, bytes(self.private_key_encrypted))

    def private_signing_key(self) -> Any:
        """Return the decrypted private key as a ``cryptography`` key object (for PyJWT)."""
        from authserver.selectors import private_signing_key_for

        return private_signing_key_for(self.kid, bytes(self.private_key_encrypted))


class SigningFamily(models.Model):
    """A key family (an algorithm) some process signs with; key rotation keeps such a family in use."""

    algorithm = models.CharField(max_length=10, primary_key=True)
    wanted_at = models.DateTimeField(help_text="When a process last signed, or asked to sign, with it")

    def __str__(self) -> str:
        return f"{self.algorithm} (wanted {self.wanted_at:%Y-%m-%d %H:%M})"
