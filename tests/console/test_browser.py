"""In a real browser (Playwright driving Debian's Chromium) against the real server (uvicorn): an admin runs
a client's life from the console, a user connects and disconnects an app, and the dashboard moves.

Screenshots of the main pages go to artifacts/screenshots/ (git-ignored) for people to look at.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import connection
from django.utils import timezone
from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright

from audit.models import AuditEvent, UsageRecord
from authserver.models import AccessToken, Consent
from authserver.services import RegisteredClient, client_register
from authserver.tokens import jwt_unverified_claims
from tests.e2e.conftest import ROOT, Server, start_server, stop

pytestmark = [pytest.mark.e2e, pytest.mark.django_db]

T = TypeVar("T")
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
ADMIN_PASSWORD = "an admin password that is long"
USER_PASSWORD = "a user password that is long"
REDIRECT = "https://app.example.com/callback"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@dataclass
class Stack:
    server: Server
    browser: Browser
    app: RegisteredClient
    pool: ThreadPoolExecutor

    def run(self, step: Callable[..., T], *args: Any) -> T:
        """Run a browser step on the browser's own thread.

        Playwright's sync API keeps an event loop in the thread that started it; Django would then take
        that thread for async code and refuse the tests' database reads. So the browser lives on one
        thread of its own, and the tests (and their database checks) stay on the main thread.
        """
        return self.pool.submit(step, *args).result(timeout=120)


def browser_start() -> tuple[Playwright, Browser]:
    playwright = sync_playwright().start()
    try:
        return playwright, playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
    except BaseException:  # no browser: Playwright's driver must not outlive the failure
        playwright.stop()
        raise


def browser_stop(playwright: Playwright, browser: Browser) -> None:
    browser.close()
    playwright.stop()


@pytest.fixture(scope="module")
def stack(
    django_db_setup: None, django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    with django_db_blocker.unblock():  # committed before any test transaction, so the server sees them
        users = get_user_model().objects
        users.create_superuser("root", "root@example.com", ADMIN_PASSWORD)
        users.create_user("erin", "erin@example.com", USER_PASSWORD)
        app = client_register(
            name="Notebook app",
            grant_types=["authorization-code"],
            redirect_uris=[REDIRECT],
            scopes=["models.read", "completions"],
        )
    server = start_server(tmp_path_factory.mktemp("console"))
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="browser")
    try:
        playwright, browser = pool.submit(browser_start).result(timeout=60)
        try:
            yield Stack(server=server, browser=browser, app=app, pool=pool)
        finally:
            pool.submit(browser_stop, playwright, browser).result(timeout=60)
    finally:  # the server goes even when the browser could not start: it holds the test database
        pool.shutdown()
        stop(server.process)
        with django_db_blocker.unblock():
            call_command("flush", interactive=False, verbosity=0)
    log = server.log.read_text()
    assert "Traceback" not in log, log


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def sign_in(page: Page, base: str, path: str, username: str, password: str) -> None:
    page.goto(f"{base}{path}")
    expect(page).to_have_url(re.compile(r"/accounts/login/"))
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("button[type=submit]")


def nav(page: Page, section: str) -> None:
    """Follow a link of the console's section navigation."""
    page.get_by_role("navigation", name="Console sections").get_by_role("link", name=section).click()


def committed(func: Any) -> None:
    """Run a write on its own connection so it commits at once (the test itself runs in a transaction)."""

    def run() -> None:
        try:
            func()
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()


def admin_creates_client_and_policy(stack: Stack) -> tuple[Page, str, str]:
    """Sign in, create a client, copy its secret, set a policy (after fixing a validation error)."""
    page = stack.browser.new_page()
    sign_in(page, stack.server.base, "/console/", "root", ADMIN_PASSWORD)
    expect(page.get_by_role("heading", name=re.compile("Dashboard"))).to_be_visible()
    nav(page, "Clients")
    page.get_by_role("link", name="New client").click()
    page.fill("#id_name", "Batch scorer")
    page.check("input[name=scopes][value='models.read']")
    page.check("input[name=scopes][value='completions']")
    page.get_by_role("button", name="Create client").click()
    expect(page.get_by_role("alert")).to_contain_text("shown only this once")
    client_id = page.inner_text("#client-id").strip()
    secret = page.inner_text("#client-secret").strip()
    shot(page, "client-created-secret-once")
    page.get_by_role("link", name="Set its policy").click()
    page.fill("#id_allowed_models", "m1")
    page.fill("#id_allow_ips", "10.0.0.0/8\nnot-a-network")
    page.get_by_role("button", name="Save policy").click()
    expect(page.get_by_role("alert")).to_contain_text("The policy was not saved")
    expect(page.locator(".errorlist")).to_contain_text("is not an IP network")
    shot(page, "policy-validation")
    page.fill("#id_allow_ips", "")
    page.fill("#id_rpm", "60")
    page.get_by_role("button", name="Save policy").click()
    expect(page.locator("#policy-summary")).to_contain_text("m1")
    shot(page, "client-detail")
    return page, client_id, secret


def admin_revokes_token(page: Page, client_id: str, jti: str) -> None:
    """Find the token on the Tokens page, filtered by its client, and revoke it."""
    nav(page, "Tokens")
    page.select_option("#filter-client", client_id)
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("table")).to_contain_text(jti)
    shot(page, "tokens")
    page.get_by_role("button", name=f"Revoke token {jti}").click()
    expect(page.get_by_role("status")).to_contain_text("revoked on every gateway")


def admin_sees_revocation_in_audit(page: Page, client_id: str) -> None:
    nav(page, "Audit")
    page.fill("#id_kind", "token.revoked")
    page.fill("#id_client_id", client_id)
    page.get_by_role("button", name="Filter").click()
    row = page.locator("tbody tr").first
    expect(row).to_contain_text("token.revoked")
    expect(row).to_contain_text("user:root")
    shot(page, "audit")
    page.close()


def test_an_admin_creates_a_client_sets_its_policy_and_revokes_its_token_from_the_console(stack):
    base = stack.server.base
    page, client_id, secret = stack.run(admin_creates_client_and_policy, stack)
    assert len(secret) == 128
    answer = httpx.post(
        f"{base}/oauth/token/",
        data={"grant_type": "client_credentials", "scope": "models.read"},
        auth=(client_id, secret),
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    token = answer.json()["access_token"]
    jti = jwt_unverified_claims(token)["jti"]
    bearer = {"authorization": f"Bearer {token}"}
    assert httpx.get(f"{base}/v1/models", headers=bearer, timeout=10).status_code == 200
    assert AccessToken.objects.filter(jti=jti).exists()

    stack.run(admin_revokes_token, page, client_id, jti)
    assert not AccessToken.objects.filter(jti=jti).exists()
    deadline = time.monotonic() + 5
    while httpx.get(f"{base}/v1/models", headers=bearer, timeout=10).status_code != 401:
        assert time.monotonic() < deadline, "the gateway kept accepting a revoked token"
        time.sleep(0.1)

    stack.run(admin_sees_revocation_in_audit, page, client_id)
    assert AuditEvent.objects.filter(kind="policy.changed", client_id=client_id, actor="user:root").exists()
    assert AuditEvent.objects.filter(kind="token.revoked", client_id=client_id, actor="user:root").exists()


def user_allows_app(stack: Stack, authorize_url: str) -> tuple[Any, Page, str]:
    """Sign in through the authorization request and press Allow; return the code the app receives."""
    context = stack.browser.new_context()
    page = context.new_page()
    page.route("https://app.example.com/**", lambda route: route.fulfill(status=200, body="back at the app"))
    sign_in(page, stack.server.base, authorize_url, "erin", USER_PASSWORD)
    expect(page.locator("#client-name")).to_have_text("Notebook app")
    shot(page, "consent")
    page.get_by_role("button", name="Allow").click()
    page.wait_for_url(re.compile(r"^https://app\.example\.com/callback"))
    return context, page, parse_qs(urlsplit(page.url).query)["code"][0]


def user_withdraws_app(context: Any, page: Page, base: str) -> None:
    page.goto(f"{base}/accounts/connected-apps/")
    item = page.locator(".app-list > li", has_text="Notebook app")
    expect(item).to_contain_text("See which models you can use")
    expect(item).to_contain_text("Generate text and chat completions")
    shot(page, "connected-apps")
    item.get_by_role("button", name="Remove access for Notebook app").click()
    expect(page.get_by_role("status")).to_contain_text("no longer has access")
    expect(page.locator(".app-list")).to_contain_text("No app has access to your account.")
    context.close()


def test_a_user_consents_to_an_app_and_withdraws_it_on_connected_apps(stack):
    base = stack.server.base
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    query = {
        "response_type": "code",
        "client_id": stack.app.client.client_id,
        "redirect_uri": REDIRECT,
        "scope": "models.read completions",
        "state": "s1",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    context, page, code = stack.run(user_allows_app, stack, f"/oauth/authorize/?{urlencode(query)}")
    exchanged = httpx.post(
        f"{base}/oauth/token/",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "code_verifier": verifier,
        },
        auth=(stack.app.client.client_id, str(stack.app.client_secret)),
        timeout=10,
    )
    assert exchanged.status_code == 200, exchanged.text
    assert Consent.objects.filter(user__username="erin", client=stack.app.client).exists()
    assert AccessToken.objects.filter(user__username="erin").exists()

    stack.run(user_withdraws_app, context, page, base)
    assert not Consent.objects.filter(user__username="erin").exists()
    assert not AccessToken.objects.filter(user__username="erin").exists()
    assert AuditEvent.objects.filter(kind="consent.withdrawn", actor="user:erin").exists()


def admin_opens_live_dashboard(stack: Stack) -> Page:
    page = stack.browser.new_page()
    sign_in(page, stack.server.base, "/console/", "root", ADMIN_PASSWORD)
    expect(page.locator("#live-state")).to_have_text("live", timeout=10_000)
    expect(page.locator("[data-live=requests_per_s]")).to_have_text("0.0")
    return page


def dashboard_shows_traffic(page: Page, base: str) -> None:
    expect(page.locator("[data-live=requests_per_s]")).to_have_text("2.5", timeout=6_000)  # 25 in 10 s
    expect(page.locator("[data-live=tokens_per_s]")).to_have_text("125.0")
    expect(page.locator("[data-live=denials]")).to_have_text("1")
    expect(page.locator("[data-live=active_streams]")).to_have_text("12")
    shot(page, "dashboard")
    page.goto(f"{base}/console/keys/")
    shot(page, "keys")
    page.goto(f"{base}/console/users/")
    shot(page, "users")
    page.close()


def test_the_dashboard_live_figures_move_when_traffic_flows(stack):
    page = stack.run(admin_opens_live_dashboard, stack)

    def traffic() -> None:
        now = timezone.now()
        UsageRecord.objects.bulk_create(
            UsageRecord(
                request_id=f"dashboard-{index}",
                occurred_at=now,
                client_id=stack.app.client.client_id,
                endpoint="chat",
                model="m1",
                status=429 if index == 0 else 200,
                stream=index % 2 == 1,
                prompt_tokens=20,
                completion_tokens=30,
            )
            for index in range(25)
        )

    committed(traffic)
    stack.run(dashboard_shows_traffic, page, stack.server.base)


def test_the_project_referrer_policy_lets_browsers_submit_forms(settings):
    # Under no-referrer, Chromium's form POSTs carry Origin: null and fail Django's CSRF origin check.
    assert settings.SECURE_REFERRER_POLICY in {
        "same-origin",
        "strict-origin",
        "strict-origin-when-cross-origin",
    }


def test_screenshots_were_written(stack):
    names = {path.stem for path in Path(SCREENSHOTS).glob("*.png")}
    assert {"client-created-secret-once", "tokens", "audit", "connected-apps", "dashboard"} <= names
