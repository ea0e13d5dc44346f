"""The oauthlib server Portcullis runs: OIDC's, minus the grants RFC 9700 retires.

The password grant (RFC 9700 §2.4) and every implicit or hybrid response type (§2.1.2) are removed, so
they are not merely refused per client: the endpoints answer ``unsupported_grant_type`` and
``unsupported_response_type`` for everyone. The code grant checks PKCE and the nonce more strictly than
oauthlib (``validators.authorization_request_check``, ``validators.code_verifier_check``), and the device
grant refuses a user deactivated since approving (``validators.device_user_check``).
"""

from __future__ import annotations

from typing import Any

from oauthlib.openid import Server

from authserver.validators import (
    authorization_request_check,
    claims_check,
    code_verifier_check,
    device_user_check,
)

SUPPORTED_RESPONSE_TYPES = {"code"}
RETIRED_GRANT_TYPES = {"password"}


class PortcullisServer(Server):
    def __init__(self, request_validator: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(request_validator, *args, **kwargs)
        grants: dict[str, Any] = vars(self)["_grant_types"]
        responses: dict[str, Any] = vars(self)["_response_types"]
        self._grant_types = {k: v for k, v in grants.items() if k not in RETIRED_GRANT_TYPES}
        self._response_types = {k: v for k, v in responses.items() if k in SUPPORTED_RESPONSE_TYPES}
        # The code grant exists twice (OAuth, and OpenID Connect that proxies one of its own): both check.
        for grant in (self.auth_grant, self.openid_connect_auth):
            grant.custom_validators.post_auth.append(authorization_request_check)
            grant.custom_validators.pre_token.append(code_verifier_check)
        self.openid_connect_auth.custom_validators.post_auth.insert(0, claims_check)  # before oauthlib's
        self.device_code_grant.custom_validators.post_token.append(device_user_check)
