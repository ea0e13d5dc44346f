"""Production settings refuse to start on an insecure or missing value, naming the variable."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import environ_unconfigured
from tests.e2e.conftest import ROOT

PRODUCTION = {
    "DJANGO_DEBUG": "false",
    "DJANGO_SECRET_KEY": "a-real-production-secret-that-is-long-enough-0123456789",
    "DJANGO_ALLOWED_HOSTS": "auth.example.com",
    "PORTCULLIS_ISSUER": "https://auth.example.com",
    "PORTCULLIS_KEY_ENCRYPTION_KEY": "a-real-key-encryption-key",
    "DATABASE_URL": "sqlite:///:memory:",
}


def settings_load(
    *, show: str = "settings.SECURE_HSTS_SECONDS", **overrides: str | None
) -> subprocess.CompletedProcess[str]:
    env = environ_unconfigured()
    env.update(PRODUCTION)
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    env["DJANGO_SETTINGS_MODULE"] = "config.settings"
    code = f"import django; django.setup(); from django.conf import settings; print({show})"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def test_production_settings_load_with_https_hardening():
    result = settings_load()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "31536000"


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"DJANGO_SECRET_KEY": None}, "DJANGO_SECRET_KEY"),
        (
            {"DJANGO_SECRET_KEY": "portcullis-development-only-secret-key-not-for-production"},
            "DJANGO_SECRET_KEY",
        ),
        ({"DJANGO_ALLOWED_HOSTS": None}, "DJANGO_ALLOWED_HOSTS"),
        ({"PORTCULLIS_KEY_ENCRYPTION_KEY": None}, "PORTCULLIS_KEY_ENCRYPTION_KEY"),
        ({"PORTCULLIS_ISSUER": "http://auth.example.com"}, "PORTCULLIS_ISSUER"),
        ({"PORTCULLIS_ISSUER": None}, "PORTCULLIS_ISSUER"),
        ({"DJANGO_DEBUG": "maybe"}, "DJANGO_DEBUG"),
        ({"PORTCULLIS_LOGIN_FAILURE_LIMIT": "five"}, "PORTCULLIS_LOGIN_FAILURE_LIMIT"),
        ({"PORTCULLIS_ACCESS_TOKEN_ALG": "HS256"}, "PORTCULLIS_ACCESS_TOKEN_ALG"),
        ({"PORTCULLIS_ACCESS_TOKEN_ALG": "es256"}, "PORTCULLIS_ACCESS_TOKEN_ALG"),
        # a key that signed before gateways refreshed their key set would have its tokens refused
        ({"PORTCULLIS_KEY_PUBLISH_AHEAD": "0"}, "PORTCULLIS_KEY_PUBLISH_AHEAD"),
        ({"PORTCULLIS_KEY_PUBLISH_AHEAD": "119"}, "PORTCULLIS_KEY_PUBLISH_AHEAD"),
        ({"PORTCULLIS_HEADER_READ_TIMEOUT": "0"}, "PORTCULLIS_HEADER_READ_TIMEOUT"),
        # longer would stall every stream the process relays while a far-away Redis answers
        ({"PORTCULLIS_REDIS_REPLY_WAIT_US": "5001"}, "PORTCULLIS_REDIS_REPLY_WAIT_US"),
        ({"PORTCULLIS_REDIS_REPLY_WAIT_US": "-1"}, "PORTCULLIS_REDIS_REPLY_WAIT_US"),
        # set but empty: every token would carry aud "" and every gateway refuse it
        ({"PORTCULLIS_AUDIENCE": ""}, "PORTCULLIS_AUDIENCE"),
        # "true" used to mean off (only "1" meant on): key rotation and checkpoints silently stopped
        ({"PORTCULLIS_EMBEDDED_BEAT": "sometimes"}, "PORTCULLIS_EMBEDDED_BEAT"),
        # a gateway that refused its own authorization server's tokens
        (
            {"PORTCULLIS_ACCESS_TOKEN_LIFETIME": "900", "PORTCULLIS_MAX_TOKEN_LIFETIME": "600"},
            "PORTCULLIS_MAX_TOKEN_LIFETIME",
        ),
    ],
)
def test_an_insecure_or_missing_setting_stops_the_process_naming_it(overrides, named):
    result = settings_load(**overrides)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert named in result.stderr


@pytest.mark.parametrize(("value", "algorithm"), [(None, "ES256"), ("RS256", "RS256"), (" ES256 ", "ES256")])
def test_the_access_token_algorithm_is_es256_unless_set(value, algorithm):
    shown = "settings.AUTHSERVER['ACCESS_TOKEN_ALGORITHM']"
    result = settings_load(show=shown, PORTCULLIS_ACCESS_TOKEN_ALG=value)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == algorithm


@pytest.mark.parametrize(("value", "on"), [(None, True), ("true", True), ("yes", True), ("0", False)])
def test_the_embedded_beat_reads_any_clear_yes_or_no(value, on):
    result = settings_load(show="settings.PORTCULLIS_EMBEDDED_BEAT", PORTCULLIS_EMBEDDED_BEAT=value)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(on)


@pytest.mark.parametrize(
    ("lifetime", "bound", "expected"),
    [(None, None, "3600"), ("7200", None, "7200"), ("300", "300", "300")],
    ids=["an hour by default", "never below this process's lifetime", "as tight as set"],
)
def test_the_gateways_token_lifetime_bound(lifetime, bound, expected):
    result = settings_load(
        show="settings.GATEWAY['MAX_TOKEN_LIFETIME_S']",
        PORTCULLIS_ACCESS_TOKEN_LIFETIME=lifetime,
        PORTCULLIS_MAX_TOKEN_LIFETIME=bound,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def test_secrets_can_come_from_files(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("a-secret-read-from-a-docker-secret-file-0123456789\n")
    result = settings_load(DJANGO_SECRET_KEY=None, DJANGO_SECRET_KEY_FILE=str(secret))
    assert result.returncode == 0, result.stderr


def test_previous_key_encryption_keys_are_a_list_without_repeats_or_the_current_one(tmp_path):
    show = "len(settings.PORTCULLIS_KEY_ENCRYPTION_KEYS_PREVIOUS)"
    assert settings_load(show=show).stdout.strip() == "0"
    listed = settings_load(show=show, PORTCULLIS_KEY_ENCRYPTION_KEY_PREVIOUS="old-1, old-2,,old-1")
    assert listed.stdout.strip() == "2", listed.stderr
    previous = tmp_path / "previous.txt"  # a Docker secret: one value a line, the current one among them
    previous.write_text("old-1\nold-2\na-real-key-encryption-key\n", encoding="utf-8")
    from_file = settings_load(show=show, PORTCULLIS_KEY_ENCRYPTION_KEY_PREVIOUS_FILE=str(previous))
    assert from_file.stdout.strip() == "2", from_file.stderr


def test_a_key_may_be_published_as_little_as_two_gateway_key_set_refreshes_ahead():
    shown = "settings.AUTHSERVER['KEY_PUBLISH_AHEAD_S'], settings.GATEWAY['JWKS_MAX_AGE_S']"
    result = settings_load(show=shown, PORTCULLIS_KEY_PUBLISH_AHEAD="120")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["120", "60.0"]


@pytest.mark.parametrize(("redis_url", "level"), [(None, "WARNING"), ("redis://127.0.0.1:6379/0", "INFO")])
def test_only_the_embedded_beat_keeps_celerys_task_lines_out_of_the_log(redis_url, level):
    # with no broker the in-process beat runs a task every second, each a "Task ... succeeded" line
    logger = "__import__('logging').getLogger('celery.app.trace')"
    result = settings_load(
        show=f"__import__('logging').getLevelName({logger}.getEffectiveLevel())", REDIS_URL=redis_url
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == level


@pytest.mark.parametrize(("value", "seconds"), [(None, "0.0005"), ("0", "0.0"), ("5000", "0.005")])
def test_the_redis_reply_wait_is_half_a_millisecond_unless_set(value, seconds):
    result = settings_load(
        show="settings.GATEWAY['REDIS_REPLY_WAIT_S']", PORTCULLIS_REDIS_REPLY_WAIT_US=value
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == seconds


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, "True"),  # production (an https issuer): /v1 over HTTPS only, as the pages redirect to it
        ({"DJANGO_SECURE_SSL_REDIRECT": "false"}, "False"),  # follows the pages' choice
        ({"PORTCULLIS_GATEWAY_REQUIRE_HTTPS": "false"}, "False"),
        ({"DJANGO_SECURE_SSL_REDIRECT": "false", "PORTCULLIS_GATEWAY_REQUIRE_HTTPS": "true"}, "True"),
    ],
)
def test_the_gateway_requires_https_where_the_pages_redirect_to_it_unless_told_otherwise(overrides, expected):
    result = settings_load(show="settings.GATEWAY['REQUIRE_HTTPS']", **overrides)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def test_the_prefix_cache_is_kept_per_user_unless_the_operator_widens_it():
    assert settings_load(show="settings.GATEWAY['PREFIX_CACHE_SCOPE']").stdout.strip() == "user"
    widened = settings_load(
        show="settings.GATEWAY['PREFIX_CACHE_SCOPE']", PORTCULLIS_PREFIX_CACHE_SCOPE="shared"
    )
    assert widened.stdout.strip() == "shared"
    wrong = settings_load(PORTCULLIS_PREFIX_CACHE_SCOPE="tenant")
    assert wrong.returncode != 0
    assert "PORTCULLIS_PREFIX_CACHE_SCOPE" in wrong.stderr


def test_strict_tool_checking_follows_the_upstreams_setting_off_by_default():
    shown = "settings.GATEWAY['UPSTREAM_STRICT_TOOLS']"
    assert settings_load(show=shown).stdout.strip() == "False"
    assert settings_load(show=shown, PORTCULLIS_UPSTREAM_STRICT_TOOLS="true").stdout.strip() == "True"


LAYER_WAIT = """
import asyncio, django
django.setup()
from channels.layers import get_channel_layer

async def wait() -> str:
    layer = get_channel_layer()
    channel = await layer.new_channel()
    try:
        await asyncio.wait_for(layer.receive(channel), 6.5)  # longer than the layer's own 5 s wait
    except asyncio.TimeoutError:
        return "still waiting"
    except Exception as exc:
        return type(exc).__name__
    return "a message"

print(asyncio.run(wait()))
"""


def test_a_consumer_waiting_on_the_redis_channel_layer_is_not_cut_by_the_clients_socket_timeout(settings):
    # redis-py 8 gives every socket a 5 s timeout, and channels-redis waits 5 s in BZPOPMIN: the console's
    # live feed died with a TimeoutError every 5 s
    env = environ_unconfigured() | PRODUCTION | {"REDIS_URL": settings.REDIS_URL}
    env["DJANGO_SETTINGS_MODULE"] = "config.settings"
    result = subprocess.run(
        [sys.executable, "-c", LAYER_WAIT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "still waiting"
