"""A registry other apps fill in so the consent screen can show what they own (models, limits).

The authorization server must not import the gateway; the gateway registers a provider here instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

ConsentDetailProvider = Callable[[Any], list[tuple[str, str]]]
_consent_detail_providers: list[ConsentDetailProvider] = []


def consent_detail_provider_register(provider: ConsentDetailProvider) -> None:
    """Register a callable(client) -> [(label, value)] shown on the consent screen."""
    if provider not in _consent_detail_providers:
        _consent_detail_providers.append(provider)


def consent_details_for(client: Any) -> list[tuple[str, str]]:
    """Collect the extra consent-screen lines for a client from every registered provider."""
    details: list[tuple[str, str]] = []
    for provider in _consent_detail_providers:
        details.extend(provider(client))
    return details
