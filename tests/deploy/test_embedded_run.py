"""bin/run and bin/manage on the embedded default, as processes: var/ is this user's alone and its secret key
is the install's own; project code comes from the project whatever the current directory; bin/run checks
its ports first, waits for the fake vLLM, keeps a changed default policy, and stops on SIGTERM or Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.fernet import Fernet, InvalidToken

from config.settings import _DEV_SECRET, _fernet_key
from tests.conftest import environ_unconfigured
from tests.e2e.conftest import ROOT, free_port, wait_http

HIJACK = 'import sys; sys.stderr.write("HIJACKED\\n"); sys.exit(9)\n'
DEV_KEK = Fernet(_fernet_key("dev:" + _DEV_SECRET))  # what every install before var/secret-key sealed under


def embedded_env(var: Path, **extra: str) -> dict[str, str]:
    unset = ("DATABASE_URL", "PORT", "FAKE_PORT", "DEMO_MODELS")
    env = {k: v for k, v in environ_unconfigured().items() if k not in unset}
    env.update(PORTCULLIS_VAR_DIR=str(var), **extra)
    return env


def manage(env: dict[str, str], *args: str, cwd: Path = ROOT, umask: str = "022") -> str:
    """bin/manage in a shell with ``umask`` (022: the usual one, under which var/ was world-readable)."""
    done = subprocess.run(
        ["bash", "-c", f'umask {umask}; exec "$0" "$@"', str(ROOT / "bin" / "manage"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "HIJACKED" not in done.stderr
    return done.stdout


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def sealed_keys(database: Path) -> list[bytes]:
    with contextlib.closing(sqlite3.connect(database)) as db:
        return [row[0] for row in db.execute("SELECT private_key_encrypted FROM authserver_signingkey")]


# ---- var/ and the secret key -----------------------------------------------------------------------------


def test_bin_manage_makes_var_private_and_seals_the_keys_under_the_installs_own_secret(tmp_path):
    var = tmp_path / "var"
    manage(embedded_env(var), "migrate", "--noinput", "-v", "0")
    manage(embedded_env(var), "rotatekeys")
    assert mode(var) == 0o700  # was 0755, with the database 0644: anyone could read the sealed keys
    assert mode(var / "portcullis.sqlite3") == 0o600
    assert mode(var / "secret-key") == 0o600
    keys = sealed_keys(var / "portcullis.sqlite3")
    assert keys
    for sealed in keys:
        with pytest.raises(InvalidToken):  # and the development constant in config/settings.py no longer
            DEV_KEK.decrypt(bytes(sealed))  # opens them: it did, for whoever could read the database


def test_bin_manage_tightens_what_an_older_version_left_readable_and_only_that(tmp_path):
    var = tmp_path / "var"
    (var / "static").mkdir(parents=True)
    (var / "audit-spool").mkdir()
    (var / "audit-spool" / "batch.jsonl").write_text("{}\n")
    for name in ("portcullis.sqlite3", "demo-credentials.json"):
        (var / name).write_text("")
    for path in (var, var / "static", var / "audit-spool", *var.glob("**/*.*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    manage(embedded_env(var), "check")
    assert mode(var) == 0o700
    assert mode(var / "portcullis.sqlite3") == mode(var / "demo-credentials.json") == 0o600
    assert (mode(var / "audit-spool"), mode(var / "audit-spool" / "batch.jsonl")) == (0o700, 0o600)
    assert mode(var / "static") == 0o755  # not Portcullis's secret: left as it was


def test_each_new_install_has_a_secret_key_of_its_own(tmp_path):
    code = "from django.conf import settings; print(settings.SECRET_KEY)"
    shown = []
    for name in ("one", "two"):
        var = tmp_path / name
        shown.append(manage(embedded_env(var), "shell", "-v", "0", "-c", code).strip())
        assert shown[-1] == (var / "secret-key").read_text().strip()
        assert len(shown[-1]) >= 50
    assert shown[0] != shown[1]
    assert _DEV_SECRET not in shown


def test_an_install_from_before_the_secret_key_file_keeps_working_and_can_move_to_one(tmp_path):
    var = tmp_path / "var"
    database = var / "portcullis.sqlite3"
    older = embedded_env(var, DJANGO_DEBUG="true", DATABASE_URL=f"sqlite:///{database}")
    for args in (["migrate", "--noinput", "-v", "0"], ["rotatekeys"]):  # as bin/run made it before
        subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=older, check=True, timeout=120)
    count = len(sealed_keys(database))
    for sealed in sealed_keys(database):
        DEV_KEK.decrypt(bytes(sealed))  # sealed under the development constant, as every older install
    check = "from authserver.models import SigningKey as K; print(len(K.objects.all()), 'open')"
    check += "; from authserver.crypto import private_key_decrypt as d; [d(bytes(k.private_key_encrypted))"
    check += " for k in K.objects.all()]"
    assert manage(embedded_env(var), "shell", "-v", "0", "-c", check).split() == [str(count), "open"]
    assert not (var / "secret-key").exists()  # it keeps the development key its keys are sealed under
    assert mode(database) == 0o600
    # README, "Giving an older install a key of its own":
    subprocess.run(["bash", "-c", f"umask 077; head -c 48 /dev/urandom | base64 -w0 > {var}/secret-key"])
    previous = embedded_env(var, PORTCULLIS_KEY_ENCRYPTION_KEY_PREVIOUS="dev:" + _DEV_SECRET)
    assert f"{count} resealed" in manage(previous, "resealkeys")
    assert manage(embedded_env(var), "shell", "-v", "0", "-c", check).split() == [str(count), "open"]
    for sealed in sealed_keys(database):
        with pytest.raises(InvalidToken):
            DEV_KEK.decrypt(bytes(sealed))


# ---- project modules come from the project ---------------------------------------------------------------


def test_bin_manage_run_from_another_folder_imports_no_module_from_it(tmp_path):
    (tmp_path / "audit.py").write_text(HIJACK)  # an app's name, and a library's
    (tmp_path / "dj_database_url.py").write_text(HIJACK)
    env = embedded_env(tmp_path / "var")
    assert "no issues" in manage(env, "check", cwd=tmp_path)  # was HIJACKED, exit 9: every app is loaded


def test_a_celery_worker_started_from_another_folder_imports_no_module_from_it(tmp_path):
    (tmp_path / "audit.py").write_text(HIJACK)
    env = embedded_env(tmp_path / "var", DJANGO_DEBUG="true")
    celery = Path(sys.executable).parent / "celery"
    command = ["timeout", "90", str(celery), "-A", "config", "worker", "--pool", "solo", "-l", "info"]
    with subprocess.Popen(
        command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as worker:
        try:
            assert worker.stderr is not None
            lines = []
            for line in worker.stderr:  # ends when the worker exits (the hijack) or at "ready."
                lines.append(line)
                if " ready." in line:
                    break
            assert any(" ready." in line for line in lines), "".join(lines)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)
    assert "HIJACKED" not in "".join(lines)


# ---- bin/run ---------------------------------------------------------------------------------------------


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def group_gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


@contextlib.contextmanager
def bin_run(tmp_path: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """bin/run in a session of its own (a terminal's process group), its output in files."""
    with (tmp_path / "run.out").open("ab") as out, (tmp_path / "run.err").open("ab") as err:
        process = subprocess.Popen(
            [str(ROOT / "bin" / "run")], cwd=tmp_path, env=env, stdout=out, stderr=err, start_new_session=True
        )
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture
def run_env(tmp_path: Path) -> dict[str, str]:
    port, fake_port = free_port(), free_port()
    return embedded_env(tmp_path / "var", PORT=str(port), FAKE_PORT=str(fake_port))


def served(process: subprocess.Popen[bytes], env: dict[str, str]) -> None:
    wait_http(f"http://127.0.0.1:{env['PORT']}/healthz", timeout=120)
    assert process.poll() is None


def default_rpm(env: dict[str, str]) -> int:
    code = "from gateway.models import ClientPolicy as P; print(P.objects.get(client=None).rpm)"
    return int(manage(env, "shell", "-v", "0", "-c", code))


def test_bin_run_stops_both_servers_on_sigterm_and_on_ctrl_c_and_keeps_a_changed_default_policy(
    tmp_path, run_env
):
    ports = (int(run_env["PORT"]), int(run_env["FAKE_PORT"]))
    with bin_run(tmp_path, run_env) as process:
        served(process, run_env)
        process.send_signal(signal.SIGTERM)  # to bin/run alone, as a supervisor or `kill` sends it
        assert process.wait(timeout=30) == 128 + signal.SIGTERM  # was ignored until uvicorn exited
        assert group_gone(process.pid)
    assert all(port_free(port) for port in ports)
    assert default_rpm(run_env) == 600
    manage(run_env, "setpolicy", "--default", "--rpm", "5")
    with bin_run(tmp_path, run_env) as process:
        served(process, run_env)
        assert default_rpm(run_env) == 5  # was reset to 600 at every start
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole group
        assert process.wait(timeout=30) == 128 + signal.SIGINT
        assert group_gone(process.pid)
    assert all(port_free(port) for port in ports)


@pytest.mark.parametrize("busy", ["PORT", "FAKE_PORT"])
def test_bin_run_refuses_a_port_in_use_before_it_writes_anything(tmp_path, run_env, busy):
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", int(run_env[busy])))
        holder.listen()
        with bin_run(tmp_path, run_env) as process:
            assert process.wait(timeout=60) == 1
    error = (tmp_path / "run.err").read_text()
    assert f"127.0.0.1:{run_env[busy]} ({busy}) is in use" in error
    assert not (tmp_path / "var" / "portcullis.sqlite3").exists()  # was migrated, then failed to bind


def test_bin_run_stops_with_a_clear_message_when_the_fake_vllm_dies(tmp_path, run_env):
    run_env["DEMO_MODELS"] = ","  # no model: fakevllm refuses to start
    with bin_run(tmp_path, run_env) as process:
        assert process.wait(timeout=120) == 1  # was serving, with every model call failing
        assert group_gone(process.pid)
    error = (tmp_path / "run.err").read_text()
    assert f"bin/run: the fake vLLM did not start on 127.0.0.1:{run_env['FAKE_PORT']}" in error
    assert port_free(int(run_env["PORT"]))
