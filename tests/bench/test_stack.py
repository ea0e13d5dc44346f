"""What the harness hands the processes it starts."""

from __future__ import annotations

import pytest

from bench.stack import Stack, StackOptions


@pytest.mark.parametrize(("wait", "sent"), [(None, None), (0, "0"), (1500, "1500")])
def test_the_gateways_redis_reply_wait_is_the_products_unless_the_run_sets_it(tmp_path, wait, sent):
    stack = Stack(StackOptions(log_dir=tmp_path, redis_reply_wait_us=wait))
    stack.ports = {"fast": 8101, "paced": 8102, "gateway": 8103, "bare": 8104, "redis": 8105}  # as start()
    env = stack._env()
    assert env.get("PORTCULLIS_REDIS_REPLY_WAIT_US") == sent


@pytest.mark.parametrize(
    ("given", "sent"),
    [(None, "redis://127.0.0.1:8105/14"), ("redis://10.0.0.5:6380", "redis://10.0.0.5:6380/14")],
)
def test_the_processes_use_the_harnesss_own_redis_unless_the_run_names_one(tmp_path, given, sent):
    stack = Stack(StackOptions(log_dir=tmp_path, redis_url=given))
    stack.ports = {"fast": 8101, "paced": 8102, "gateway": 8103, "bare": 8104}
    if given is None:
        stack.ports["redis"] = 8105  # start() picks a port for its own Redis only
    assert stack._env()["REDIS_URL"] == sent


def test_the_machine_note_says_where_redis_ran():
    from bench.report import machine_info

    assert "the harness's Redis and load generator to core 0" in machine_info([0, 1])["note"]
    external = machine_info([0, 1], own_redis=False)["note"]
    assert "PostgreSQL and the Redis of --redis-url unpinned" in external
