#!/usr/bin/env python
"""Django's command-line utility for Portcullis.

``bin/manage`` runs it on the embedded default (the environment ``bin/run`` serves with). A setting that is
missing or bad stops it with one line naming the variable, not a traceback.
"""

import os
import sys

EX_CONFIG = 78  # sysexits.h: a configuration error, as docker/entrypoint.sh exits on one


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    try:
        from django.conf import settings
        from django.core.exceptions import ImproperlyConfigured
        from django.core.management import execute_from_command_line
    except ImportError:
        sys.stderr.write(
            f"manage.py: {sys.executable} cannot import Django; use bin/manage (it runs .venv)\n"
        )
        sys.exit(EX_CONFIG)
    try:
        settings.INSTALLED_APPS  # noqa: B018  (loads config/settings.py, which checks every variable)
    except ImproperlyConfigured as exc:
        sys.stderr.write(f"manage.py: {' '.join(str(exc).split())}\n")
        sys.exit(EX_CONFIG)
    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
