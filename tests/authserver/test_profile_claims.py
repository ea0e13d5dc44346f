"""The profile scope gives the profile claims the user model holds, in userinfo and the ID token: the consent
page promises "your user name and profile details"."""

from __future__ import annotations

import pytest

from authserver.tokens import jwt_unverified_claims

pytestmark = pytest.mark.django_db


def signed_in_tokens(oauth, make_client, user, scope: str) -> dict[str, str]:
    reg = make_client(grants=("authorization-code",), scopes="openid profile models.read")
    oauth.http.force_login(user)
    answer = oauth.code_tokens(reg, scope)
    assert answer.status_code == 200, answer.content
    return dict(answer.json())


def userinfo(oauth, access_token: str) -> dict[str, str]:
    answer = oauth.http.get("/oauth/userinfo/", HTTP_AUTHORIZATION=f"Bearer {access_token}")
    assert answer.status_code == 200, answer.content
    return dict(answer.json())


def test_the_profile_scope_gives_the_users_name_in_userinfo_and_the_id_token(oauth, make_client, alice):
    alice.first_name, alice.last_name = "Alice", "Liddell"
    alice.save()
    tokens = signed_in_tokens(oauth, make_client, alice, "openid profile")
    expected = {
        "sub": str(alice.pk),
        "preferred_username": "alice",
        "name": "Alice Liddell",
        "given_name": "Alice",
        "family_name": "Liddell",
    }
    assert userinfo(oauth, tokens["access_token"]) == expected
    id_token = jwt_unverified_claims(tokens["id_token"])
    assert {claim: id_token.get(claim) for claim in expected} == expected


def test_a_name_not_set_is_left_out_not_sent_empty(oauth, make_client, alice):
    tokens = signed_in_tokens(oauth, make_client, alice, "openid profile")
    assert userinfo(oauth, tokens["access_token"]) == {"sub": str(alice.pk), "preferred_username": "alice"}


def test_without_the_profile_scope_only_the_subject_is_given(oauth, make_client, alice):
    alice.first_name = "Alice"
    alice.save()
    tokens = signed_in_tokens(oauth, make_client, alice, "openid")
    assert userinfo(oauth, tokens["access_token"]) == {"sub": str(alice.pk)}
    assert "preferred_username" not in jwt_unverified_claims(tokens["id_token"])
