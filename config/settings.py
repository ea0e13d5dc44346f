"""Django settings for Portcullis: the only module that reads the environment.

With no ``DATABASE_URL`` and no ``REDIS_URL`` the project runs on the embedded default (SQLite, in-memory
channel layer, in-process revocation store, Celery tasks run in-process). ``DJANGO_DEBUG=true`` marks a
development run, the only kind that may use generated secrets and an ``http`` issuer.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from config.env import env_bool, env_choice, env_int, env_list, env_secret, env_str

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("PORTCULLIS_VAR_DIR", str(BASE_DIR / "var")))

DEBUG = env_bool("DJANGO_DEBUG", False)
_DEV_SECRET = "portcullis-development-only-secret-key-not-for-production"  # noqa: S105
SECRET_KEY_MIN_CHARS = 50  # as Django's check_deploy asks (security.W009)


def _embedded_secret_key(var_dir: Path) -> str:
    """The embedded default's secret key: random, made on its first start, kept in ``var/secret-key``,
    readable by this user alone (the key-encryption key derives from it).

    An install made before that file existed has its database and no key file: it keeps the development
    key, under which its signing keys are sealed (README: "Giving an older install a key of its own")."""
    path = var_dir / "secret-key"
    if not path.exists():
        if (var_dir / "portcullis.sqlite3").exists():
            return _DEV_SECRET
        var_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, made = tempfile.mkstemp(dir=var_dir, prefix=".secret-key-")  # mode 0600
        try:
            with os.fdopen(fd, "w", encoding="ascii") as out:
                out.write(secrets.token_urlsafe(SECRET_KEY_MIN_CHARS) + "\n")
            with contextlib.suppress(FileExistsError):  # a process starting at the same moment made it
                os.link(made, path)  # whole, or not at all: a reader never sees half a key
        finally:
            os.unlink(made)
    try:
        key = path.read_text(encoding="ascii").strip()
    except (OSError, ValueError) as exc:
        raise ImproperlyConfigured(f"{path} cannot be read: {exc}") from None
    if len(key) < SECRET_KEY_MIN_CHARS:
        raise ImproperlyConfigured(
            f"{path} holds no secret key; restore it from a backup: the signing keys are sealed under it"
        )
    return key


SECRET_KEY = env_secret("DJANGO_SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("DJANGO_SECRET_KEY must be set when DJANGO_DEBUG is false")
    # The embedded default (its SQLite database in VAR_DIR) has a key of its own: with a fixed one, whoever
    # reads the database could open its signing keys. A development run on a database it names keeps it.
    SECRET_KEY = _DEV_SECRET if env_str("DATABASE_URL") else _embedded_secret_key(VAR_DIR)
elif SECRET_KEY == _DEV_SECRET and not DEBUG:
    raise ImproperlyConfigured("DJANGO_SECRET_KEY is the development default; set a real secret")

ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"] if DEBUG else [])
if not ALLOWED_HOSTS:
    raise ImproperlyConfigured("DJANGO_ALLOWED_HOSTS must list this server's host names")

PORTCULLIS_ISSUER = env_str("PORTCULLIS_ISSUER", "http://127.0.0.1:8000" if DEBUG else "").rstrip("/")
if not PORTCULLIS_ISSUER:
    raise ImproperlyConfigured("PORTCULLIS_ISSUER must be set to the public base URL (https://...)")
if not PORTCULLIS_ISSUER.startswith("https://") and not DEBUG:
    raise ImproperlyConfigured("PORTCULLIS_ISSUER must be https unless DJANGO_DEBUG is true (development)")
# RFC 9068 §3: the access token's aud names the resource server, here the gateway's /v1.
PORTCULLIS_AUDIENCE = env_str("PORTCULLIS_AUDIENCE", f"{PORTCULLIS_ISSUER}/v1")
if not PORTCULLIS_AUDIENCE:  # set but empty: every token would carry aud "" and every gateway refuse it
    raise ImproperlyConfigured("PORTCULLIS_AUDIENCE must not be empty (unset, it is $PORTCULLIS_ISSUER/v1)")

_kek = env_secret("PORTCULLIS_KEY_ENCRYPTION_KEY")
if not _kek:
    if not DEBUG:
        raise ImproperlyConfigured("PORTCULLIS_KEY_ENCRYPTION_KEY must be set when DJANGO_DEBUG is false")
    _kek = "dev:" + SECRET_KEY


def _fernet_key(secret: str) -> str:
    """Fernet wants 32 url-safe base64 bytes; any secret string is stretched to that with SHA-256."""
    return base64.urlsafe_b64encode(hashlib.sha256(secret.encode()).digest()).decode()


PORTCULLIS_KEY_ENCRYPTION_KEY = _fernet_key(_kek)
# Key-encryption keys this one replaced (comma- or newline-separated): signing keys sealed under them still
# open, until `resealkeys` has sealed every one under the current key (README, "Changing the KEK").
PORTCULLIS_KEY_ENCRYPTION_KEYS_PREVIOUS = [
    key
    for key in dict.fromkeys(
        _fernet_key(item.strip())
        for item in env_secret("PORTCULLIS_KEY_ENCRYPTION_KEY_PREVIOUS").replace("\n", ",").split(",")
        if item.strip()
    )
    if key != PORTCULLIS_KEY_ENCRYPTION_KEY
]

PORTCULLIS_TRUSTED_PROXIES = env_list("PORTCULLIS_TRUSTED_PROXIES")
REDIS_URL = env_str("REDIS_URL")
# Without Redis there is no Celery: the served process runs beat's tasks itself (config/embedded.py).
# Read here, like every setting, so "yes" or "true" works and a typo stops the process at start.
PORTCULLIS_EMBEDDED_BEAT = env_bool("PORTCULLIS_EMBEDDED_BEAT", True)
PORTCULLIS_METRICS_ALLOW = env_list("PORTCULLIS_METRICS_ALLOW", ["127.0.0.1/32", "::1/128"])
PORTCULLIS_METRICS_TOKEN = env_secret("PORTCULLIS_METRICS_TOKEN")

INSTALLED_APPS = [
    "config.admin_site.SuperuserAdminConfig",  # django.contrib.admin, for superusers alone
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "oauth2_provider",
    "axes",
    "audit",
    "authserver",
    "gateway",
    "console",
    "rest_framework",
    "drf_spectacular",
    "fakevllm",
]

MIDDLEWARE = [
    "audit.context.RequestContextMiddleware",  # first: true client IP, request id, drops untrusted X-F-Proto
    "django.middleware.security.SecurityMiddleware",
    "config.staticfiles.AsgiWhiteNoiseMiddleware",  # WhiteNoise, reading files off the event loop
    "authserver.middleware.SecurityHeadersMiddleware",
    "config.errors.MachineErrorMiddleware",  # a view's empty 405 as JSON on the OAuth and API paths
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "axes.middleware.AxesMiddleware",
    "authserver.middleware.SyncChainMiddleware",  # last: keeps the chain synchronous under ASGI (see it)
]

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

_default_db = f"sqlite:///{VAR_DIR / 'portcullis.sqlite3'}"
# Under ASGI every request runs its sync code in a thread of its own, so persistent per-thread connections
# (CONN_MAX_AGE > 0) would leak; PostgreSQL connections come from a per-process psycopg pool instead.
DATABASES = {"default": dj_database_url.parse(env_str("DATABASE_URL", _default_db), conn_max_age=0)}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    Path(DATABASES["default"]["NAME"]).parent.mkdir(parents=True, exist_ok=True)
    # IMMEDIATE: a transaction takes the write lock when it begins and waits its turn (the timeout), rather
    # than failing at once with "database is locked" when two that read first both try to write (two polls
    # of one device code did). The embedded default is one process; it loses no concurrency that matters.
    DATABASES["default"].setdefault("OPTIONS", {}).update(timeout=20, transaction_mode="IMMEDIATE")
elif DATABASES["default"]["ENGINE"].endswith("postgresql"):
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 1,
        "max_size": env_int("PORTCULLIS_DB_POOL_SIZE", 16, minimum=1),
        # Seconds a request waits for a pooled connection, then a 503 (config/errors.py). Busy, the pool
        # hands one back within milliseconds (requests hold one for a few; a new one connects in tens), so
        # a longer wait only happens with the database down: 10 s held each of the token endpoint's 12
        # threads that long, ~1 answer a second, while callers queued behind them.
        "timeout": 2,
    }
    # The pool checks a connection before handing it out (psycopg_pool's check_connection: one round trip,
    # ~40 µs on loopback): one the server closed (a restart, a failover, pg_terminate_backend, an idle
    # killer) is replaced rather than failing its request. Django passes the pool its ``check`` from this
    # setting; a "check" among the pool's OPTIONS as well is a TypeError at the first connection.
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

if REDIS_URL:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}
    # A receiving consumer waits on Redis in a 5 s BZPOPMIN: redis-py 8's default 5 s socket timeout cut
    # it just before Redis's empty answer (the console's feed dropped every 5 s). Longer than that wait.
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": 15}]},
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
PASSWORD_HASHERS = [
    "django.contrib.auth.hashers.PBKDF2PasswordHasher",
    "authserver.hashers.ClientSecretHasher",
]
AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend", "django.contrib.auth.backends.ModelBackend"]
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"  # the front door sends staff to the console, other users to their apps

# django-axes: lock an account+IP after repeated failures (brute-force lockout).
AXES_FAILURE_LIMIT = env_int("PORTCULLIS_LOGIN_FAILURE_LIMIT", 5, minimum=1)
AXES_COOLOFF_TIME = 0.25  # hours: a locked account unlocks after 15 minutes, or when an admin unlocks it
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
AXES_CLIENT_IP_CALLABLE = "audit.context.axes_client_ip"
AXES_VERBOSE = False
# What a failed sign-in is kept under: a user's name, or a keyed hash of what was typed (which is sometimes a
# password); and what of its request axes keeps and logs: not the name as typed (the audit log has who), the
# CSRF token, or a next URL (a device's user code)
AXES_USERNAME_CALLABLE = "authserver.services.users.axes_username"
AXES_SENSITIVE_PARAMETERS = ["username", "ip_address", "csrfmiddlewaretoken", "next", "user_code"]
# The Django admin's axes pages lifted a lockout by deleting an attempt, unrecorded; the console's unlock
# records it.
AXES_ENABLE_ADMIN = False

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = VAR_DIR / "static"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG  # development serves straight from the apps; production runs collectstatic

# HTML pages: clickjacking and leak protection (SECURITY.md error contract).
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
# same-origin, not no-referrer: with no-referrer, browsers send "Origin: null" on form POSTs and Django's
# CSRF check (rightly) refuses them. same-origin still sends nothing to any other site.
SECURE_REFERRER_POLICY = "same-origin"
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
_https = PORTCULLIS_ISSUER.startswith("https://")
SESSION_COOKIE_SECURE = _https
CSRF_COOKIE_SECURE = _https
SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", _https)
SECURE_HSTS_SECONDS = env_int("DJANGO_HSTS_SECONDS", 31536000 if _https else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = _https
SECURE_HSTS_PRELOAD = env_bool("DJANGO_HSTS_PRELOAD", _https)
if PORTCULLIS_TRUSTED_PROXIES:
    # Only a trusted TLS-terminating proxy may tell us the original scheme.
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
CSRF_TRUSTED_ORIGINS = [PORTCULLIS_ISSUER]
CSRF_FAILURE_VIEW = "authserver.views.csrf_failure"  # Django's 403 page, and an audit record

ACCESS_TOKEN_LIFETIME_S = env_int("PORTCULLIS_ACCESS_TOKEN_LIFETIME", 300, minimum=30)
REFRESH_TOKEN_LIFETIME_S = env_int("PORTCULLIS_REFRESH_TOKEN_LIFETIME", 30 * 86400, minimum=60)

SCOPES = {
    "models.read": "See which models you can use",
    "completions": "Generate text and chat completions",
    "embeddings": "Create embeddings",
    "offline_access": "Stay connected when you are away (a refresh token)",
    "openid": "Sign you in with your Portcullis account",
    "profile": "See your user name and profile details",
    "admin.read": "Read the admin API: clients, tokens, users, audit and keys",
    "admin.write": "Change clients, policies, tokens, users and keys through the admin API",
}

OAUTH2_PROVIDER_APPLICATION_MODEL = "authserver.Client"
OAUTH2_PROVIDER_ACCESS_TOKEN_MODEL = "authserver.AccessToken"  # noqa: S105 (a model name)
OAUTH2_PROVIDER_REFRESH_TOKEN_MODEL = "authserver.RefreshToken"  # noqa: S105
OAUTH2_PROVIDER_ID_TOKEN_MODEL = "authserver.IDToken"  # noqa: S105
OAUTH2_PROVIDER_GRANT_MODEL = "authserver.Grant"

OAUTH2_PROVIDER = {
    "OAUTH2_VALIDATOR_CLASS": "authserver.validators.PortcullisValidator",
    # The Django admin shows OAuth records and changes none: changes go through the audited services.
    "APPLICATION_ADMIN_CLASS": "authserver.admin_classes.ClientAdmin",
    "ACCESS_TOKEN_ADMIN_CLASS": "authserver.admin_classes.AccessTokenAdmin",
    "REFRESH_TOKEN_ADMIN_CLASS": "authserver.admin_classes.RefreshTokenAdmin",
    "GRANT_ADMIN_CLASS": "authserver.admin_classes.GrantAdmin",
    "ID_TOKEN_ADMIN_CLASS": "authserver.admin_classes.IDTokenAdmin",
    "OAUTH2_SERVER_CLASS": "authserver.server.PortcullisServer",
    "OIDC_SERVER_CLASS": "authserver.server.PortcullisServer",
    "SCOPES": SCOPES,
    "DEFAULT_SCOPES": ["models.read"],
    "ACCESS_TOKEN_EXPIRE_SECONDS": ACCESS_TOKEN_LIFETIME_S,
    "ID_TOKEN_EXPIRE_SECONDS": ACCESS_TOKEN_LIFETIME_S,
    "AUTHORIZATION_CODE_EXPIRE_SECONDS": 60,  # RFC 9700 §4.2.1 / RFC 6749 §4.1.2: short-lived codes
    "REFRESH_TOKEN_EXPIRE_SECONDS": REFRESH_TOKEN_LIFETIME_S,
    "REFRESH_TOKEN_GRACE_PERIOD_SECONDS": 0,  # RFC 9700 §4.14.2: no replay window
    "REFRESH_TOKEN_REUSE_PROTECTION": True,
    "ROTATE_REFRESH_TOKEN": True,
    "ACCESS_TOKEN_GENERATOR": "authserver.tokens.access_token_generate",
    "REFRESH_TOKEN_GENERATOR": "oauthlib.oauth2.rfc6749.tokens.random_token_generator",
    "CLIENT_SECRET_HASHER": "portcullis_sha256",
    "PKCE_REQUIRED": True,
    # RFC 9700 §2.1: https only. Native apps' loopback http redirect URIs (RFC 8252 §7.3) are allowed by
    # Client.get_allowed_schemes/clean, which refuse any other http URI.
    "ALLOWED_REDIRECT_URI_SCHEMES": ["https"],
    "ALLOW_URI_WILDCARDS": False,
    "ALLOW_LOCALHOST_LOOPBACK": False,  # RFC 8252 §8.3: loopback IP literals, not "localhost"
    "REQUEST_APPROVAL_PROMPT": "force",  # consent is remembered by authserver.Consent instead
    "OIDC_ENABLED": True,
    "OIDC_ISS_ENDPOINT": PORTCULLIS_ISSUER,
    "OIDC_RSA_PRIVATE_KEY": "managed-by-authserver-signing-keys",  # see Client.jwk_key
    "OIDC_RESPONSE_TYPES_SUPPORTED": ["code"],
    # OpenID Connect RP-Initiated Logout 1.0 at /oauth/logout/ (authserver.views.RPInitiatedLogoutView): a
    # hint from the session being ended signs out at once, any other request asks the user (§2's MUST).
    "OIDC_RP_INITIATED_LOGOUT_ENABLED": True,
    "OIDC_RP_INITIATED_LOGOUT_ALWAYS_PROMPT": False,
    "OIDC_RP_INITIATED_LOGOUT_ACCEPT_EXPIRED_TOKENS": True,  # §2: an expired ID token SHOULD be a hint
    # Client.clean allows http post-logout URIs for loopback IPs only, for native apps, as redirect URIs
    # (RFC 8252 §7.3); DOT's strict mode would refuse them to public clients, which native apps are.
    "OIDC_RP_INITIATED_LOGOUT_STRICT_REDIRECT_URIS": False,
    # The signed-out user's tokens at the client that asked, and there only (see do_logout)
    "OIDC_RP_INITIATED_LOGOUT_DELETE_TOKENS": True,
    "OAUTH2_RESPONSE_TYPES_SUPPORTED": ["code"],
    "OAUTH2_GRANT_TYPES_SUPPORTED": [
        "authorization_code",
        "client_credentials",
        "refresh_token",
        "urn:ietf:params:oauth:grant-type:device_code",
    ],
    "OAUTH_DEVICE_VERIFICATION_URI": f"{PORTCULLIS_ISSUER}/device/",
    "OAUTH_DEVICE_VERIFICATION_URI_COMPLETE": f"{PORTCULLIS_ISSUER}/device/?user_code={{user_code}}",
    "DEVICE_FLOW_INTERVAL": 5,
    "COMPLIANT_BCP_RFC9700_IMPLICIT_GRANT": True,
    "COMPLIANT_BCP_RFC9700_PASSWORD_GRANT": True,
    "COMPLIANT_BCP_RFC9700_PKCE_METHOD": True,
    "COMPLIANT_BCP_RFC9700_ACCESS_TOKEN_TRANSPORT": True,
    "COMPLIANT_BCP_RFC9700_AUTHZ_RESPONSE_ISS": True,
    "COMPLIANT_BCP_RFC9700_TOKEN_STORAGE": True,
    "COMPLIANT_BCP_RFC9700_REFRESH_TOKEN": True,
    "COMPLIANT_BCP_RFC9700_REDIRECT_URI_SCHEME": True,
    "COMPLIANT_BCP_RFC9700_REDIRECT_URI_MATCHING": True,
    "COMPLIANT_BCP_RFC9700_PKCE_REQUIRED": True,
}

# Signing keys: how often beat rotates, and how long a new key is published before it signs; which
# algorithm signs access tokens (ID tokens are always RS256; see authserver/crypto.py). A new key must be
# in every gateway's key set before it signs, and gateways refresh theirs about every JWKS_MAX_AGE_S even
# when the push that a new key sends is lost: so the lead is at least two of those periods (a refresh
# takes a moment, and a key is visible only once its transaction commits). `rotatekeys --activate-now` is
# the emergency exit for a compromised key, where a minute of refused tokens is the lesser harm.
JWKS_MAX_AGE_S = 60
KEY_PUBLISH_AHEAD_MIN_S = 2 * JWKS_MAX_AGE_S
AUTHSERVER: dict[str, Any] = {
    "ACCESS_TOKEN_ALGORITHM": env_choice("PORTCULLIS_ACCESS_TOKEN_ALG", "ES256", ("ES256", "RS256")),
    "KEY_ROTATION_INTERVAL_S": env_int("PORTCULLIS_KEY_ROTATION_INTERVAL", 7 * 86400, minimum=60),
    "KEY_PUBLISH_AHEAD_S": env_int("PORTCULLIS_KEY_PUBLISH_AHEAD", 600, minimum=KEY_PUBLISH_AHEAD_MIN_S),
    "ACCESS_TOKEN_LIFETIME_S": ACCESS_TOKEN_LIFETIME_S,
}

REST_FRAMEWORK = {"DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema"}

# Seconds a client has to send a request's headers, from the connection opening or, kept alive, from the
# request's first byte (config/protocol.py: uvicorn sets no such deadline). Then a 408 and the close.
HEADER_READ_TIMEOUT_S = float(env_int("PORTCULLIS_HEADER_READ_TIMEOUT", 10, minimum=1))

GATEWAY = {
    "UPSTREAMS": env_list("VLLM_UPSTREAMS", ["http://127.0.0.1:8001"] if DEBUG else []),
    "UPSTREAM_API_KEY": env_secret("VLLM_API_KEY"),
    "JWKS_URL": env_str("PORTCULLIS_JWKS_URL"),  # empty: read keys from this deployment's database
    "JWKS_REFRESH_S": 30.0,  # an unknown kid refetches the key set at most this often
    # a token whose exp - iat is longer, plus leeway, is refused (RFC 8725 §3.10). An hour by default, and
    # never below this process's own access-token lifetime, so a gateway replica that does not share the
    # authorization server's settings does not refuse its tokens; set it to that lifetime for the tightest.
    "MAX_TOKEN_LIFETIME_S": env_int(
        "PORTCULLIS_MAX_TOKEN_LIFETIME", max(3600, ACCESS_TOKEN_LIFETIME_S), minimum=ACCESS_TOKEN_LIFETIME_S
    ),
    "JWKS_MAX_AGE_S": float(JWKS_MAX_AGE_S),  # the key set is refreshed in the background this often
    "LEEWAY_S": 30,  # clock skew tolerated on exp/nbf/iat (RFC 8725 §3.10 asks for a small one)
    "MAX_TOKEN_BYTES": 8192,
    "MAX_BODY_BYTES": env_int("PORTCULLIS_MAX_BODY_BYTES", 1_048_576, minimum=1024),
    "CONNECT_TIMEOUT_S": 2.0,  # SECURITY.md: a refused or dead upstream answers fast
    "READ_TIMEOUT_S": float(env_int("PORTCULLIS_UPSTREAM_READ_TIMEOUT", 600, minimum=1)),
    "BODY_READ_TIMEOUT_S": float(env_int("PORTCULLIS_BODY_READ_TIMEOUT", 30, minimum=1)),  # no slowloris
    # below the upstream pool's 4 s keep-alive: the checks keep a connection per upstream warm for the next
    # request after a quiet spell (gateway/upstream.py)
    "HEALTH_INTERVAL_S": 3.0,
    "MAX_CONNECTIONS": env_int("PORTCULLIS_UPSTREAM_MAX_CONNECTIONS", 1024, minimum=1),
    "REVOCATION_STALE_S": 60.0,  # with Redis down, a token cleared this recently is still served
    "VERIFY_CACHE_SIZE": 100_000,
    "DENY_IPS": env_list("PORTCULLIS_DENY_IPS"),  # CIDRs refused before anything else
    # /v1 over plain HTTP is refused (403 https_required) unless the connection is TLS or a trusted proxy
    # says it was (X-Forwarded-Proto): a bearer token sent in clear should fail loudly, not work. Django's
    # pages redirect instead (SECURE_SSL_REDIRECT), which an API client would follow with its token.
    "REQUIRE_HTTPS": env_bool("PORTCULLIS_GATEWAY_REQUIRE_HTTPS", SECURE_SSL_REDIRECT),
    # Whose requests may share vLLM's prefix cache: a cached prefix answers faster, which tells a prober what
    # someone else's prompt began with. "user" (a user's own, or a client's without one), "client", or
    # "shared" (no salt: vLLM's default). The gateway sends vLLM a cache_salt per scope (gateway/salt.py).
    "PREFIX_CACHE_SCOPE": env_choice("PORTCULLIS_PREFIX_CACHE_SCOPE", "user", ("user", "client", "shared")),
    # Set it where vLLM runs with VLLM_ENFORCE_STRICT_TOOL_CALLING=true: vLLM then compiles every tool's
    # parameter schema into a grammar, strict or not, so the gateway checks them all (gateway/validation).
    "UPSTREAM_STRICT_TOOLS": env_bool("PORTCULLIS_UPSTREAM_STRICT_TOOLS", False),
    "FALLBACK_CEILING_RPM": 600,  # Redis down, no rpm configured: per-process requests/minute per client
    # a quiet Redis's reply is awaited this long (µs) without yielding the event loop (gateway/redisbatch.py)
    "REDIS_REPLY_WAIT_S": env_int("PORTCULLIS_REDIS_REPLY_WAIT_US", 500, maximum=5000) / 1_000_000,
    # Audit records waiting to be stored (audit/sink.py): at either bound new /v1 requests get a 503 until
    # what waits is below nine tenths of it, rather than be served unrecorded. In the Redis stream, shared by
    # every gateway (about 0.6 KB of Redis memory a record); in one process, while Redis (or, without Redis,
    # the database) does not take them.
    "AUDIT_BACKLOG_LIMIT": env_int("PORTCULLIS_AUDIT_BACKLOG_LIMIT", 1_000_000, minimum=1),
    "AUDIT_BUFFER_LIMIT": env_int("PORTCULLIS_AUDIT_BUFFER_LIMIT", 100_000, minimum=1),
    # What a stopping gateway process still holds for Redis is written here, and adopted by the next one
    # to start on it: keep it on a disk that outlives the process (not a tmpfs) to keep those records.
    "AUDIT_SPOOL_DIR": env_str("PORTCULLIS_AUDIT_SPOOL_DIR") or str(VAR_DIR / "audit-spool"),
}

CELERY_BROKER_URL = REDIS_URL or "memory://"
CELERY_RESULT_BACKEND = None
CELERY_TASK_ALWAYS_EAGER = not REDIS_URL  # embedded default: tasks run in-process
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_IGNORE_RESULT = True
CELERY_TIMEZONE = "UTC"
CELERY_BEAT_SCHEDULE: dict[str, dict[str, Any]] = {
    "audit-checkpoint": {"task": "audit.tasks.audit_checkpoint_task", "schedule": 600.0},
    # Hourly, idempotent per period: each stores yesterday's (last week's) report once, and catches up.
    "audit-report-daily": {"task": "audit.tasks.audit_report_daily_task", "schedule": 3600.0},
    "audit-report-weekly": {"task": "audit.tasks.audit_report_weekly_task", "schedule": 3600.0},
    "audit-anomalies": {
        "task": "audit.tasks.audit_anomalies_detect_task",
        "schedule": 60.0,
        "options": {"expires": 50},
    },
    "audit-stream-ingest": {
        "task": "audit.tasks.audit_stream_ingest_task",
        "schedule": 1.0,
        "options": {"expires": 5},
    },
    "signing-keys-rotate": {
        "task": "authserver.tasks.signing_keys_rotate_task",
        "schedule": 300.0,  # checks every 5 minutes; rotates only when a key is due
    },
    "revoked-tokens-prune": {"task": "authserver.tasks.revoked_tokens_prune_task", "schedule": 3600.0},
}

LOG_LEVEL = env_str("PORTCULLIS_LOG_LEVEL", "INFO").upper()
LOG_FORMAT = env_str("PORTCULLIS_LOG_FORMAT", "plain" if DEBUG else "json")
if LOG_FORMAT not in {"json", "plain"}:
    raise ImproperlyConfigured("PORTCULLIS_LOG_FORMAT must be json or plain")
LOGGING: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "request_context": {"()": "audit.context.RequestContextLogFilter"},
        "redact_query": {"()": "audit.context.AccessLogRedactFilter"},
    },
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"},
        "json": {"()": "audit.context.json_log_formatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["request_context"],
        },
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        # No handler of its own: Django's (DEFAULT_LOGGING's "console", in debug) wrote every django.* record
        # a second time, bare, without the request id. They reach the root's handler, like every other.
        "django": {"handlers": []},
        # DOT logs redirect URIs and client ids at debug; keep it at warning so nothing sensitive leaks.
        "oauth2_provider": {"level": "WARNING"},
        "oauthlib": {"level": "WARNING"},
        "axes": {"level": "WARNING"},
        "httpx": {"level": "WARNING"},  # one INFO line per upstream request would cost the hot path
        "httpcore": {"level": "WARNING"},
        "uvicorn.access": {"handlers": ["console"], "filters": ["redact_query"], "propagate": False},
        # Django's warnings name the path too: 4xx/5xx responses, and refused CSRF checks (the device pages)
        "django.request": {"filters": ["redact_query"]},
        "django.security.csrf": {"filters": ["redact_query"]},
    },
}
if not REDIS_URL:  # the embedded beat runs its tasks in-process: one "Task ... succeeded" line a second
    LOGGING["loggers"]["celery.app.trace"] = {"level": "WARNING"}
