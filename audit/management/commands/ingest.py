"""``ingest``: move what the gateways hand off (the Redis stream) into the database, in a loop of its own.

Celery's beat queues the ingest every second and its workers run it, through the broker, in the same Redis.
A Redis at its ``maxmemory`` (with ``noeviction``, which the audit stream needs) refuses what Celery writes
to run at all: beat's queued task, and the lock a worker takes as it starts (kombu's ``restore_visible``),
so a worker exits, and one restarted exits again. Draining the stream is what frees that memory, and
the ingest's own commands need none to run. This loop reads the stream without the broker, so a deployment
that runs it keeps draining whatever Celery does; it can run beside the workers (the consumer group gives
each reader its own entries).
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Any

import redis
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError, close_old_connections

from audit.ingest import stream_ingest
from audit.redisconn import redis_sync

logger = logging.getLogger(__name__)

RETRY_S = 1.0  # after a failed run (Redis or the database unreachable), the next one this much later


class Command(BaseCommand):
    help = "Ingest the gateways' usage records and audit events from Redis in a loop (no Celery needed)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--runs", type=int, default=0, help="stop after this many runs (0: run until stopped)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.REDIS_URL:
            raise CommandError("REDIS_URL is not set: the embedded default ingests in process")
        runs: int = options["runs"]
        if runs < 0:
            raise CommandError("--runs must be 0 or more")
        stopping = False

        def stop(_signum: int, _frame: Any) -> None:
            nonlocal stopping
            stopping = True  # the run under way ends (at most a second), then the loop

        previous = signal.signal(signal.SIGTERM, stop)
        client = redis_sync(settings.REDIS_URL)
        done = 0
        try:
            while not stopping and (runs == 0 or done < runs):
                done += 1
                try:
                    stream_ingest(client)  # until caught up or a second has passed; waits 0.2 s for entries
                except (redis.RedisError, DatabaseError) as exc:
                    logger.warning("ingest run failed (%s); next in %.0f s", type(exc).__name__, RETRY_S)
                    # as Celery's Django fixup does around each task: a connection PostgreSQL closed (a
                    # restart, a failover) is put away, rather than failing every later run
                    close_old_connections()
                    time.sleep(RETRY_S)
        finally:
            signal.signal(signal.SIGTERM, previous)  # called in a process of its own or not (a test)
