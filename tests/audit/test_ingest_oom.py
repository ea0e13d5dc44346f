"""A Redis at its maxmemory (noeviction) refuses what Celery writes, so its workers and beat stop, but the
stream can still be drained, and draining it is what frees the memory: ``manage.py ingest`` does, without the
broker."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import redis
from django.core.management import CommandError, call_command

from audit.models import UsageRecord
from audit.sink import STREAM
from tests.audit.test_ingest import entry, record

pytestmark = pytest.mark.django_db


@pytest.fixture
def full_redis(own_redis: Any, settings: Any) -> redis.Redis:
    """A Redis of the test's own (maxmemory is the whole server's) with the ingest's consumer group, as a
    first ingest run made it; the settings name it."""
    url, client, _directory = own_redis
    client.xgroup_create(STREAM, "ingest", id="0", mkstream=True)
    settings.REDIS_URL = url
    return client


def test_a_redis_at_its_maxmemory_is_drained_by_the_ingest_command(full_redis):
    records = [record() for _ in range(3)]
    for value in records:
        full_redis.xadd(STREAM, entry(value))
    full_redis.config_set("maxmemory-policy", "noeviction")
    full_redis.config_set("maxmemory", full_redis.info("memory")["used_memory"])
    with pytest.raises(redis.exceptions.OutOfMemoryError):  # what Celery's broker and lock need is refused
        full_redis.set("celery-lock", "x", nx=True, px=1000)
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


def test_the_ingest_loop_outlives_a_failed_run(settings, caplog):
    with socket.socket() as probe:  # a port nothing listens on: Redis down
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings.REDIS_URL = f"redis://127.0.0.1:{port}/0"
    call_command("ingest", runs=2)  # neither run raises out of the loop
    failed = [r for r in caplog.records if r.getMessage().startswith("ingest run failed (ConnectionError)")]
    assert len(failed) == 2
