"""Settings for the test suite: the real services (PostgreSQL, Redis) unless the environment says otherwise.

Only defaults are set here; ``config/settings.py`` still reads and checks every variable.
"""

from __future__ import annotations

import os

# xdist names the worker only after settings load; tests/conftest.py gives each worker its own Redis db.
_worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or "0"
os.environ.setdefault("DJANGO_DEBUG", "true")
os.environ.setdefault("DJANGO_SECRET_KEY", "test-secret-key-for-the-suite-only-0123456789abcdef")
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/portcullis")
os.environ.setdefault(
    "REDIS_URL", f"{os.environ.get('REDIS_URL_BASE', 'redis://127.0.0.1:6379')}/{1 + int(_worker) % 15}"
)
os.environ.setdefault("PORTCULLIS_VAR_DIR", f"/tmp/portcullis-test-{os.getuid()}-{_worker}")  # noqa: S108
os.environ.setdefault("PORTCULLIS_EMBEDDED_BEAT", "0")

from config.settings import *  # noqa: E402,F403

PASSWORD_HASHERS = [  # fast user-password hashing for tests; client secrets keep their production hasher
    "django.contrib.auth.hashers.MD5PasswordHasher",
    "authserver.hashers.ClientSecretHasher",
]
CELERY_TASK_ALWAYS_EAGER = True
if DATABASES["default"]["ENGINE"].endswith("postgresql"):  # noqa: F405
    # Transactional tests empty the database with TRUNCATE between tests, which the audit tables refuse
    # unless the session says so (audit migration 0010); production sessions never do.
    _options = DATABASES["default"].setdefault("OPTIONS", {})  # noqa: F405
    _options["options"] = f"{_options.get('options', '')} -c portcullis.audit_truncate=on".strip()
