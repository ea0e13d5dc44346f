"""The gateway's errors: each class carries its HTTP meaning, rendered in one place as an OpenAI error."""

from __future__ import annotations

from typing import ClassVar


class GatewayError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "api_error"
    code: ClassVar[str] = "internal_error"
    message: ClassVar[str] = "The gateway could not complete the request."

    def __init__(self, message: str | None = None, *, param: str | None = None) -> None:
        super().__init__(message or self.message)
        self.detail = message or self.message
        self.param = param
        self.headers: dict[str, str] = {}


class AuthenticationError(GatewayError):
    status, type, code = 401, "authentication_error", "invalid_token"
    message = "The access token is missing, malformed, expired or revoked."


class TokenRevoked(AuthenticationError):
    code = "token_revoked"
    message = "The access token was revoked."


class MissingCredentials(AuthenticationError):
    code = "missing_token"
    message = "An access token is required: send 'Authorization: Bearer <token>'."


class PermissionDenied(GatewayError):
    status, type, code = 403, "permission_error", "insufficient_scope"
    message = "The access token does not grant this operation."


class ModelNotAllowed(PermissionDenied):
    code = "model_not_allowed"
    message = "This client may not use that model."


class IpNotAllowed(PermissionDenied):
    code = "ip_not_allowed"
    message = "Requests from this address are not allowed for this client."


class OriginNotAllowed(PermissionDenied):
    code = "origin_not_allowed"
    message = "This client may not be called from this web page's origin."


class NotFound(GatewayError):
    status, type, code = 404, "not_found_error", "not_found"
    message = "No such endpoint."


class ModelNotFound(NotFound):
    code = "model_not_found"
    message = "The model does not exist."


class MethodNotAllowed(GatewayError):
    status, type, code = 405, "invalid_request_error", "method_not_allowed"
    message = "This method is not allowed on this endpoint."


class HttpsRequired(GatewayError):
    status, type, code = 403, "invalid_request_error", "https_required"
    message = "This API is served over HTTPS only: send the request (and a new access token) to https://."


class InvalidRequest(GatewayError):
    status, type, code = 400, "invalid_request_error", "invalid_request"
    message = "The request is not valid."


class BodyRefused(InvalidRequest):
    """A refusal while the body may still be arriving: the connection is closed after the answer (RFC 9110
    §15.5.9, §15.5.14), rather than kept to read and drop the rest of what the client sends."""

    def __init__(self, message: str | None = None, *, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.headers["connection"] = "close"


class BodyTooLarge(BodyRefused):
    status, code = 413, "request_too_large"
    message = "The request body is too large."


class RequestTimeout(BodyRefused):
    status, code = 408, "request_timeout"
    message = "The request body did not arrive in time."


class UnsupportedMediaType(InvalidRequest):
    status, code = 415, "unsupported_media_type"
    message = "The request body must be JSON (Content-Type: application/json)."


class RateLimited(GatewayError):
    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"
    message = "Rate limit exceeded."


class UpstreamUnavailable(GatewayError):
    status, type, code = 503, "api_error", "upstream_unavailable"
    message = "No upstream is available for this model right now."


class UpstreamBusy(GatewayError):
    status, type, code = 503, "api_error", "upstream_busy"
    message = "Every upstream connection of this gateway is in use; try again shortly."


class UpstreamFailed(GatewayError):
    status, type, code = 502, "api_error", "upstream_error"
    message = "The upstream failed to answer."


class UpstreamTimeout(GatewayError):
    status, type, code = 504, "api_error", "upstream_timeout"
    message = "The upstream did not answer in time."


class RevocationUnavailable(GatewayError):
    status, type, code = 503, "api_error", "revocation_state_unavailable"
    message = "Token revocation state cannot be checked right now; try again shortly."


class AuditBacklogFull(GatewayError):
    status, type, code = 503, "api_error", "audit_backlog_full"
    message = "The audit log cannot take more records right now; try again shortly."

    def __init__(self) -> None:
        super().__init__()
        self.headers["retry-after"] = "5"
