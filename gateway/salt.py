"""Prefix-cache isolation: the ``cache_salt`` the gateway gives vLLM for each request it sends.

vLLM reuses the KV cache of a prompt prefix it has seen (automatic prefix caching), across requests and so
across tenants: a request whose prompt begins as someone else's did is answered sooner, and timing that
tells a prober what another tenant's prompt began with. A ``cache_salt`` (vLLM 0.9 and later) mixes into
the hash of a prompt's first block, so only requests with the same salt share cached prefixes. The gateway
refuses a client's own ``cache_salt`` and sends one per scope (``PORTCULLIS_PREFIX_CACHE_SCOPE``): a user's
(or, for a token without a user, its client's), a client's, or none (``shared``, vLLM's default, where
every tenant shares, and gains, the cache). A salt is an HMAC of the scope's ids under the deployment's
``SECRET_KEY``: the same in every gateway process, so replicas share a tenant's cache, and unpredictable
(as vLLM asks), so even a caller who could reach vLLM directly could not join another tenant's cache.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from functools import lru_cache

from django.conf import settings


@lru_cache(maxsize=65_536)
def cache_salt(scope: str, client_id: str, user: str | None) -> str | None:
    """The salt for a request of ``client_id`` (and ``user``) under a scope; None when the cache is shared."""
    if scope == "shared":
        return None
    owner = ["user", client_id, user] if scope == "user" and user else ["client", client_id]
    text = json.dumps(owner).encode()  # JSON: ids cannot run together
    return hmac.new(settings.SECRET_KEY.encode(), text, hashlib.sha256).hexdigest()[:32]
