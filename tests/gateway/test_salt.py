"""The prefix-cache salt keeps tenants' cached prompt prefixes apart, at the scope the operator chose."""

from __future__ import annotations

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
