"""The prefix-cache salt keeps tenants' cached prompt prefixes apart, at the scope the operator chose."""

from __future__ import annotations

import pytest

from gateway.salt import cache_salt


def test_each_user_has_a_salt_of_their_own_and_a_client_without_a_user_its_own():
    alice, bob = cache_salt("user", "app", "alice"), cache_salt("user", "app", "bob")
    machine = cache_salt("user", "app", None)
    assert len({alice, bob, machine}) == 3
    assert alice == cache_salt("user", "app", "alice")  # the same in every process: replicas share it
    assert alice != cache_salt("user", "other-app", "alice")
    assert machine == cache_salt("client", "app", None)


def test_a_client_scope_puts_its_users_together_and_shared_sends_no_salt():
    assert cache_salt("client", "app", "alice") == cache_salt("client", "app", "bob")
    assert cache_salt("client", "app", "alice") != cache_salt("client", "other-app", "alice")
    assert cache_salt("shared", "app", "alice") is None


def test_ids_cannot_be_run_together_into_another_tenants_salt():
    assert cache_salt("user", "a", "b\x00c") != cache_salt("user", "a\x00b", "c")
    assert cache_salt("user", "a", '", "b') != cache_salt("user", 'a", "', "b")
    assert cache_salt("user", "app1", "x") != cache_salt("user", "app", "1x")


def test_the_salt_is_keyed_by_the_deployments_secret(settings):
    before = cache_salt("user", "app", "alice")
    cache_salt.cache_clear()
    settings.SECRET_KEY = "another-deployment-" + "x" * 40
    try:
        assert cache_salt("user", "app", "alice") != before  # nobody can compute a tenant's salt
    finally:
        cache_salt.cache_clear()


def test_a_mistyped_scope_in_a_settings_override_stops_the_gateway(settings):
    from django.core.exceptions import ImproperlyConfigured

    from gateway.conf import gateway_settings

    settings.GATEWAY = {**settings.GATEWAY, "PREFIX_CACHE_SCOPE": "tenant"}
    with pytest.raises(ImproperlyConfigured, match="PREFIX_CACHE_SCOPE"):
        gateway_settings()
