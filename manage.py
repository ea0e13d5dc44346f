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
        from django.core.management.base import CommandError, CommandParser, handle_default_options
    except ImportError:
        sys.stderr.write(
            f"manage.py: {sys.executable} cannot import Django; use bin/manage (it runs .venv)\n"
        )
        sys.exit(EX_CONFIG)
    # --settings and --pythonpath choose the settings to check, so they apply first, as Django's own
    # ManagementUtility.execute() applies them: after the subcommand, a malformed one left to the command.
    parser = CommandParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--settings")
    parser.add_argument("--pythonpath")
    try:
        handle_default_options(parser.parse_known_args(sys.argv[2:])[0])
    except CommandError:
        pass
    try:
        settings.INSTALLED_APPS  # noqa: B018  (loads the settings module, which checks every variable)
    except ImproperlyConfigured as exc:
        sys.stderr.write(f"manage.py: {' '.join(str(exc).split())}\n")
        sys.exit(EX_CONFIG)
    except ImportError as exc:  # a mistyped --settings or DJANGO_SETTINGS_MODULE
        module = os.environ.get("DJANGO_SETTINGS_MODULE")
        sys.stderr.write(f"manage.py: cannot import the settings module {module!r}: {exc}\n")
        sys.exit(EX_CONFIG)
    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
