"""Who reaches which console page: a table over EVERY URL in console/urls.py, so none can be forgotten.

A page declares its rule with ``console.access`` (read, write or user); a page without one fails here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.test import Client as HttpClient
from django.urls import URLPattern, URLResolver, reverse

from audit.models import AuditEvent
from authserver.models import SigningKey
from console import urls as console_urls
from tests.console.conftest import World

# What each kind of person gets on a GET, by the page's declared access rule.
EXPECTED = {
    "read": {"anonymous": "login", "member": 403, "staff": 200, "admin": 200},
    "write": {"anonymous": "login", "member": 403, "staff": 403, "admin": 200},
    "user": {"anonymous": "login", "member": 200, "staff": 200, "admin": 200},
}
# Pages about one object: which object of the world their ``pk`` names.
PK_OF = {
    "token-revoke": lambda w: w.token.pk,
    "user-detail": lambda w: w.user.pk,
    "user-lock": lambda w: w.user.pk,
    "user-unlock": lambda w: w.user.pk,
    "report-download": lambda w: w.report.pk,
}


def page_patterns() -> Iterator[URLPattern]:
    """Yield every console page (the admin API is checked by its own table below)."""
    for entry in console_urls.urlpatterns:
        if isinstance(entry, URLPattern):
            yield entry


def api_patterns(patterns: list[Any] | None = None, prefix: str = "") -> Iterator[tuple[str, URLPattern]]:
    """Yield (route, pattern) for every admin API URL."""
    for entry in console_urls.urlpatterns if patterns is None else patterns:
        if isinstance(entry, URLResolver):
            yield from api_patterns(entry.url_patterns, prefix + str(entry.pattern))
        elif patterns is not None:
            yield prefix + str(entry.pattern), entry


def url_for(pattern: URLPattern, world: World) -> str:
    """Reverse a page with the world's objects for its arguments; fail for an argument nobody knows."""
    kwargs: dict[str, Any] = {}
    for name in pattern.pattern.regex.groupindex:
        if name == "client_id":
            kwargs[name] = world.app.client.client_id
        elif name == "kid":
            kwargs[name] = SigningKey.objects.filter(state=SigningKey.State.ACTIVE).values("kid")[0]["kid"]
        elif name == "pk":
            assert pattern.name in PK_OF, f"tell PK_OF which object {pattern.name} takes"
            kwargs[name] = PK_OF[pattern.name](world)
        else:
            raise AssertionError(f"no sample value for <{name}> in {pattern.name}")
    return reverse(f"console:{pattern.name}", kwargs=kwargs)


def people(
    member: Any, staff_user: Any, admin_user: Any, signed_in: Callable[[Any], HttpClient]
) -> dict[str, HttpClient]:
    return {
        "anonymous": signed_in(None),
        "member": signed_in(member),
        "staff": signed_in(staff_user),
        "admin": signed_in(admin_user),
    }


def test_every_console_page_declares_who_may_use_it():
    for pattern in page_patterns():
        assert getattr(pattern.callback, "console_access", None) in EXPECTED, pattern.name


def test_the_url_list_is_not_empty_so_the_tables_below_check_something():
    names = {p.name for p in page_patterns()}
    assert {"dashboard", "clients", "tokens", "users", "audit", "keys", "connected-apps"} <= names
    assert len(list(api_patterns())) >= 10


@pytest.mark.parametrize("pattern", list(page_patterns()), ids=lambda p: p.name)
def test_each_page_gives_anonymous_users_the_login_page_others_a_403_and_staff_the_page(
    pattern, world, member, staff_user, admin_user, signed_in
):
    url = url_for(pattern, world)
    rule = EXPECTED[pattern.callback.console_access]
    for who, http in people(member, staff_user, admin_user, signed_in).items():
        response = http.get(url)
        expected = rule[who]
        if expected == "login":
            assert response.status_code == 302, (who, url)
            assert response["Location"].startswith("/accounts/login/?next="), (who, url)
        elif pattern.name == "connected-app-withdraw" and who != "member":
            assert response.status_code == 404  # only the member connected this app
        else:
            assert response.status_code == expected, (who, url, response.status_code)
        if response.status_code == 200:  # neither a cache nor the back button after signing out keeps it
            assert response["Cache-Control"] in ("no-store, private", "no-store"), (who, url)
        if response.status_code in (302, 403):
            body = b"".join(response.streaming_content) if response.streaming else response.content  # type: ignore[attr-defined]
            assert b"Acme reports" not in body  # never any data


@pytest.mark.parametrize("pattern", list(page_patterns()), ids=lambda p: p.name)
def test_a_post_to_any_page_by_anonymous_or_non_staff_users_changes_nothing(
    pattern, world, member, signed_in
):
    url = url_for(pattern, world)
    anonymous, outsider = signed_in(None), signed_in(member)
    last = AuditEvent.objects.order_by("-id").values_list("id", flat=True).first() or 0
    answer = anonymous.post(url, {"name": "x", "activate_now": "on"})
    assert answer.status_code == 302
    assert answer["Location"].startswith("/accounts/login/")
    assert not AuditEvent.objects.filter(id__gt=last).exists()  # sent to sign in, no more
    if pattern.callback.console_access != "user":
        assert outsider.post(url, {"name": "x", "activate_now": "on"}).status_code == 403
        [refusal] = AuditEvent.objects.filter(id__gt=last)  # the refusal, and nothing changed
        assert (refusal.kind, refusal.outcome, refusal.actor) == ("console.denied", "denied", "user:mallory")
        assert refusal.data == {
            "reason": f"no_{pattern.callback.console_access}_permission",
            "endpoint": f"console:{pattern.name}",
            "method": "POST",
        }
    world.app.client.refresh_from_db()
    assert not world.app.client.disabled


@pytest.mark.parametrize("route_pattern", list(api_patterns()), ids=lambda rp: rp[0])
def test_each_admin_api_url_refuses_anonymous_callers_with_401_and_non_staff_with_403(
    route_pattern, world, member, signed_in
):
    _route, pattern = route_pattern
    samples = {"client_id": world.app.client.client_id, "pk": str(world.token.pk), "kid": "k1"}
    kwargs = {name: samples[name] for name in pattern.pattern.regex.groupindex}
    url = reverse(f"console:{pattern.name}", kwargs=kwargs)
    for method in ("get", "post", "put", "patch", "delete"):
        anonymous = getattr(signed_in(None), method)(url, content_type="application/json")
        assert anonymous.status_code == 401, (method, url)
        assert anonymous["WWW-Authenticate"].startswith("Bearer")
        outsider = getattr(signed_in(member), method)(url, content_type="application/json")
        assert outsider.status_code == 403, (method, url)
