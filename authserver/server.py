"""The oauthlib server Portcullis runs: OIDC's, minus the grants RFC 9700 retires.

The password grant (RFC 9700 §2.4) and every implicit or hybrid response type (§2.1.2) are removed, so
they are not merely refused per client: the endpoints answer ``unsupported_grant_type`` and
``unsupported_response_type`` for everyone.
"""

from __future__ import annotations

from typing import Any

from oauthlib.openid import Server

SUPPORTED_RESPONSE_TYPES = {"code"}
RETIRED_GRANT_TYPES = {"password"}


class PortcullisServer(Server):
    def __init__(self, request_validator: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(request_validator, *args, **kwargs)
        grants: dict[str, Any] = vars(self)["_grant_types"]
        responses: dict[str, Any] = vars(self)["_response_types"]
        self._grant_types = {k: v for k, v in grants.items() if k not in RETIRED_GRANT_TYPES}
        self._response_types = {k: v for k, v in responses.items() if k in SUPPORTED_RESPONSE_TYPES}
