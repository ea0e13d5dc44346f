"""The management commands refuse bad input with one clear line, never a traceback, and change nothing:
arguments that are not UTF-8, limits past their column, an empty kid, scopes the console would refuse,
dates out of range or inside the retention window, and files that cannot be written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from io import StringIO

import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.utils import timezone

from audit.models import AuditEvent, AuditReport
from audit.services import audit_record
from authserver.models import Client, SigningKey
from gateway.models import ClientPolicy
from gateway.services import policy_set
from tests.conftest import environ_unconfigured
from tests.e2e.conftest import ROOT

pytestmark = pytest.mark.django_db

BAD = "bad\udcff"  # how Python hands a command the byte 0xff that is not UTF-8 (surrogateescape)


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue()


def created_clients() -> int:
    return AuditEvent.objects.filter(kind="client.created").count()


# ---- arguments that are not UTF-8 ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["createclient", "--name", BAD, "--grant", "client-credentials"],
        ["createclient", "--name", "ok", "--grant", "client-credentials", "--scope", BAD],
        ["setpolicy", BAD, "--rpm", "5"],
        ["setpolicy", "--default", "--models", BAD],
        ["setpolicy", "--default", "--allow-ip", BAD],
        ["rotatekeys", f"--revoke={BAD}"],
        ["auditreport", "--since", "2026-11-01", "--out", f"/tmp/{BAD}.html"],  # noqa: S108
        ["pruneaudit", "--before", "2020-01-01", "--archive", f"/tmp/{BAD}.jsonl"],  # noqa: S108
    ],
)
def test_an_argument_that_is_not_utf8_is_refused_before_anything_is_written(args):
    keys, events = SigningKey.objects.count(), AuditEvent.objects.count()
    with pytest.raises(CommandError, match="not valid UTF-8 text"):
        run(*args)  # was a UnicodeEncodeError traceback (or a model id stored that broke the console)
    assert (SigningKey.objects.count(), AuditEvent.objects.count()) == (keys, events)
    assert not ClientPolicy.objects.exists()


def test_the_policy_service_refuses_a_model_id_that_cannot_be_utf8(make_client):
    client = make_client().client
    with pytest.raises(ValidationError) as refused:
        policy_set(client=client, actor="test", allowed_models=["ok", BAD])
    assert "UTF-8" in str(refused.value.message_dict["allowed_models"])
    assert not ClientPolicy.objects.filter(client=client).exists()
    assert not AuditEvent.objects.filter(kind="policy.changed").exists()


def test_bin_manage_given_bytes_that_are_not_utf8_answers_with_usage_not_a_traceback(tmp_path):
    env = {k: v for k, v in environ_unconfigured().items() if k not in ("DATABASE_URL", "PORT")}
    env["PORTCULLIS_VAR_DIR"] = str(tmp_path / "var")
    for args in (
        [b"createclient", b"--name", b"bad\xff", b"--grant", b"client-credentials"],
        [b"setpolicy", b"x\xff", b"--rpm", b"5"],
        [b"rotatekeys", b"--revoke=k\xff"],
    ):
        done = subprocess.run(
            [str(ROOT / "bin" / "manage"), *args], cwd=tmp_path, env=env, capture_output=True, timeout=120
        )
        assert done.returncode == 2, done.stderr  # argparse's usage error
        assert b"not valid UTF-8 text" in done.stderr
        assert b"Traceback" not in done.stderr


# ---- setpolicy, rotatekeys, createclient -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "largest"), [("--rpm", 2147483647), ("--daily-tokens", 9223372036854775807)]
)
def test_setpolicy_refuses_a_limit_past_what_its_column_holds(option, largest):
    with pytest.raises(CommandError, match=f"from 0 to {largest}"):
        run("setpolicy", "--default", option, str(largest + 1))  # was a DataError traceback on PostgreSQL
    assert not ClientPolicy.objects.exists()
    run("setpolicy", "--default", option, str(largest))
    assert getattr(ClientPolicy.objects.get(client=None), option[2:].replace("-", "_")) == largest


def test_setpolicy_if_absent_sets_a_missing_policy_and_keeps_an_existing_one():
    run("setpolicy", "--default", "--if-absent", "--models", "m1", "--rpm", "600")
    assert ClientPolicy.objects.get(client=None).rpm == 600
    run("setpolicy", "--default", "--rpm", "5")
    assert "exists, unchanged" in run(
        "setpolicy", "--default", "--if-absent", "--models", "m1", "--rpm", "600"
    )
    assert ClientPolicy.objects.get(client=None).rpm == 5
    assert AuditEvent.objects.filter(kind="policy.changed").count() == 2


@pytest.mark.parametrize("kid", ["", "  "])
def test_rotatekeys_with_an_empty_kid_to_revoke_refuses_and_rotates_nothing(kid):
    with pytest.raises(CommandError, match="--revoke needs the kid"):
        run("rotatekeys", f"--revoke={kid}")  # was an ordinary rotation, exit 0
    assert not SigningKey.objects.exists()


def test_rotatekeys_revoke_and_activate_now_exclude_each_other():
    with pytest.raises(CommandError, match="not allowed with"):
        run("rotatekeys", "--activate-now", "--revoke=some-kid")
    with pytest.raises(CommandError, match="exclude each other"):
        call_command("rotatekeys", activate_now=True, revoke="some-kid", stdout=StringIO())
    assert not SigningKey.objects.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--scope", "models.read bogus"], "unknown scopes: bogus"),
        (["--scope", "models.read admin.read"], "admin scopes are only for clients marked administrative"),
        (["--name", "   "], "give the client a name"),
    ],
)
def test_createclient_refuses_what_the_console_refuses(extra, message):
    args = ["createclient", "--name", "svc", "--grant", "client-credentials", *extra]
    with pytest.raises(CommandError, match=message):
        run(*args)  # was a client registered with it
    assert not Client.objects.exists()
    assert created_clients() == 0


# ---- pruneaudit and auditreport --------------------------------------------------------------------------


def old_and_new_events() -> None:
    audit_record(kind="test.old", occurred_at=timezone.now() - timedelta(days=400))
    audit_record(kind="test.new")


@pytest.mark.parametrize("days_ago", [-1, 0, 89, -365 * 7000])
def test_pruneaudit_refuses_a_cutoff_inside_the_retention_window_unless_forced(tmp_path, days_ago):
    old_and_new_events()
    before = (timezone.now() - timedelta(days=days_ago)).isoformat()
    archive = tmp_path / "a.jsonl"
    with pytest.raises(CommandError, match="less than 90 days old.*--force"):
        run("pruneaudit", "--before", before, "--archive", str(archive))  # 9999-12-31 emptied the log
    assert not archive.exists()
    assert AuditEvent.objects.filter(kind__startswith="test.").count() == 2


def test_pruneaudit_with_force_prunes_inside_the_window(tmp_path):
    old_and_new_events()
    tomorrow = (timezone.now() + timedelta(days=1)).isoformat()
    out = run("pruneaudit", "--before", tomorrow, "--archive", str(tmp_path / "a.jsonl"), "--force")
    assert "archived and pruned 2 events" in out
    assert not AuditEvent.objects.filter(kind__startswith="test.").exists()


@pytest.mark.parametrize(
    ("before", "archive", "message"),
    [
        ("0001-01-01T00:00:00+01:00", "a.jsonl", "out of range"),  # was an OverflowError
        ("0001-01-01", "a.jsonl", "out of range"),
        ("2020-01-01", "nodir/a.jsonl", "does not exist"),  # was a FileNotFoundError
        ("2020-01-01", ".", "is a folder"),
    ],
)
def test_pruneaudit_refuses_bad_input_clearly_and_deletes_nothing(tmp_path, before, archive, message):
    old_and_new_events()
    with pytest.raises(CommandError, match=message):
        run("pruneaudit", "--before", before, "--archive", str(tmp_path / archive))
    assert AuditEvent.objects.filter(kind__startswith="test.").count() == 2
    assert not AuditEvent.objects.filter(kind="audit.pruned").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "0001-01-01"], "out of range"),  # was an OverflowError
        (["--since", "2026-11-01", "--until", "9999-12-31T23:59:59"], "out of range"),
        (["--since", "2026-11-01", "--out", "{tmp}/nodir/r.html", "--store"], "does not exist"),
        (["--since", "2026-11-01", "--out", "{tmp}", "--store"], "is a folder"),
    ],
)
def test_auditreport_refuses_bad_input_before_it_stores_anything(tmp_path, args, message):
    args = [arg.format(tmp=tmp_path) for arg in args]
    with pytest.raises(CommandError, match=message):
        run("auditreport", *args)
    assert not AuditReport.objects.exists()  # --store used to save it before the write failed
    assert not AuditEvent.objects.filter(kind="report.created").exists()


# ---- demo and fakevllm -----------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"service_client_id": 7}', "\udcff"])
def test_demo_with_a_corrupt_credentials_file_says_so_and_creates_nothing(settings, tmp_path, content):
    settings.VAR_DIR = tmp_path
    (tmp_path / "demo-credentials.json").write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(CommandError, match="demo-credentials.json .*move it away"):
        run("demo")
    assert not Client.objects.exists()


def test_demo_keeps_its_credentials_for_this_user_alone(settings, tmp_path):
    settings.VAR_DIR = tmp_path
    path = tmp_path / "demo-credentials.json"
    path.write_text("{}")
    path.chmod(0o644)  # as an older version left it
    run("demo")
    assert path.stat().st_mode & 0o777 == 0o600
    creds = json.loads(path.read_text())
    assert Client.objects.filter(client_id=creds["service_client_id"]).exists()
    run("demo")
    assert json.loads(path.read_text()) == creds  # made once, kept
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("port", ["0", "70000", "-1"])
@pytest.mark.parametrize("command", [["-m", "fakevllm"], ["manage.py", "fakevllm"]])
def test_fakevllm_refuses_a_port_outside_1_to_65535(command, port):
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.test_settings"}
    done = subprocess.run(  # a process with a timeout: unfixed, it served (70000 on 4464) until stopped
        [sys.executable, *command, "--port", port],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "is not a port" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_shared_argument_helpers_are_no_command_of_their_own():
    from django.core.management import get_commands

    assert "_arguments" not in get_commands()
