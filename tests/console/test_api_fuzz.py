"""A schema-driven fuzz run over the admin API (schemathesis): no 500s, and every answer matches the
published OpenAPI schema. Bounded (a few examples per operation) so it runs in every CI build."""

from __future__ import annotations

import os
from typing import Any

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from django.test import Client as HttpClient
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.settings import patched_settings
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import ignored_auth, positive_data_acceptance

from console.api.urls import SchemaView
from tests.console.conftest import World

# Small by default so every build runs it; PORTCULLIS_FUZZ_EXAMPLES=200 for a deeper run.
EXAMPLES_PER_OPERATION = int(os.environ.get("PORTCULLIS_FUZZ_EXAMPLES", "5"))


def operations() -> list[tuple[str, str]]:
    """Every (method, path) the schema documents, read at collection time so each is its own test."""
    with patched_settings(SchemaView.custom_settings):
        schema = SchemaGenerator().get_schema(request=None, public=True)
    return [(method.upper(), path) for path, item in sorted(schema["paths"].items()) for method in item]


@pytest.fixture
def admin_http(db: None, admin_user: Any, world: World) -> HttpClient:
    """A signed-in superuser's session with its CSRF cookie set."""
    http = HttpClient()
    http.force_login(admin_user)
    http.get("/console/keys/rotate/")  # a page with a form sets the CSRF cookie
    return http


def test_the_fuzz_run_covers_every_operation_of_the_published_schema(admin_http):
    published = admin_http.get("/api/admin/schema/").json()
    documented = {(m.upper(), p) for p, item in published["paths"].items() for m in item}
    assert documented == set(operations())
    assert len(documented) >= 20


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
@pytest.mark.parametrize(("method", "path"), operations(), ids=lambda v: str(v))
def test_the_admin_api_never_fails_and_always_answers_as_its_schema_says(method, path, mode, admin_http):
    schema = schemathesis.openapi.from_dict(admin_http.get("/api/admin/schema/").json())
    cookies = {name: morsel.value for name, morsel in admin_http.cookies.items()}
    call = {
        "app": get_wsgi_application(),
        "cookies": cookies,
        "headers": {"X-CSRFToken": cookies["csrftoken"]},
    }

    @given(case=schema[path][method].as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    def fuzz(case: Any) -> None:
        # ignored_auth drops the bearer token to see a 401, but the session cookie still signs these
        # calls in (either scheme suffices); tests/console/test_api.py checks authentication itself.
        # positive_data_acceptance wants a 2xx for any schema-valid body, but business rules a schema
        # cannot state (a CIDR, admin scopes only for admin clients) rightly answer 400.
        response = case.call_and_validate(excluded_checks=[ignored_auth, positive_data_acceptance], **call)
        assert response.status_code < 500

    # Like Django's test client: keep the test's connection (and transaction) open across requests.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        fuzz()
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)
