"""The Celery app: configured from Django settings (``CELERY_*``), tasks found in each app's tasks.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

PROJECT_DIR = str(Path(__file__).resolve().parent.parent)

_path_before = list(sys.path)
app = Celery("portcullis")
# Celery's Django fixup puts the current directory first on sys.path, for a worker started in the project.
# This module is imported by every process (config/__init__.py), so a command run from elsewhere would
# import that directory's audit.py (or dj_database_url.py) in place of the project's. The project's own
# directory takes that place: project modules always come from the project, wherever it is run from.
_added = len(sys.path) - len(_path_before)
if _added > 0 and sys.path[_added:] == _path_before:
    sys.path[:_added] = [PROJECT_DIR]
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
