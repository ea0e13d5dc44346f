"""Log lines: each record written once, formatted, with the request id."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import environ_unconfigured
from tests.e2e.conftest import ROOT


def test_a_django_request_warning_is_written_once_with_its_request_id_in_development():
    env = environ_unconfigured()
    env.update(
        DJANGO_DEBUG="true", DJANGO_SETTINGS_MODULE="config.settings", DATABASE_URL="sqlite:///:memory:"
    )
    code = (
        "import django, logging; django.setup();"
        "from audit.context import request_id_var; request_id_var.set('0123456789abcdef');"
        "logging.getLogger('django.request').warning('Bad Request: %s', '/oauth/token/')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    [line] = done.stderr.splitlines()  # Django's own debug handler wrote it a second time, bare
    assert line.endswith(" WARNING django.request [0123456789abcdef] Bad Request: /oauth/token/")
