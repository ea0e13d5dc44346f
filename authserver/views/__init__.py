"""Thin adapters over DOT's views: audit every outcome, remember consent, publish our key set and metadata.

One module per part of the server; this package names every view, so URL confs and settings
(``CSRF_FAILURE_VIEW``) refer to ``authserver.views.<name>`` as DOT's own ``views`` package does."""

from __future__ import annotations

from authserver.views.account import LoginView, LogoutView, csrf_failure
from authserver.views.authorize import AuthorizationView
from authserver.views.common import FormEndpoint, oauth_error
from authserver.views.device import (
    DeviceAuthorizationView,
    DeviceConfirmView,
    DeviceUserCodeForm,
    DeviceUserCodeView,
    device_entry,
)
from authserver.views.introspection import IntrospectView, UserInfoView
from authserver.views.logout import RPInitiatedLogoutView
from authserver.views.metadata import (
    OIDCDiscoveryView,
    ServerMetadataView,
    jwks,
    metadata_extras,
    protected_resource_metadata,
)
from authserver.views.tokens import RevokeTokenView, TokenView

__all__ = [
    "AuthorizationView",
    "DeviceAuthorizationView",
    "DeviceConfirmView",
    "DeviceUserCodeForm",
    "DeviceUserCodeView",
    "FormEndpoint",
    "IntrospectView",
    "LoginView",
    "LogoutView",
    "OIDCDiscoveryView",
    "RPInitiatedLogoutView",
    "RevokeTokenView",
    "ServerMetadataView",
    "TokenView",
    "UserInfoView",
    "csrf_failure",
    "device_entry",
    "jwks",
    "metadata_extras",
    "oauth_error",
    "protected_resource_metadata",
]
