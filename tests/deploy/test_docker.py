"""Tests of the container deployment in docker/: compose file, Dockerfile, entrypoint and health check.

No Docker engine runs where the suite runs, so these tests read the files as data, and run the entrypoint
(with stand-ins for python, uvicorn and celery) and the health check (against a local HTTP server) outside
any container. Where the Compose plugin, hadolint or shellcheck are installed they validate the files as
well; where they are not, every structural assertion still runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.conftest import self_signed_certificate

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE_PATH = DOCKER / "compose.yaml"
DOCKERFILE_PATH = DOCKER / "Dockerfile"
ENTRYPOINT = DOCKER / "entrypoint.sh"
HEALTHCHECK = DOCKER / "healthcheck.py"
CADDY_START = DOCKER / "caddy-start.sh"

DEPLOY_ENV = {"PORTCULLIS_ISSUER": "https://auth.example.com", "DJANGO_ALLOWED_HOSTS": "auth.example.com"}
SERVICES = {"postgres", "redis", "migrate", "web", "gateway", "worker", "beat", "ingest", "vllm", "fakevllm"}
SERVICES |= {"proxy"}
APP_SERVICES = ("migrate", "web", "gateway", "worker", "beat", "ingest")
ROLES = ("web", "gateway", "worker", "beat", "ingest", "fakevllm", "migrate")
# Variables that hold a secret themselves: only their *_FILE form may appear in the deployment files.
SECRET_VARIABLES = {"DJANGO_SECRET_KEY", "PORTCULLIS_KEY_ENCRYPTION_KEY", "VLLM_API_KEY", "PGPASSWORD"}
SECRET_VARIABLES |= {"POSTGRES_PASSWORD", "HF_TOKEN"}
WRITABLE_TMPFS = {"/tmp", "/var/lib/portcullis"}  # noqa: S108 (paths inside the container)
APP_SECRET_FILES = {"DJANGO_SECRET_KEY_FILE", "PORTCULLIS_KEY_ENCRYPTION_KEY_FILE"}  # the settings need both
SERVERS = ("web", "gateway")  # the uvicorn roles: they forward upstream, sign tokens, spool audit records
# Who opens sealed signing keys (to sign tokens, audit checkpoints, rotate): only they get the previous KEK.
KEY_OPENERS = {"web", "gateway", "worker"}
BUILD_TOOLS = {"build-essential", "gcc", "g++", "cc", "clang", "make", "cmake", "libc6-dev", "python3-dev"}
BUILD_TOOLS |= {"libpq-dev", "pkg-config", "rustc", "cargo", "git"}
UVICORN = (
    "uvicorn config.asgi:application --host 0.0.0.0 --port 8000 --loop uvloop"
    " --http config.protocol:AuditedHttpToolsProtocol"
    " --workers 4 --no-proxy-headers --no-server-header --timeout-graceful-shutdown 15"
)
ROLE_COMMANDS = {
    "web": ["python manage.py migrate --noinput", "python manage.py collectstatic --noinput", UVICORN],
    "gateway": [UVICORN],
    "worker": ["celery -A config worker -l info --concurrency 2"],
    "beat": ["celery -A config beat -l info --schedule /tmp/celerybeat-schedule"],
    "ingest": ["python manage.py ingest"],
    "fakevllm": ["python -m fakevllm --host 0.0.0.0 --port 8001 --models demo-model"],
    "migrate": ["python manage.py migrate --noinput"],
}

# ---- reading the compose file the way Compose does ------------------------------------------------------

_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^${}]*))?\}")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Resolve ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error} (innermost first); $$ is a $."""
    text = text.replace("$$", "\0")
    while match := _VARIABLE.search(text):
        name, op, arg = match["name"], match["op"], match["arg"] or ""
        value = env.get(name)
        if op in (":?", "?") and (value is None or (op == ":?" and not value)):
            raise LookupError(f"{name}: {arg}")
        if (op == ":-" and not value) or (op == "-" and value is None):
            value = arg
        text = text[: match.start()] + (value or "") + text[match.end() :]
    return text.replace("\0", "$")


def resolved(node: Any, env: Mapping[str, str]) -> Any:
    """Interpolate every string of a parsed YAML tree."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [resolved(item, env) for item in node]
    if isinstance(node, dict):
        return {key: resolved(value, env) for key, value in node.items()}
    return node


@cache
def compose() -> dict[str, Any]:
    return resolved(yaml.safe_load(COMPOSE_PATH.read_text(encoding="utf-8")), DEPLOY_ENV)


def service(name: str) -> dict[str, Any]:
    return compose()["services"][name]


def command_text(svc: Mapping[str, Any]) -> str:
    return " ".join([*svc.get("entrypoint", []), *svc.get("command", [])])


def string_values(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for item in node:
            yield from string_values(item)
    elif isinstance(node, dict):
        for value in node.values():
            yield from string_values(value)


def looks_like_a_generated_secret(value: str) -> bool:
    """A long run of URL-safe characters mixing cases and digits, like secrets.token_urlsafe() output."""
    for run in re.findall(r"[A-Za-z0-9_\-+/=]{32,}", value):
        if re.search(r"[a-z]", run) and re.search(r"[A-Z]", run) and re.search(r"[0-9]", run):
            return True
    return False


def documented_names(path: Path) -> set[str]:
    return set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", path.read_text(encoding="utf-8"), re.MULTILINE))


def tool(name: str) -> str | None:
    """Find a command on PATH or next to this interpreter (a tool installed into the project's venv)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


# ---- compose: services and roles ----------------------------------------------------------------------


def test_compose_defines_every_service_of_the_deployment() -> None:
    assert set(compose()["services"]) == SERVICES
    assert compose()["name"] == "portcullis"
    assert {"secrets", "volumes", "networks"} <= set(compose())


def test_each_portcullis_service_runs_its_role_from_the_one_image() -> None:
    built = {name: service(name) for name in (*APP_SERVICES, "fakevllm")}
    for name, svc in built.items():
        assert svc["command"][0] == name, name
        assert svc["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}, name
    assert len({svc["image"] for svc in built.values()}) == 1
    assert service("web")["image"] == "portcullis:local"


def test_compose_refuses_to_run_without_an_issuer_or_allowed_hosts() -> None:
    raw = yaml.safe_load(COMPOSE_PATH.read_text(encoding="utf-8"))
    for missing in DEPLOY_ENV:
        env = {name: value for name, value in DEPLOY_ENV.items() if name != missing}
        with pytest.raises(LookupError, match=missing):
            resolved(raw, env)


def test_images_pulled_from_a_registry_are_pinned_to_a_version() -> None:
    pulled = {name: svc["image"] for name, svc in compose()["services"].items() if "build" not in svc}
    assert set(pulled) == {"postgres", "redis", "vllm", "proxy"}
    for name, image in pulled.items():
        repository, _, tag = image.rpartition(":")
        assert repository, f"{name}: {image} has no tag"
        assert "/" not in tag, f"{name}: {image} has no tag"
        assert re.fullmatch(r"v?\d+(\.\d+)*(-[a-z0-9.]+)?", tag), f"{name}: {image} is not pinned"
    assert pulled["postgres"].startswith("postgres:16")
    assert pulled["redis"].startswith("redis:7")
    assert pulled["vllm"].startswith("vllm/vllm-openai:v")


def test_beat_runs_exactly_one_replica() -> None:
    beat = service("beat")
    assert beat["deploy"]["replicas"] == 1
    assert "scale" not in beat
    runs_beat = [
        name for name, svc in compose()["services"].items() if svc.get("command", [None])[0] == "beat"
    ]
    assert runs_beat == ["beat"]


def test_web_waits_for_healthy_databases_and_finished_migrations() -> None:
    for name in ("web", "gateway", "worker", "beat"):
        assert service(name)["depends_on"] == {
            "postgres": {"condition": "service_healthy"},
            "redis": {"condition": "service_healthy"},
            "migrate": {"condition": "service_completed_successfully"},
        }, name
    assert set(service("migrate")["depends_on"]) == {"postgres", "redis"}
    assert service("migrate")["restart"] == "no"


def test_web_publishes_port_8000_on_loopback_and_checks_healthz() -> None:
    web = service("web")
    assert web["ports"] == ["127.0.0.1:8000:8000"]
    test = web["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "/app/docker/healthcheck.py"]
    assert urlsplit(test[3]).path == "/healthz"
    assert "ports" not in service("gateway")
    assert "/healthz" in " ".join(service("gateway")["healthcheck"]["test"])


def test_databases_sit_on_an_internal_network_and_publish_no_port() -> None:
    assert compose()["networks"]["backend"]["internal"] is True
    for name in ("postgres", "redis"):
        assert "ports" not in service(name), name
        assert service(name)["networks"] == ["backend"], name
    assert "pg_isready" in service("postgres")["healthcheck"]["test"]
    assert service("redis")["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "pgdata:/var/lib/postgresql/data" in service("postgres")["volumes"]


def test_redis_persistence_is_an_explicit_choice() -> None:
    redis = service("redis")
    args = redis["command"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert "redis_data:/data" in redis["volumes"]


def test_vllm_is_reachable_only_from_web_and_requires_an_api_key_from_its_secret() -> None:
    vllm = service("vllm")
    assert "ports" not in vllm
    assert "expose" not in vllm
    assert vllm["profiles"] == ["gpu"]
    assert vllm["networks"] == ["inference"]
    assert {name for name, svc in compose()["services"].items() if "inference" in svc["networks"]} == {
        "web",
        "gateway",
        "vllm",
        "fakevllm",
    }
    script = command_text(vllm)
    assert 'export VLLM_API_KEY="$api_key"' in script  # read by vLLM from its environment
    assert "--api-key" not in script  # on the command line every process could read it (ps)
    assert "$(cat /run/secrets/vllm_api_key)" in script
    assert '[ -n "$api_key" ] ||' in script  # an empty key stops vLLM instead of serving without one
    assert "vllm_api_key" in vllm["secrets"]
    (device,) = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert "gpu" in device["capabilities"]


def test_fakevllm_stands_in_under_the_fake_profile_without_the_app_secrets() -> None:
    fake = service("fakevllm")
    assert fake["profiles"] == ["fake"]
    assert "ports" not in fake
    assert fake["networks"] == ["inference"]
    assert fake["secrets"] == ["vllm_api_key"]
    assert fake["environment"]["VLLM_API_KEY_FILE"] == "/run/secrets/vllm_api_key"
    assert "env_file" not in fake
    assert "DJANGO_SECRET_KEY_FILE" not in fake["environment"]
    assert service("web")["environment"]["VLLM_UPSTREAMS"] == "http://fakevllm:8001"
    gpu = interpolate("${VLLM_UPSTREAMS:-http://fakevllm:8001}", {"VLLM_UPSTREAMS": "http://vllm:8000"})
    assert gpu == "http://vllm:8000"


def test_app_containers_are_read_only_and_unprivileged() -> None:
    for name in (*APP_SERVICES, "fakevllm"):
        svc = service(name)
        assert svc["read_only"] is True, name
        assert svc["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in svc["security_opt"], name
        assert WRITABLE_TMPFS <= set(svc["tmpfs"]), name


# ---- compose: secrets -------------------------------------------------------------------------------


def test_every_secret_is_read_from_a_mounted_secret_file() -> None:
    declared = compose()["secrets"]
    for name, spec in declared.items():
        assert spec == {"file": f"./secrets/{name}.txt"}, name
    for name, svc in compose()["services"].items():
        for variable, value in svc.get("environment", {}).items():
            assert variable not in SECRET_VARIABLES, f"{name} sets {variable} directly"
            if variable.endswith("_FILE"):
                secret = value.removeprefix("/run/secrets/")
                assert value == f"/run/secrets/{secret}", f"{name}: {variable}"
                assert secret in declared, f"{name}: {variable}"
                assert secret in svc["secrets"], f"{name} reads {secret} without mounting it"
    for name in APP_SERVICES:
        env = service(name)["environment"]
        assert env["DJANGO_DEBUG"] == "false"
        assert APP_SECRET_FILES <= set(env)
        assert env["PGPASSWORD_FILE"] == "/run/secrets/postgres_password"
        assert service(name)["env_file"] == [{"path": ".env", "required": False}]


def test_each_app_service_mounts_only_the_secrets_it_uses() -> None:
    # The upstream key only where requests are forwarded; the previous key-encryption key only where sealed
    # signing keys are opened. Every Django process needs the secret key and the current KEK to start.
    for name in APP_SERVICES:
        svc = service(name)
        expected = {"postgres_password", "django_secret_key", "key_encryption_key"}
        if name in KEY_OPENERS:
            expected.add("key_encryption_key_previous")
            assert svc["environment"]["PORTCULLIS_KEY_ENCRYPTION_KEY_PREVIOUS_FILE"] == (
                "/run/secrets/key_encryption_key_previous"
            ), name
        if name in SERVERS:
            expected.add("vllm_api_key")
            assert svc["environment"]["VLLM_API_KEY_FILE"] == "/run/secrets/vllm_api_key", name
        assert set(svc["secrets"]) == expected, name
        assert {variable for variable in svc["environment"] if variable.endswith("_FILE")} == {
            "PGPASSWORD_FILE",
            "DJANGO_SECRET_KEY_FILE",
            "PORTCULLIS_KEY_ENCRYPTION_KEY_FILE",
            *(["PORTCULLIS_KEY_ENCRYPTION_KEY_PREVIOUS_FILE"] if name in KEY_OPENERS else []),
            *(["VLLM_API_KEY_FILE"] if name in SERVERS else []),
        }, name
    users = {name for name, svc in compose()["services"].items() if "vllm_api_key" in svc.get("secrets", [])}
    assert users == {*SERVERS, "vllm", "fakevllm"}


def test_no_secret_value_is_written_in_the_deployment_files() -> None:
    web = service("web")["environment"]
    for variable in ("DATABASE_URL", "REDIS_URL"):
        assert urlsplit(web[variable]).password is None, variable
    for value in string_values(compose()):
        assert not looks_like_a_generated_secret(value), value
    example = (DOCKER / "env.example").read_text(encoding="utf-8")
    for variable, value in re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", example, re.MULTILINE):
        assert variable not in SECRET_VARIABLES, f"env.example assigns {variable}"
        assert not looks_like_a_generated_secret(value), variable
    # On a machine where the secret files were generated, none of their values may have leaked anywhere.
    published = [COMPOSE_PATH, DOCKER / "env.example", DOCKERFILE_PATH, DOCKER / "README.md"]
    texts = [path.read_text(encoding="utf-8") for path in published]
    for secret_file in (DOCKER / "secrets").glob("*.txt"):
        value = secret_file.read_text(encoding="utf-8").strip()
        assert not value or all(value not in text for text in texts), secret_file.name


def test_secret_files_are_documented_and_kept_out_of_the_image() -> None:
    guide = (DOCKER / "secrets" / "README.md").read_text(encoding="utf-8")
    for name in compose()["secrets"]:
        assert f"> docker/secrets/{name}.txt" in guide, name
    assert "docker/secrets/*.txt" in guide
    assert "Never commit" in guide
    ignored = (DOCKER / "Dockerfile.dockerignore").read_text(encoding="utf-8").split("\n")
    patterns = {line.strip() for line in ignored if line.strip() and not line.startswith("#")}
    for needed in (".venv", "var", ".git", "**/__pycache__", "bench/results", "artifacts"):
        assert needed in patterns, needed
    assert {"docker/secrets", "docker/.env", ".env"} <= patterns


def test_env_example_documents_every_variable_the_compose_file_reads() -> None:
    raw = COMPOSE_PATH.read_text(encoding="utf-8")
    interpolated = set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", raw))
    documented = documented_names(DOCKER / "env.example")
    assert interpolated - documented == set()
    assert set(service("web")["environment"]) - documented == set()
    assert {
        "WEB_CONCURRENCY",
        "CELERY_CONCURRENCY",
        "FAKEVLLM_MODELS",
        "PORTCULLIS_TRUSTED_PROXIES",
        "PORTCULLIS_PROXY_TRUSTED_PROXIES",
        "UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN",
    } <= documented


def test_env_example_names_every_service_that_reads_it() -> None:
    example = (DOCKER / "env.example").read_text(encoding="utf-8")
    listed = re.search(r"Portcullis containers \(([a-z, ]+)\)", example)
    assert listed, "env.example no longer says which containers read it"
    readers = {name for name, svc in compose()["services"].items() if "env_file" in svc}
    assert set(listed[1].split(", ")) == readers


def test_an_empty_trusted_proxies_setting_trusts_no_proxy() -> None:
    # `-`, not `:-`: PORTCULLIS_TRUSTED_PROXIES= (uvicorn serving TLS itself) must not fall back to the edge
    # subnet, through whose gateway address Docker may forward every client's connection.
    raw = yaml.safe_load(COMPOSE_PATH.read_text(encoding="utf-8"))

    def trusted(**env: str) -> set[str]:
        services = resolved(raw, {**DEPLOY_ENV, **env})["services"]
        return {services[name]["environment"]["PORTCULLIS_TRUSTED_PROXIES"] for name in APP_SERVICES}

    assert trusted() == {"172.31.250.0/24"}
    assert trusted(PORTCULLIS_EDGE_SUBNET="10.9.0.0/24") == {"10.9.0.0/24"}
    assert trusted(PORTCULLIS_TRUSTED_PROXIES="") == {""}
    assert trusted(PORTCULLIS_TRUSTED_PROXIES="10.0.0.0/8") == {"10.0.0.0/8"}


def test_servers_spool_audit_records_to_a_shared_named_volume_the_service_user_owns() -> None:
    # The settings say it: not on a tmpfs, or a restart during a Redis outage loses the records.
    spools = set()
    for name in SERVERS:
        svc = service(name)
        spool = svc["environment"]["PORTCULLIS_AUDIT_SPOOL_DIR"]
        assert not any(spool == tmpfs or spool.startswith(f"{tmpfs}/") for tmpfs in svc["tmpfs"]), name
        mounts = [volume.split(":") for volume in svc["volumes"]]
        (source,) = [mount[0] for mount in mounts if mount[1] == spool]
        assert source in compose()["volumes"], f"{name}: {source} is not a named volume"
        spools.add((source, spool))
    # One for every replica: audit/spool.py names each file per process and locks it while it is adopted.
    assert len(spools) == 1
    for name in set(APP_SERVICES) - set(SERVERS):  # no gateway runtime there: nothing to spool
        assert "PORTCULLIS_AUDIT_SPOOL_DIR" not in service(name)["environment"], name
        assert "volumes" not in service(name), name
    # A new named volume takes the owner and mode of the image's directory at its mount point.
    ((_, spool),) = spools
    owned = rf"install -d -o 10001 -g 10001 -m 0700 (\S+ )*{re.escape(spool)}( |$)"
    assert any(re.search(owned, run) for run in stages()[-1].args("RUN")), spool


def test_postgres_accepts_every_connection_the_pools_can_ask_for(
    run_entrypoint: Callable[..., EntrypointRun],
) -> None:
    # docker/README.md ("Scaling"): pool x (uvicorn processes x server replicas + worker processes + 1
    # + beat and a one-off) + PostgreSQL's own reserve, for the four server replicas it says fit.
    command = service("postgres")["command"]
    assert command[0] == "postgres"
    flags = zip(command[1::2], command[2::2], strict=True)
    options = dict(value.split("=", 1) for flag, value in flags if flag == "-c")
    (pool,) = {int(service(name)["environment"]["PORTCULLIS_DB_POOL_SIZE"]) for name in APP_SERVICES}
    workers = re.search(r"--workers (\d+)", run_entrypoint("web").commands[-1])
    celery = re.search(r"--concurrency (\d+)", run_entrypoint("worker").commands[0])
    assert workers
    assert celery
    server_replicas = 4
    demand = pool * (int(workers[1]) * server_replicas + int(celery[1]) + 1 + 2) + 10
    assert demand <= int(options["max_connections"])
    guide = (DOCKER / "README.md").read_text(encoding="utf-8")
    assert "up to four web (or gateway) replicas fit" in guide
    assert "PORTCULLIS_DB_POOL_SIZE ×" in guide


def duration_s(value: str) -> float:
    """Seconds in a Compose duration (``30s``, ``1m30s``, ``500ms``)."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value)
    assert parts, value
    assert "".join(number + unit for number, unit in parts) == value, value
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(number) * scale[unit] for number, unit in parts)


def test_compose_file_references_only_what_it_declares_and_validates_where_the_plugin_is(
    tmp_path: Path,
) -> None:
    # What `docker compose config` would refuse, checked without it: names that are not declared, a bind
    # mount of a file that is not there, a dependency on a service another profile may leave out, a
    # duration it cannot read, and a merge key left unresolved.
    top = compose()
    services = top["services"]
    used: dict[str, set[str]] = {"secrets": set(), "volumes": set(), "networks": set()}
    for name, svc in services.items():
        assert not [key for key in svc if key.startswith(("<<", "x-"))], name
        used["networks"] |= set(svc["networks"])
        used["secrets"] |= set(svc.get("secrets", []))
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (DOCKER / source).is_file(), f"{name} mounts {source}, which is not there"
            else:
                used["volumes"].add(source)
        for dependency in svc.get("depends_on", {}):
            assert dependency in services, f"{name} depends on {dependency}"
            if "profiles" not in svc:
                assert "profiles" not in services[dependency], f"{name} always needs {dependency}"
        for duration in [svc.get("stop_grace_period"), *svc.get("healthcheck", {}).values()]:
            if isinstance(duration, str) and duration[:1].isdigit():
                assert duration_s(duration) > 0, f"{name}: {duration}"
    for kind, names in used.items():
        assert names == set(top[kind]), kind  # every reference declared, every declaration used
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode:
        return  # only the docker CLI client, or none: the checks above are what runs here
    # A hermetic copy: dummy secret files, and no developer's docker/.env.
    (tmp_path / "docker" / "secrets").mkdir(parents=True)
    for name in ("compose.yaml", "Caddyfile", "caddy-start.sh"):
        shutil.copy(DOCKER / name, tmp_path / "docker" / name)
    for name in compose()["secrets"]:
        (tmp_path / "docker" / "secrets" / f"{name}.txt").write_text("dummy\n", encoding="utf-8")
    env = {key: value for key, value in os.environ.items() if not key.startswith("COMPOSE_")}
    profiles = [arg for profile in ("fake", "gpu", "tls", "gateway") for arg in ("--profile", profile)]
    result = subprocess.run(
        [docker, "compose", "-f", str(tmp_path / "docker" / "compose.yaml"), *profiles, "config", "--quiet"],
        capture_output=True,
        text=True,
        env={**env, **DEPLOY_ENV},
    )
    assert result.returncode == 0, result.stderr


# ---- Dockerfile -------------------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]


@cache
def stages() -> list[Stage]:
    """Split the Dockerfile into stages of (INSTRUCTION, arguments), continuations joined."""
    logical: list[str] = []
    pending = ""
    for raw_line in DOCKERFILE_PATH.read_text(encoding="utf-8").splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines, inside continuations too
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    result: list[Stage] = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        if instruction.upper() == "FROM":
            base, _, name = args.partition(" AS ")
            result.append(Stage(base=base.strip(), name=name.strip()))
        else:
            result[-1].instructions.append((instruction.upper(), args.strip()))
    return result


def test_dockerfile_builds_wheels_in_a_builder_and_installs_only_wheels_in_a_slim_final_stage() -> None:
    builder, final = stages()[0], stages()[-1]
    assert len(stages()) >= 2
    assert all(stage.base == "python:3.11-slim" for stage in stages())
    assert any("pip wheel" in run for run in builder.args("RUN"))
    installs = [run for run in final.args("RUN") if "pip install" in run]
    assert installs
    assert all("--no-index" in run and "/wheels" in run for run in installs)
    for run in final.args("RUN"):
        if re.search(r"\b(apt-get|apt|apk)\s+(install|add)\b", run):
            assert BUILD_TOOLS.isdisjoint(run.split()), run
    assert final.args("WORKDIR") == ["/app"]


def test_final_stage_runs_as_unprivileged_user_10001() -> None:
    final = stages()[-1]
    users = final.args("USER")
    assert users
    assert users[-1] == "10001:10001"
    assert any("--uid 10001" in run for run in final.args("RUN"))
    last_user = max(i for i, (name, _) in enumerate(final.instructions) if name == "USER")
    assert all(name != "RUN" for name, _ in final.instructions[last_user:])


def test_image_checks_its_health_with_python_and_starts_through_the_role_entrypoint() -> None:
    final = stages()[-1]
    (healthcheck,) = final.args("HEALTHCHECK")
    assert '"python", "/app/docker/healthcheck.py", "http://127.0.0.1:8000/healthz"' in healthcheck
    assert not re.search(r"\b(curl|wget)\b", " ".join(args for _, args in final.instructions))
    assert final.args("ENTRYPOINT") == ['["/app/docker/entrypoint.sh"]']
    assert final.args("CMD") == ['["web"]']


def test_dockerfile_passes_hadolint_where_it_is_installed() -> None:
    assert [stage.name for stage in stages()] == ["builder", "runtime"]
    hadolint = tool("hadolint")
    if hadolint is None:
        return  # not installed here: the structural tests above still hold the Dockerfile to account
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE_PATH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- entrypoint -------------------------------------------------------------------------------------


@dataclass
class EntrypointRun:
    returncode: int
    stdout: str
    stderr: str
    commands: list[str]
    web_concurrency_seen: list[str]
    metrics_dirs_seen: list[str]
    upstream_keys_seen: list[str]


def lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


@pytest.fixture
def run_entrypoint(tmp_path: Path) -> Callable[..., EntrypointRun]:
    """Run docker/entrypoint.sh with stand-ins for python, uvicorn and celery that log their arguments."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    log = tmp_path / "commands.log"
    for name in ("python", "uvicorn", "celery"):
        stub = stubs / name
        stub.write_text(
            "#!/bin/sh\n"
            '{ printf %s "${0##*/}"; for arg in "$@"; do printf " %s" "$arg"; done; echo; } >> "$STUB_LOG"\n'
            'echo "${WEB_CONCURRENCY-unset}" >> "$STUB_LOG.env"\n'
            'echo "${PROMETHEUS_MULTIPROC_DIR-unset}" >> "$STUB_LOG.prom"\n'
            'echo "${VLLM_API_KEY-unset}" >> "$STUB_LOG.key"\n'
            'case " $* " in *" $STUB_FAIL_ON "*) exit 3 ;; esac\n',
            encoding="utf-8",
        )
        stub.chmod(0o755)

    def run(*args: str, env: Mapping[str, str] | None = None) -> EntrypointRun:
        base = {"PATH": f"{stubs}{os.pathsep}/usr/bin{os.pathsep}/bin", "HOME": str(tmp_path)}
        base |= {"STUB_LOG": str(log), "STUB_FAIL_ON": "never-matches"}
        result = subprocess.run(
            ["sh", str(ENTRYPOINT), *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env={**base, **(env or {})},
            timeout=30,
        )
        logs = [log, Path(f"{log}.env"), Path(f"{log}.prom"), Path(f"{log}.key")]
        commands, seen, dirs, keys = (lines_of(path) for path in logs)
        for path in logs:
            path.unlink(missing_ok=True)
        return EntrypointRun(result.returncode, result.stdout, result.stderr, commands, seen, dirs, keys)

    return run


def test_entrypoint_is_valid_posix_shell_that_never_traces_itself() -> None:
    for shell in ("sh", "bash"):
        result = subprocess.run([shell, "-n", str(ENTRYPOINT)], capture_output=True, text=True)
        assert result.returncode == 0, f"{shell}: {result.stderr}"
    text = ENTRYPOINT.read_text(encoding="utf-8")
    assert text.startswith("#!/bin/sh\n")
    assert re.search(r"^set -eu$", text, re.MULTILINE)
    assert not re.search(r"^\s*set\s+-[a-z]*x|xtrace", text, re.MULTILINE)
    assert os.access(ENTRYPOINT, os.X_OK)
    shellcheck = tool("shellcheck")
    if shellcheck is not None:
        result = subprocess.run([shellcheck, str(ENTRYPOINT)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout


def test_entrypoint_has_a_case_branch_for_every_documented_role() -> None:
    branches = set(re.findall(r"^\s{4}([a-z]+)\)$", ENTRYPOINT.read_text(encoding="utf-8"), re.MULTILINE))
    assert branches == set(ROLES)
    guide = (DOCKER / "README.md").read_text(encoding="utf-8")
    for role in ROLES:
        assert f"| `{role}` |" in guide, role


@pytest.mark.parametrize("role", ROLES)
def test_each_role_runs_its_documented_command(
    run_entrypoint: Callable[..., EntrypointRun], role: str
) -> None:
    result = run_entrypoint(role)
    assert result.returncode == 0, result.stderr
    assert result.commands == ROLE_COMMANDS[role]


def test_web_does_not_serve_when_migrations_fail(run_entrypoint: Callable[..., EntrypointRun]) -> None:
    result = run_entrypoint("web", env={"STUB_FAIL_ON": "migrate"})
    assert result.returncode == 3
    assert result.commands == ["python manage.py migrate --noinput"]


def test_arguments_and_settings_reach_the_server(run_entrypoint: Callable[..., EntrypointRun]) -> None:
    # FORWARDED_ALLOW_IPS is no knob any more: set or not, nothing of it reaches the command line.
    env = {"WEB_CONCURRENCY": "7", "FORWARDED_ALLOW_IPS": "*", "CELERY_CONCURRENCY": "5"}
    web = run_entrypoint("gateway", "--ssl-keyfile", "/run/secrets/tls_key", env=env)
    assert web.commands == [
        UVICORN.replace("--workers 4", "--workers 7") + " --ssl-keyfile /run/secrets/tls_key"
    ]
    assert run_entrypoint("worker", env=env).commands == ["celery -A config worker -l info --concurrency 5"]


def uvicorn_invocations(script: str) -> list[str]:
    """The logical lines of a shell script (comments dropped, continuations joined) that run uvicorn."""
    logical: list[str] = []
    pending = ""
    for raw_line in script.splitlines():
        line = raw_line.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    return [line for line in logical if re.search(r"(^|[\s;&|(])(exec\s+)?(\S*/)?uvicorn\s", line)]


def test_uvicorn_never_takes_the_client_address_from_proxy_headers(
    run_entrypoint: Callable[..., EntrypointRun],
) -> None:
    # uvicorn's own handling would put a forgeable X-Forwarded-For hop in scope["client"]; Portcullis needs
    # the socket peer there and resolves the client itself across PORTCULLIS_TRUSTED_PROXIES.
    invocations = uvicorn_invocations(ENTRYPOINT.read_text(encoding="utf-8"))
    assert invocations, "the entrypoint runs no uvicorn?"
    for line in invocations:
        flags = line.split()
        assert "--no-proxy-headers" in flags, line
        assert "--proxy-headers" not in flags, line
        assert not any(flag.startswith("--forwarded-allow-ips") for flag in flags), line
    # And as run: every uvicorn command any role starts, whatever FORWARDED_ALLOW_IPS says.
    serving = set()
    for role in ROLES:
        result = run_entrypoint(role, env={"FORWARDED_ALLOW_IPS": "*"})
        for command in result.commands:
            words = command.split()
            if "uvicorn" in words[:3]:
                serving.add(role)
                assert "--no-proxy-headers" in words, command
                assert "--no-server-header" in words, command  # no "server: uvicorn" for a prober
                assert "--proxy-headers" not in words, command
                assert not any(word.startswith("--forwarded-allow-ips") for word in words), command
    assert serving == {"web", "gateway"}
    # Nothing under docker/ offers FORWARDED_ALLOW_IPS (or uvicorn's UVICORN_PROXY_HEADERS) as a setting.
    local = {DOCKER / ".env"} | set((DOCKER / "secrets").glob("*.txt"))  # a developer's own, never shipped
    for path in sorted(DOCKER.rglob("*")):
        if path.is_file() and path not in local:
            text = path.read_text(encoding="utf-8", errors="replace")
            assert "FORWARDED_ALLOW_IPS" not in text, path.relative_to(ROOT)
            assert "UVICORN_PROXY_HEADERS" not in text, path.relative_to(ROOT)


@pytest.mark.parametrize("role", ["web", "gateway"])
@pytest.mark.parametrize("arg", ["--proxy-headers", "--forwarded-allow-ips", "--forwarded-allow-ips=*"])
def test_entrypoint_refuses_to_turn_uvicorn_proxy_headers_back_on(
    run_entrypoint: Callable[..., EntrypointRun], role: str, arg: str
) -> None:
    result = run_entrypoint(role, "--ssl-keyfile", "/run/secrets/tls_key", arg, "10.0.0.0/8")
    assert result.returncode == 64
    assert "PORTCULLIS_TRUSTED_PROXIES" in result.stderr
    assert result.commands == []  # refused before migrations or the server run


def test_any_other_command_runs_as_given(run_entrypoint: Callable[..., EntrypointRun]) -> None:
    result = run_entrypoint("sh", "-c", 'echo "ran: $0 $1"', "one", "two")
    assert result.returncode == 0
    assert result.stdout == "ran: one two\n"
    assert run_entrypoint().returncode == 64  # no role at all is a usage error


def test_database_password_file_fills_pgpassword_without_printing_it(
    run_entrypoint: Callable[..., EntrypointRun], tmp_path: Path
) -> None:
    secret = "s3cret-Value-0123456789-ABCDEFGHIJKLMNOP"
    (tmp_path / "pg").write_text(secret + "\n", encoding="utf-8")
    out = tmp_path / "seen"
    result = run_entrypoint(
        "sh", "-c", 'printf %s "$PGPASSWORD" > "$0"', str(out), env={"PGPASSWORD_FILE": str(tmp_path / "pg")}
    )
    assert result.returncode == 0
    assert out.read_text(encoding="utf-8") == secret
    assert secret not in result.stdout + result.stderr
    missing = run_entrypoint("web", env={"PGPASSWORD_FILE": str(tmp_path / "absent")})
    assert missing.returncode == 78
    assert "PGPASSWORD_FILE" in missing.stderr
    assert missing.commands == []


def test_fakevllm_requires_the_upstream_key_from_its_file(
    run_entrypoint: Callable[..., EntrypointRun], tmp_path: Path
) -> None:
    (tmp_path / "key").write_text("upstream-key\n", encoding="utf-8")
    env = {"VLLM_API_KEY_FILE": str(tmp_path / "key"), "FAKEVLLM_MODELS": "a,b", "WEB_CONCURRENCY": "4"}
    result = run_entrypoint("fakevllm", env=env)
    # in the environment, as vLLM reads it: on the command line every process could read it (ps)
    assert result.commands == ["python -m fakevllm --host 0.0.0.0 --port 8001 --models a,b"]
    assert result.upstream_keys_seen == ["upstream-key"]
    assert result.web_concurrency_seen == ["unset"]  # uvicorn.run() would read it as a worker count
    (tmp_path / "key").write_text("", encoding="utf-8")
    empty = run_entrypoint("fakevllm", env=env)
    assert empty.returncode == 78
    assert empty.commands == []


# ---- stopping ---------------------------------------------------------------------------------------

# An application that streams until it is cancelled or its client goes, and records its lifespan shutdown
# (where Portcullis hands its buffered usage and audit records to Redis). Django is set up, as
# config.asgi does, for the entrypoint's --http config.protocol:AuditedHttpToolsProtocol.
STREAMING_APP = """
import asyncio, os
import django

django.setup()


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        with open(os.environ["SHUTDOWN_LOG"], "a") as log:
            log.write(f"{os.getpid()}\\n")
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})

    async def disconnected():
        while (await receive())["type"] != "http.disconnect":  # the request's body comes first
            pass

    gone = asyncio.ensure_future(disconnected())
    try:
        while not gone.done():
            await send({"type": "http.response.body", "body": b"data: tick\\n\\n", "more_body": True})
            await asyncio.sleep(0.1)
    except asyncio.CancelledError:
        pass
"""


def hand_off_budget_s() -> float:
    source = (ROOT / "gateway" / "redisbatch.py").read_text(encoding="utf-8")
    budget = re.search(r"^STOP_BUDGET_S = (\d+(?:\.\d+)?)\b", source, re.MULTILINE)
    assert budget, "gateway/redisbatch.py has no STOP_BUDGET_S"
    return float(budget[1])


def graceful_timeout_s(command: str) -> int:
    timeout = re.search(r" --timeout-graceful-shutdown (\d+)(?: |$)", command)
    assert timeout, f"uvicorn would wait for open responses for ever: {command}"
    return int(timeout[1])


def test_servers_are_killed_only_after_the_graceful_timeout_and_the_hand_off(
    run_entrypoint: Callable[..., EntrypointRun],
) -> None:
    for role in SERVERS:
        (serve,) = [command for command in run_entrypoint(role).commands if command.startswith("uvicorn ")]
        grace = duration_s(service(role)["stop_grace_period"])
        assert grace > graceful_timeout_s(serve) + hand_off_budget_s(), role
    (longer,) = run_entrypoint("gateway", env={"UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN": "45"}).commands
    assert graceful_timeout_s(longer) == 45
    guide = (DOCKER / "README.md").read_text(encoding="utf-8")
    for phrase in ("## Stopping", "terminationGracePeriodSeconds", "UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN"):
        assert phrase in guide, phrase


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_served_command_cuts_an_open_stream_at_sigterm_and_then_shuts_the_application_down(
    run_entrypoint: Callable[..., EntrypointRun], tmp_path: Path
) -> None:
    # The entrypoint's own uvicorn command line, run for real with two workers: only the application and
    # the address differ. A stream that never ends must not hold the stop past the graceful timeout.
    graceful = 1
    env = {"UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN": str(graceful), "WEB_CONCURRENCY": "2"}
    (serve,) = run_entrypoint("gateway", env=env).commands
    args = serve.split()
    assert args[:2] == ["uvicorn", "config.asgi:application"]
    port = free_port()
    args[1] = "streaming_app:app"
    args[args.index("--host") + 1] = "127.0.0.1"
    args[args.index("--port") + 1] = str(port)
    (tmp_path / "streaming_app.py").write_text(STREAMING_APP, encoding="utf-8")
    shutdown_log = tmp_path / "shutdown.log"
    server_env = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "HOME": str(tmp_path),
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}",
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DJANGO_DEBUG": "true",
        "PORTCULLIS_VAR_DIR": str(tmp_path / "var"),
        "SHUTDOWN_LOG": str(shutdown_log),
    }  # and no UVICORN_* variable: only the command line may set the timeout
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "uvicorn"), *args[1:]],
        cwd=ROOT,
        env=server_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its workers share its process group, to be ended together if need be
    )
    try:
        stream = None
        for _ in range(300):  # the workers set Django up first
            try:
                stream = socket.create_connection(("127.0.0.1", port), timeout=10)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode() if server.stderr else ""
                threading.Event().wait(0.1)
        assert stream is not None, "uvicorn did not listen"
        with stream:
            stream.sendall(b"GET /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert b"200" in stream.recv(4096).split(b"\r\n", 1)[0]  # the response is under way
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=graceful + 8)
            except subprocess.TimeoutExpired:
                pytest.fail("after SIGTERM uvicorn still waits for the open stream: no graceful timeout")
        assert server.returncode == 0
        assert len(lines_of(shutdown_log)) == 2  # each worker ran the application's shutdown after the cut
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
        if server.stderr is not None:
            server.stderr.close()


# ---- the TLS proxy ----------------------------------------------------------------------------------


def proxy_start(tmp_path: Path, issuer: str, publish: str | None = None) -> tuple[int, str, str]:
    """Run docker/caddy-start.sh with a stand-in for caddy; return its status, the site host, stderr."""
    seen = tmp_path / "site"
    seen.unlink(missing_ok=True)
    env = {"PATH": f"/usr/bin{os.pathsep}/bin", "PORTCULLIS_ISSUER": issuer}
    if publish is not None:
        env["PORTCULLIS_HTTPS_PUBLISH"] = publish
    script = 'printf %s "$PORTCULLIS_SITE_HOST" > "$0"'
    result = subprocess.run(
        ["sh", str(CADDY_START), "sh", "-c", script, str(seen)], capture_output=True, text=True, env=env
    )
    site = seen.read_text(encoding="utf-8") if seen.exists() else ""
    return result.returncode, site, result.stderr


@pytest.mark.parametrize(
    ("issuer", "publish", "host"),
    [
        ("https://localhost", None, "localhost"),
        ("https://localhost/", None, "localhost"),  # as a site address: a path matcher, empty 200s elsewhere
        ("https://auth.example.com//", "443", "auth.example.com"),
        ("https://auth.example.com:8443", "8443", "auth.example.com"),
        ("https://auth.example.com:8443/", "0.0.0.0:8443", "auth.example.com"),
    ],
)
def test_the_proxy_serves_the_issuers_host_alone(
    tmp_path: Path, issuer: str, publish: str | None, host: str
) -> None:
    status, site, stderr = proxy_start(tmp_path, issuer, publish)
    assert status == 0, stderr
    assert site == host


@pytest.mark.parametrize(
    ("issuer", "publish"),
    [
        ("https://auth.example.com/portcullis", None),  # a path Portcullis does not serve under
        ("https://auth.example.com:8443", None),  # published on 443: the issuer would point at nothing
        ("https://auth.example.com", "8443"),
        ("http://auth.example.com", None),
        ("https://user@auth.example.com", None),
        ("https://auth.example.com:https", None),
        ("", None),
    ],
)
def test_the_proxy_refuses_an_issuer_it_cannot_serve(
    tmp_path: Path, issuer: str, publish: str | None
) -> None:
    status, site, stderr = proxy_start(tmp_path, issuer, publish)
    assert status == 78
    assert "PORTCULLIS_ISSUER" in stderr
    assert site == ""  # caddy never ran


def caddy_version(caddy: str) -> tuple[int, ...]:
    shown = subprocess.run([caddy, "version"], capture_output=True, text=True).stdout
    found = re.match(r"v(\d+)\.(\d+)", shown)
    return (int(found[1]), int(found[2])) if found else ()


def test_caddy_serves_one_host_on_443_and_trusts_only_the_proxies_it_is_given(tmp_path: Path) -> None:
    proxy = service("proxy")
    assert proxy["entrypoint"] == ["/bin/sh", "/etc/caddy/start.sh"]
    assert proxy["command"] == ["caddy", "run", "--config", "/etc/caddy/Caddyfile", "--adapter", "caddyfile"]
    assert {"./Caddyfile:/etc/caddy/Caddyfile:ro", "./caddy-start.sh:/etc/caddy/start.sh:ro"} <= set(
        proxy["volumes"]
    )
    raw = yaml.safe_load(COMPOSE_PATH.read_text(encoding="utf-8"))
    for publish in ("8443", "127.0.0.1:8443"):  # what caddy-start.sh checks is what is published
        moved = resolved(raw, {**DEPLOY_ENV, "PORTCULLIS_HTTPS_PUBLISH": publish})["services"]["proxy"]
        assert moved["environment"]["PORTCULLIS_HTTPS_PUBLISH"] == publish
        assert f"{publish}:443" in moved["ports"]
    assert proxy["environment"]["PORTCULLIS_PROXY_TRUSTED_PROXIES"] == ""  # nothing in front, by default
    caddyfile = (DOCKER / "Caddyfile").read_text(encoding="utf-8")
    blocks = [line for line in caddyfile.splitlines() if line.endswith("{") and not line[:1].isspace()]
    assert blocks == ["{", "https://{$PORTCULLIS_SITE_HOST}:443 {"]
    assert "trusted_proxies static {$PORTCULLIS_PROXY_TRUSTED_PROXIES}" in caddyfile
    shellcheck = tool("shellcheck")
    if shellcheck is not None:
        result = subprocess.run([shellcheck, str(CADDY_START)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout
    caddy = tool("caddy")
    if caddy is None or caddy_version(caddy) < (2, 7):  # trusted_proxies came in Caddy 2.6.3
        return  # no Caddy like the image's here: the checks above are what runs
    env = {
        "PATH": f"/usr/bin{os.pathsep}/bin",
        "HOME": str(tmp_path),
        "PORTCULLIS_ISSUER": "https://auth.example.com/",
        "PORTCULLIS_PROXY_TRUSTED_PROXIES": "10.0.0.0/8 192.0.2.1",
    }
    adapt = [caddy, "adapt", "--config", str(DOCKER / "Caddyfile"), "--adapter", "caddyfile"]
    result = subprocess.run(["sh", str(CADDY_START), *adapt], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    (server,) = json.loads(result.stdout)["apps"]["http"]["servers"].values()
    assert server["listen"] == [":443"]
    (route,) = server["routes"]
    assert route["match"] == [{"host": ["auth.example.com"]}]  # no path matcher
    assert server["trusted_proxies"] == {"source": "static", "ranges": ["10.0.0.0/8", "192.0.2.1"]}


# ---- health check -----------------------------------------------------------------------------------


@dataclass
class FakeServer:
    url: str
    requests: list[dict[str, str]]
    status: list[int]


@contextmanager
def serve(tls: ssl.SSLContext | None = None) -> Iterator[FakeServer]:
    """Serve GET on 127.0.0.1 in a thread, recording each request; answer with status[0]."""
    seen: list[dict[str, str]] = []
    status = [200]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
            self.send_response(status[0])
            self.send_header("Location", "https://auth.example.com/healthz")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    scheme = "https" if tls else "http"
    try:
        yield FakeServer(f"{scheme}://127.0.0.1:{server.server_address[1]}/healthz", seen, status)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def http_server() -> Iterator[FakeServer]:
    with serve() as server:
        yield server


def probe(url: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {key: value for key, value in os.environ.items() if not key.startswith(("DJANGO_", "UVICORN_"))}
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), url],
        capture_output=True,
        text=True,
        env={**base, **env},
        timeout=30,
    )


def test_healthcheck_passes_on_200_with_a_plain_get(http_server: FakeServer) -> None:
    # /healthz is answered before Django: no allowed Host and no X-Forwarded-Proto, whatever the settings.
    result = probe(http_server.url, DJANGO_ALLOWED_HOSTS=".example.com,other.example.org")
    assert result.returncode == 0, result.stderr
    (request,) = http_server.requests
    assert request["path"] == "/healthz"
    assert request["host"] == urlsplit(http_server.url).netloc
    assert not {name for name in request if name.startswith("x-forwarded")}


def test_healthcheck_probes_the_local_app_port_by_default_within_the_healthcheck_timeout() -> None:
    source = HEALTHCHECK.read_text(encoding="utf-8")
    assert 'DEFAULT_URL = "http://127.0.0.1:8000/healthz"' in source
    (timeout,) = re.findall(r"^TIMEOUT_S = (\d+(?:\.\d+)?)\b", source, re.MULTILINE)
    (healthcheck,) = stages()[-1].args("HEALTHCHECK")
    image_limit = re.search(r"--timeout=(\d+)s", healthcheck)
    assert image_limit
    limits = [int(image_limit[1])]
    limits += [int(service(name)["healthcheck"]["timeout"].removesuffix("s")) for name in ("web", "gateway")]
    assert 0 < float(timeout) < min(limits)


@pytest.mark.parametrize("status", [301, 302, 307, 308, 204, 503])
def test_healthcheck_fails_on_anything_but_200_and_follows_no_redirect(
    http_server: FakeServer, status: int
) -> None:
    http_server.status[0] = status
    result = probe(http_server.url)
    assert result.returncode == 1
    assert f"HTTP {status}" in result.stderr
    assert len(http_server.requests) == 1


def test_healthcheck_fails_when_nothing_listens() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = probe(f"http://127.0.0.1:{port}/healthz")
    assert result.returncode == 1
    assert "did not answer" in result.stderr


def test_healthcheck_trusts_exactly_the_certificate_uvicorn_serves(tmp_path: Path) -> None:
    served_cert, served_key = self_signed_certificate(tmp_path, "auth.example.com")
    other_cert, _ = self_signed_certificate(tmp_path, "other.example.com")
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(served_cert, served_key)
    with serve(tls) as fake:
        assert probe(fake.url, UVICORN_SSL_CERTFILE=str(served_cert)).returncode == 0
        refused = probe(fake.url, UVICORN_SSL_CERTFILE=str(other_cert))
        assert refused.returncode == 1
        assert "CERTIFICATE_VERIFY_FAILED" in refused.stderr
        assert len(fake.requests) == 1


# ---- documentation ----------------------------------------------------------------------------------


def test_deploy_guide_covers_first_run_upgrades_backups_scaling_tls_and_kubernetes() -> None:
    guide = (DOCKER / "README.md").read_text(encoding="utf-8")
    for heading in ("## First run", "## Upgrades", "## Backups", "## Scaling", "## TLS", "## Kubernetes"):
        assert heading in guide, heading
    for phrase in (
        "docker compose run --rm web python manage.py createsuperuser",
        "pg_dump",
        "--scale web=",
        "PORTCULLIS_TRUSTED_PROXIES",
        "--ssl-keyfile",
        "replicas: 1",
        "Recreate",
        "GET /healthz",
        "*_FILE",
        "--no-proxy-headers",
        "docker compose ps -a",  # migrate has exited: plain `ps` would not list it
        "PORTCULLIS_TRUSTED_PROXIES=` (empty",  # TLS option 3, with no proxy to trust
        "PORTCULLIS_PROXY_TRUSTED_PROXIES",  # a load balancer in front of Caddy
    ):
        assert phrase in guide, phrase
    assert not re.search(r"docker compose ps(?! -a)", guide)
    assert "once the console ships" not in guide


def test_documented_one_off_commands_go_through_the_entrypoint() -> None:
    # It sets PGPASSWORD from PGPASSWORD_FILE: `docker compose exec web python ...` has no database password.
    (entrypoint,) = (json.loads(args)[0] for args in stages()[-1].args("ENTRYPOINT"))
    documents = [ROOT / "README.md", *sorted(DOCKER.rglob("*.md"))]
    pattern = re.compile(r"docker compose exec(?:\s+-\S+)*\s+(\S+)\s+(\S+)")
    checked = 0
    for document in documents:
        for match in pattern.finditer(document.read_text(encoding="utf-8")):
            if match[1] in APP_SERVICES:
                checked += 1
                assert match[2] == entrypoint, f"{document.relative_to(ROOT)}: {match[0]}"
    assert checked  # the runbooks do run commands in the app containers


@pytest.mark.parametrize("role", ["web", "gateway"])
def test_the_server_roles_give_the_workers_an_empty_shared_metrics_directory(
    run_entrypoint: Callable[..., EntrypointRun], role: str, tmp_path: Path
) -> None:
    made = run_entrypoint(role)
    assert made.returncode == 0, made.stderr
    served_with = Path(made.metrics_dirs_seen[-1])
    assert served_with.is_dir()
    assert served_with.name.startswith("portcullis-metrics.")
    assert not any(served_with.iterdir())
    served_with.rmdir()
    given = tmp_path / "prom"
    given.mkdir()
    (given / "counter_123.db").write_bytes(b"stale")  # what a previous run of the container left
    (given / "keep.txt").write_text("not ours")
    reused = run_entrypoint(role, env={"PROMETHEUS_MULTIPROC_DIR": str(given)})
    assert reused.metrics_dirs_seen[-1] == str(given)
    assert sorted(p.name for p in given.iterdir()) == ["keep.txt"]
