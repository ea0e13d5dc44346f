"""What a client may be: the registration and change rules that the services and the model enforce."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.exceptions import ValidationError

from audit.models import AuditEvent
from authserver.models import Client
from authserver.services import client_create, client_register, client_update

pytestmark = pytest.mark.django_db

ADMIN = "user:root"
NATIVE: dict[str, Any] = {"name": "Native", "public": True, "redirect_uris": ["http://127.0.0.1/cb"]}
# What only a client that can authenticate may have: a public one has no secret (RFC 6749 §2.1)
CONFIDENTIAL_ONLY: list[tuple[dict[str, Any], str]] = [
    ({"grant_types": ["authorization-code", "client-credentials"]}, "grant_types"),
    ({"can_introspect": True}, "can_introspect"),
    ({"is_admin_client": True}, "is_admin_client"),
]


@pytest.mark.parametrize(("extra", "field"), CONFIDENTIAL_ONLY)
def test_a_public_client_cannot_be_created_with_client_credentials_introspection_or_admin(extra, field):
    with pytest.raises(ValidationError) as refused:
        client_create(**{"grant_types": ["authorization-code"], **NATIVE, **extra}, actor=ADMIN)
    assert field in refused.value.message_dict
    assert not Client.objects.exists()
    assert not AuditEvent.objects.filter(kind__startswith="client.").exists()


def test_registering_a_public_client_that_introspects_is_refused_as_createclient_would_be():
    with pytest.raises(ValidationError) as refused:
        client_register(grant_types=["device-code"], can_introspect=True, **NATIVE)
    assert "can_introspect" in refused.value.message_dict
    assert not Client.objects.exists()


@pytest.mark.parametrize(("change", "field"), CONFIDENTIAL_ONLY)
def test_a_public_client_cannot_be_changed_to_have_client_credentials_introspection_or_admin(change, field):
    public = client_create(grant_types=["authorization-code"], **NATIVE, actor=ADMIN).client
    with pytest.raises(ValidationError) as refused:
        client_update(client=public, actor=ADMIN, **change)
    assert field in refused.value.message_dict
    stored = Client.objects.get(pk=public.pk)
    assert (stored.grant_types, stored.can_introspect, stored.is_admin_client) == (
        [Client.GRANT_AUTHORIZATION_CODE],
        False,
        False,
    )
    assert not AuditEvent.objects.filter(kind="client.changed").exists()


def test_a_confidential_client_may_have_client_credentials_introspection_and_admin():
    registered = client_create(
        name="Service",
        grant_types=["client-credentials"],
        can_introspect=True,
        is_admin_client=True,
        actor=ADMIN,
    )
    assert registered.client_secret
    stored = Client.objects.get(pk=registered.client.pk)
    assert (stored.can_introspect, stored.is_admin_client) == (True, True)
