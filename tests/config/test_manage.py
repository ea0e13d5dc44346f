"""The command line: manage.py stops on a bad setting with one line, and bin/manage runs it on the embedded
default as bin/run serves it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import environ_unconfigured
from tests.e2e.conftest import ROOT

EX_CONFIG = 78


def embedded_environ(var_dir: Path, **extra: str) -> dict[str, str]:
    """A shell's environment with nothing that configures Portcullis, as bin/run and bin/manage start."""
    env = {k: v for k, v in environ_unconfigured().items() if k not in ("DATABASE_URL", "PORT", "FAKE_PORT")}
    env.update(PORTCULLIS_VAR_DIR=str(var_dir), **extra)
    return env


def test_a_missing_setting_stops_manage_py_with_one_line_naming_it_not_a_traceback():
    env = environ_unconfigured()  # DJANGO_DEBUG unset: production, where the secret key is required
    done = subprocess.run(
        [sys.executable, "manage.py", "createclient", "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == EX_CONFIG
    assert done.stderr == "manage.py: DJANGO_SECRET_KEY must be set when DJANGO_DEBUG is false\n"
    assert done.stdout == ""


def manage_py(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def test_the_settings_and_pythonpath_options_choose_the_settings_that_manage_py_checks(tmp_path):
    (tmp_path / "elsewhere_settings.py").write_text(
        'from config.test_settings import *  # noqa: F403\nPORTCULLIS_MARKER = "elsewhere"\n'
    )
    env = environ_unconfigured()  # config.settings, the default, would stop: no secret key
    done = manage_py("diffsettings", "--settings=config.test_settings", env=env)
    assert done.returncode == 0, done.stderr  # was the default's one-line error: --settings came too late
    assert "SETTINGS_MODULE = 'config.test_settings'" in done.stdout
    done = manage_py("diffsettings", "--settings=elsewhere_settings", f"--pythonpath={tmp_path}", env=env)
    assert done.returncode == 0, done.stderr
    assert "PORTCULLIS_MARKER = 'elsewhere'" in done.stdout


def test_a_settings_module_that_cannot_be_imported_is_one_line():
    done = manage_py("check", "--settings=nope.settings", env=environ_unconfigured())
    assert done.returncode == EX_CONFIG  # was a ModuleNotFoundError traceback
    assert done.stderr.startswith("manage.py: cannot import the settings module 'nope.settings': ")
    assert done.stderr.count("\n") == 1
    assert done.stdout == ""


def test_a_bad_setting_in_the_settings_module_an_option_names_is_one_line(tmp_path):
    (tmp_path / "broken_settings.py").write_text(
        "from django.core.exceptions import ImproperlyConfigured\n"
        'raise ImproperlyConfigured("EXAMPLE_SETTING must be set")\n'
    )
    env = environ_unconfigured()
    env["DJANGO_SETTINGS_MODULE"] = "config.test_settings"  # would load: the option must win over it
    done = manage_py("check", "--settings=broken_settings", f"--pythonpath={tmp_path}", env=env)
    assert done.returncode == EX_CONFIG  # was 0: the check ran on config.test_settings
    assert done.stderr == "manage.py: EXAMPLE_SETTING must be set\n"
    assert done.stdout == ""


def test_a_python_without_django_is_told_to_use_bin_manage():
    done = subprocess.run(  # -S: no site-packages, as a system python3 without the project's .venv
        [sys.executable, "-S", "manage.py", "check"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == EX_CONFIG
    assert done.stderr.count("\n") == 1
    assert "cannot import Django; use bin/manage" in done.stderr


def test_bin_manage_creates_a_client_on_the_embedded_default_from_any_directory(tmp_path):
    env = embedded_environ(tmp_path / "var", PORT="18123")
    manage = str(ROOT / "bin" / "manage")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [manage, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )

    assert run("migrate", "--noinput", "-v", "0").returncode == 0
    created = run("createclient", "--name", "Scripted", "--grant", "client-credentials", "--json")
    assert created.returncode == 0, created.stderr
    assert set(json.loads(created.stdout)) == {"client_id", "client_secret"}
    assert (tmp_path / "var" / "portcullis.sqlite3").exists()  # the embedded default's SQLite database
    shown = run(
        "shell", "-v", "0", "-c", "from django.conf import settings as s; print(s.DEBUG, s.PORTCULLIS_ISSUER)"
    )
    assert shown.stdout.split() == ["True", "http://127.0.0.1:18123"]  # the issuer bin/run serves on PORT


def test_bin_run_and_bin_manage_take_the_embedded_environment_from_one_file():
    for script in ("run", "manage"):
        text = (ROOT / "bin" / script).read_text()
        assert "bin/_embedded.sh" in text, script
        assert not re.search(r"(DJANGO_DEBUG|PORTCULLIS_ISSUER|VLLM_UPSTREAMS)=", text), (
            script
        )  # set there only


def test_bin_run_installs_the_openai_sdk_its_banner_runs_with_the_interpreter_that_has_it():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert any(re.match(r"openai\b", req) for req in extras["demo"])
    assert "portcullis[demo]" in extras["test"]  # one pinned range for both
    run = (ROOT / "bin" / "run").read_text()
    assert '. bin/_venv.sh "[demo]"' in run
    examples = re.findall(r"^\s*(\S*python\S*) -c ", run, flags=re.MULTILINE)
    assert examples == [".venv/bin/python"]


def test_bin_run_serves_without_proxy_headers_and_without_naming_its_server():
    run = (ROOT / "bin" / "run").read_text()
    serve = run[run.index("-m uvicorn") :].replace("\\\n", " ").split("\n")[0].split()
    assert "--no-proxy-headers" in serve  # the client's address is resolved by Portcullis, not uvicorn
    assert "--no-server-header" in serve  # no "server: uvicorn" on every answer


def run_script(
    script: str, env: dict[str, str], *args: str, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    """Run bin/<script>; on a timeout stop everything it started (its own process group), then fail."""
    with subprocess.Popen(
        [str(ROOT / "bin" / script), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as child:
        try:
            out, err = child.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGTERM)
            child.communicate()
            raise
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


DEPLOYMENT_NOTE = (
    "bin/manage: DATABASE_URL or REDIS_URL is set: not the embedded default; "
    "running on this environment's settings as they are"
)


@pytest.mark.parametrize("variable", ["DATABASE_URL", "REDIS_URL"])
def test_bin_manage_on_a_deployment_does_not_switch_on_development_mode(tmp_path, variable):
    url = f"sqlite:///{tmp_path}/deployed.sqlite3" if variable == "DATABASE_URL" else "redis://127.0.0.1:1/0"
    env = embedded_environ(tmp_path / "var", **{variable: url})
    done = run_script("manage", env, "rotatekeys", cwd=tmp_path)
    assert done.returncode == EX_CONFIG  # was a key encrypted with the development key-encryption key
    assert done.stderr.splitlines() == [
        DEPLOYMENT_NOTE,
        "manage.py: DJANGO_SECRET_KEY must be set when DJANGO_DEBUG is false",
    ]
    assert not (tmp_path / "deployed.sqlite3").exists()
    assert not (tmp_path / "var").exists()


def test_bin_manage_on_a_configured_deployment_runs_on_its_settings_as_they_are(tmp_path):
    env = embedded_environ(
        tmp_path / "var",
        DATABASE_URL=f"sqlite:///{tmp_path}/deployed.sqlite3",
        DJANGO_SECRET_KEY="a-production-secret-for-this-test-only-0123456789",
        PORTCULLIS_KEY_ENCRYPTION_KEY="a-production-key-encryption-key-for-this-test",
        PORTCULLIS_ISSUER="https://auth.example.com",
        DJANGO_ALLOWED_HOSTS="auth.example.com",
        PORT="18123",
    )
    code = "import os; from django.conf import settings; print(settings.DEBUG, os.getenv('VLLM_UPSTREAMS'))"
    shown = run_script("manage", env, "shell", "-v", "0", "-c", code, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.split() == ["False", "None"]  # was True: DJANGO_DEBUG defaulted on a deployment
    assert shown.stderr.splitlines()[0] == DEPLOYMENT_NOTE


def test_bin_run_refuses_a_deployments_database_with_one_line_and_touches_nothing(tmp_path):
    database = tmp_path / "deployed.sqlite3"
    env = embedded_environ(
        tmp_path / "var", DATABASE_URL=f"sqlite:///{database}", PORT="18124", FAKE_PORT="18125"
    )
    done = run_script("run", env)
    assert done.returncode == EX_CONFIG  # was a demo admin, demo clients and a default policy written to it
    [line] = done.stderr.splitlines()
    assert line.startswith("bin/run: serves the embedded default only, and DATABASE_URL or REDIS_URL is set")
    assert done.stdout == ""
    assert not database.exists()
    assert not (tmp_path / "var").exists()
