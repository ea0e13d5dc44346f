"""The lock tried, not waited for, where it is the process's own (SQLite, the embedded default): taken by one
block at a time, and given back however the block ends. (PostgreSQL's, between sessions, is tested where the
console uses it: tests/console/test_pages.py.)"""

from __future__ import annotations

import pytest
from django.db import connection

from audit.locks import advisory_lock_tried

LOCK = 0x74657374  # "test"


def _fails_holding_it() -> None:
    with advisory_lock_tried(LOCK) as taken:
        assert taken
        raise RuntimeError("the block failed")


@pytest.mark.django_db
def test_a_tried_lock_is_held_by_one_block_at_a_time_and_given_back_even_on_an_error(monkeypatch):
    monkeypatch.setattr(connection, "vendor", "sqlite")
    with advisory_lock_tried(LOCK) as first, advisory_lock_tried(LOCK) as second:
        assert (first, second) == (True, False)
    with pytest.raises(RuntimeError, match="the block failed"):
        _fails_holding_it()
    with advisory_lock_tried(LOCK) as after:
        assert after
