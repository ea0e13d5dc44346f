"""The command line: manage.py stops on a bad setting with one line, and bin/manage runs it on the embedded
default as bin/run serves it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

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
