"""Reads for the gateway: the policy snapshot each process keeps, and what the consent screen shows."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from audit.context import ip_in_networks
from authserver.models import Client
from gateway.models import ClientPolicy

DEFAULT = "*"  # the snapshot key of the default policy


@dataclass(frozen=True, slots=True)
class Policy:
    """A client's policy as the hot path reads it (immutable; replaced whole on a push)."""

    models: frozenset[str]
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    daily_tokens: int | None = None
    max_tokens: int | None = None
    user_rpm: int | None = None
    user_tpm: int | None = None
    allow_ips: tuple[str, ...] = ()
    allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def ip_allowed(self, ip: str | None) -> bool:
        """Return whether a client IP may call under this policy (no allowlist: any address)."""
        return not self.allow_networks or ip_in_networks(ip, self.allow_networks)


NO_ACCESS = Policy(models=frozenset())


def policy_from_row(row: ClientPolicy) -> Policy:
    """Return the hot-path view of one policy row."""
    return Policy(
        models=frozenset(row.allowed_models),
        rpm=row.rpm,
        tpm=row.tpm,
        concurrency=row.concurrency,
        daily_tokens=row.daily_tokens,
        max_tokens=row.max_tokens,
        user_rpm=row.user_rpm,
        user_tpm=row.user_tpm,
        allow_ips=tuple(row.allow_ips),
        allow_networks=tuple(ipaddress.ip_network(cidr, strict=False) for cidr in row.allow_ips),
    )


def policies_snapshot() -> dict[str, Policy]:
    """Return every policy keyed by client id, the default under ``DEFAULT``."""
    snapshot: dict[str, Policy] = {}
    for row in ClientPolicy.objects.select_related("client"):
        key = row.client.client_id if row.client is not None else DEFAULT
        snapshot[key] = policy_from_row(row)
    return snapshot


def origins_snapshot() -> dict[str, frozenset[bytes]]:
    """Return the web origins each client lists (its ``allowed_origins``, the field DOT's token endpoint reads
    for CORS too), keyed by client id: the browser pages that may call /v1 with its tokens. As bytes, the
    form the hot path compares a request's ``Origin`` header in (a browser sends the serialized origin,
    ``scheme://host[:port]``, which is the only form ``authserver.models.origin_errors`` lets be saved)."""
    snapshot: dict[str, frozenset[bytes]] = {}
    for client_id, origins in (
        Client.objects.filter(disabled=False)
        .exclude(allowed_origins="")
        .values_list("client_id", "allowed_origins")
    ):
        listed = frozenset(origin.encode("ascii", "replace") for origin in origins.split())
        if listed:
            snapshot[client_id] = listed
    return snapshot


def policy_for_client(client_id: str) -> Policy | None:
    """Return one client's own policy row (None when it uses the default)."""
    row = ClientPolicy.objects.filter(client__client_id=client_id).first()
    return policy_from_row(row) if row is not None else None


def consent_details(client: Any) -> list[tuple[str, str]]:
    """Lines for the consent screen: which models the app reaches and the limits that apply."""
    own = policy_for_client(client.client_id)
    default = ClientPolicy.objects.filter(client__isnull=True).first()
    policy = own or (policy_from_row(default) if default is not None else NO_ACCESS)
    models = ", ".join(sorted(policy.models)) or "none"
    limits = [
        f"{policy.rpm} requests/minute" if policy.rpm else "",
        f"{policy.tpm} tokens/minute" if policy.tpm else "",
        f"{policy.daily_tokens} tokens/day" if policy.daily_tokens else "",
    ]
    return [("Models it can use", models), ("Limits", ", ".join(x for x in limits if x) or "none set")]
