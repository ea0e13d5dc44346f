"""Console fixtures: the three kinds of people (admin, read-only staff, plain user) and a small world."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client as HttpClient
from django.utils import timezone

from audit.models import AuditReport, UsageRecord
from authserver.models import AccessToken
from authserver.services import RegisteredClient, client_register, consent_grant
from tests.conftest import OAuthDriver

PASSWORD = "a long and good password"


@pytest.fixture
def admin_user(django_user_model: Any) -> Any:
    return django_user_model.objects.create_superuser("root", "root@example.com", PASSWORD)


@pytest.fixture
def staff_user(django_user_model: Any) -> Any:
    return django_user_model.objects.create_user("viewer", "viewer@example.com", PASSWORD, is_staff=True)


@pytest.fixture
def member(django_user_model: Any) -> Any:
    return django_user_model.objects.create_user("mallory", "mallory@example.com", PASSWORD)


@pytest.fixture
def signed_in() -> Callable[[Any], HttpClient]:
    """Return a test client signed in as the given user (or anonymous for None)."""

    def make(user: Any) -> HttpClient:
        http = HttpClient()
        if user is not None:
            http.force_login(user)
        return http

    return make


@pytest.fixture
def as_admin(admin_user: Any, signed_in: Callable[[Any], HttpClient]) -> HttpClient:
    return signed_in(admin_user)


@dataclass
class World:
    """Objects every console page can be pointed at."""

    app: RegisteredClient
    token: AccessToken
    user: Any
    report: AuditReport


def issue_token(reg: RegisteredClient, scope: str = "models.read completions") -> AccessToken:
    """Get a real token from the token endpoint and return its row."""
    response = OAuthDriver(http=HttpClient()).client_credentials(reg, scope)
    assert response.status_code == 200, response.content
    return AccessToken.objects.filter(application=reg.client).latest("created")


@pytest.fixture
def world(db: None, member: Any) -> World:
    app = client_register(
        name="Acme reports",
        grant_types=["client-credentials", "authorization-code"],
        redirect_uris=["https://acme.example.com/cb"],
        scopes=["models.read", "completions"],
    )
    token = issue_token(app)
    consent_grant(user=member, client=app.client, scopes=["models.read"])
    now = timezone.now()
    report = AuditReport.objects.create(
        kind=AuditReport.Kind.DAILY,
        format="csv",
        since=now - timedelta(days=1),
        until=now,
        content="kind,outcome\r\ntoken.issued,success\r\n",
    )
    UsageRecord.objects.create(
        request_id="req-world-1",
        occurred_at=now,
        client_id=app.client.client_id,
        endpoint="chat",
        model="m1",
        status=200,
        prompt_tokens=5,
        completion_tokens=7,
    )
    return World(app=app, token=token, user=member, report=report)
