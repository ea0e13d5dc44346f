"""A Redis at its maxmemory (noeviction) refuses what Celery writes, so its workers and beat stop, but the
stream can still be drained, and draining it is what frees the memory: ``manage.py ingest`` does, without the
broker."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.core.management import CommandError, call_command

from audit.models import UsageRecord
from audit.sink import STREAM
from tests.audit.test_ingest import entry, record

pytestmark = pytest.mark.django_db


@pytest.fixture
def full_redis(tmp_path: Any) -> Iterator[redis.Redis]:
    """A Redis of its own (maxmemory is the whole server's), holding three records in the stream and its
    consumer group, then set at its maxmemory."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.xgroup_create(STREAM, "ingest", id="0", mkstream=True)  # as a first ingest run made it
        yield client
    finally:
        process.terminate()
        process.wait(10)


def test_a_redis_at_its_maxmemory_is_drained_by_the_ingest_command(full_redis, settings):
    records = [record() for _ in range(3)]
    for value in records:
        full_redis.xadd(STREAM, entry(value))
    full_redis.config_set("maxmemory-policy", "noeviction")
    full_redis.config_set("maxmemory", full_redis.info("memory")["used_memory"])
    with pytest.raises(redis.exceptions.OutOfMemoryError):  # what Celery's broker and lock need is refused
        full_redis.set("celery-lock", "x", nx=True, px=1000)
    settings.REDIS_URL = f"redis://127.0.0.1:{full_redis.connection_pool.connection_kwargs['port']}/0"
    call_command("ingest", runs=1)
    stored = set(UsageRecord.objects.values_list("record_id", flat=True))
    assert {r.hex for r in stored if r is not None} == {value["record_id"] for value in records}
    assert full_redis.xlen(STREAM) == 0  # acknowledged and deleted: the memory is free again


@pytest.mark.parametrize(
    ("redis_url", "runs", "says"),
    [("", 1, "REDIS_URL is not set"), ("redis://127.0.0.1:1/0", -1, "--runs must be 0 or more")],
)
def test_the_ingest_command_refuses_what_it_cannot_run(settings, redis_url, runs, says):
    settings.REDIS_URL = redis_url
    with pytest.raises(CommandError, match=says):
        call_command("ingest", runs=runs)
