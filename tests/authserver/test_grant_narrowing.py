"""Taking grant types from a client revokes the tokens only those grants could give: a user's delegated
tokens (their refresh tokens too, which a remaining client-credentials grant let be refreshed for ever) when
no user grant is left, the client's own tokens when client credentials go."""

from __future__ import annotations

import pytest

from audit.models import AuditEvent
from authserver.models import AccessToken, Client, RevokedAccessToken
from authserver.services import client_update

pytestmark = pytest.mark.django_db

SCOPES = "models.read offline_access"
DEVICE = "urn:ietf:params:oauth:grant-type:device_code"


@pytest.fixture
def both(make_client):
    return make_client(grants=("authorization-code", "client-credentials"), scopes=SCOPES)


def user_tokens(oauth, reg, alice) -> dict[str, str]:
    oauth.http.force_login(alice)
    answer = oauth.code_tokens(reg, SCOPES)
    assert answer.status_code == 200, answer.content
    return dict(answer.json())


def refresh(oauth, reg, refresh_token: str):
    return oauth.token(
        {"grant_type": "refresh_token", "refresh_token": refresh_token},
        (reg.client.client_id, reg.client_secret),
    )


def test_taking_every_user_grant_revokes_the_users_tokens_and_keeps_the_clients_own(oauth, both, alice):
    delegated = user_tokens(oauth, both, alice)
    own = oauth.client_credentials(both, "models.read")
    assert own.status_code == 200
    client_update(client=both.client, actor="user:root", grant_types=[Client.GRANT_CLIENT_CREDENTIALS])
    assert not AccessToken.objects.filter(application=both.client, user=alice).exists()
    assert AccessToken.objects.filter(application=both.client, user__isnull=True).count() == 1
    assert RevokedAccessToken.objects.count() == 1  # recorded, and pushed to the gateways
    refused = refresh(oauth, both, delegated["refresh_token"])
    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_grant"
    event = AuditEvent.objects.filter(kind="token.revoked", client_id=both.client.client_id).latest("id")
    assert event.data == {"reason": "grant types narrowed", "tokens_revoked": 1, "refreshes_revoked": 1}
    assert event.actor == "user:root"


def test_taking_client_credentials_revokes_the_clients_own_tokens_and_keeps_the_users(oauth, both, alice):
    delegated = user_tokens(oauth, both, alice)
    assert oauth.client_credentials(both, "models.read").status_code == 200
    client_update(client=both.client, actor="user:root", grant_types=[Client.GRANT_AUTHORIZATION_CODE])
    assert not AccessToken.objects.filter(application=both.client, user__isnull=True).exists()
    assert AccessToken.objects.filter(application=both.client, user=alice).count() == 1
    assert refresh(oauth, both, delegated["refresh_token"]).status_code == 200


def test_a_user_grant_that_stays_keeps_every_token(oauth, make_client, alice):
    reg = make_client(grants=("authorization-code", "device-code"), scopes=SCOPES)
    delegated = user_tokens(oauth, reg, alice)
    client_update(client=reg.client, actor="user:root", grant_types=[DEVICE])
    assert AccessToken.objects.filter(application=reg.client, user=alice).count() == 1
    assert not AuditEvent.objects.filter(kind="token.revoked", client_id=reg.client.client_id).exists()
    assert refresh(oauth, reg, delegated["refresh_token"]).status_code == 200
