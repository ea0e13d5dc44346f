"""The embedded default's beat: with no broker, run the beat schedule's tasks in-process on a timer.

Started by the ASGI lifespan only when ``REDIS_URL`` is unset; a real deployment runs ``celery beat``.
"""

from __future__ import annotations

import logging
import threading
import time

from celery import current_app
from django.conf import settings
from django.db import close_old_connections

logger = logging.getLogger(__name__)


class EmbeddedBeat:
    """A daemon thread that runs each CELERY_BEAT_SCHEDULE entry every ``schedule`` seconds."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="embedded-beat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        current_app.loader.import_default_modules()  # autodiscover the apps' tasks.py
        next_run = {name: 0.0 for name in settings.CELERY_BEAT_SCHEDULE}
        while not self._stop.wait(1.0):
            now = time.monotonic()
            for name, entry in settings.CELERY_BEAT_SCHEDULE.items():
                if now < next_run[name]:
                    continue
                interval: float = entry["schedule"]
                next_run[name] = now + interval
                try:
                    current_app.tasks[entry["task"]].apply()
                except Exception:  # a failing task must not stop the others; it is logged with its name
                    logger.exception("embedded beat task %s failed", name)
                finally:
                    close_old_connections()
