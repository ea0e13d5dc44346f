"""What the harness hands the processes it starts."""

from __future__ import annotations

import pytest

from bench.stack import Stack, StackOptions


@pytest.mark.parametrize(("wait", "sent"), [(None, None), (0, "0"), (1500, "1500")])
def test_the_gateways_redis_reply_wait_is_the_products_unless_the_run_sets_it(tmp_path, wait, sent):
    stack = Stack(StackOptions(log_dir=tmp_path, redis_reply_wait_us=wait))
    stack.ports = {"fast": 8101, "paced": 8102, "gateway": 8103, "bare": 8104}  # as start() picks them
    env = stack._env()
    assert env.get("PORTCULLIS_REDIS_REPLY_WAIT_US") == sent
