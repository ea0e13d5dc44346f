"""What the server publishes about itself: its key set (RFC 7517), RFC 8414 and OIDC discovery
metadata, and the gateway's protected-resource metadata (RFC 9728)."""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe
from oauth2_provider import views as dot_views
from oauth2_provider.settings import oauth2_settings
from oauth2_provider.views.metadata import OAuthServerMetadataView

from authserver.selectors import jwks_get


@never_cache
@require_safe
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
        # validators.OIDC_CLAIMS: what ID tokens and userinfo hold (DOT listed sub alone), unordered by DOT
        data["claims_supported"] = sorted(data["claims_supported"])
        # Absent, OIDC Discovery §3 reads it as authorization code and implicit; implicit is not served here.
        rfc8414 = json.loads(OAuthServerMetadataView().get(request).content)
        data["grant_types_supported"] = rfc8414["grant_types_supported"]
        # Absent, both read as true (OIDC Discovery §3), and a relying party sent parameters in request
        # objects that were ignored: the authorization endpoint answers them request(_uri)_not_supported
        data["request_parameter_supported"] = False
        data["request_uri_parameter_supported"] = False
        # prompt=consent shows the consent page even for remembered consent (AuthorizationView)
        prompts = data.get("prompt_values_supported", [])
        if "consent" not in prompts:
            data["prompt_values_supported"] = [*prompts, "consent"]
        return JsonResponse(data, headers={"Access-Control-Allow-Origin": "*"})


def metadata_extras() -> dict[str, Any]:
    """Return the endpoints DOT's metadata does not know about."""
    base = settings.PORTCULLIS_ISSUER
    extras: dict[str, Any] = {
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
    if oauth2_settings.OIDC_RP_INITIATED_LOGOUT_ENABLED:
        # OpenID Connect RP-Initiated Logout §2.1. DOT names it in its OIDC document only; IANA registers it
        # for RFC 8414 documents too, and both documents name every endpoint alike
        extras["end_session_endpoint"] = f"{base}/oauth/logout/"
    return extras


@require_safe
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
