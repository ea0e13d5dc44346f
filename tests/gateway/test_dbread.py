"""The gateway's off-loop database reads: a broken connection is dropped, and each read gives its own back."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connection

from gateway.dbread import fresh
from gateway.models import ClientPolicy


@pytest.mark.django_db(transaction=True)
def test_a_read_gives_its_connection_back_and_survives_one_a_database_restart_broke():
    def in_a_pool_thread() -> tuple[bool, int]:
        fresh(ClientPolicy.objects.count)
        given_back = connection.connection is None  # at the end of the read, as at a request's end
        connection.ensure_connection()
        connection.connection.close()  # what a PostgreSQL restart leaves behind in a thread
        return given_back, fresh(ClientPolicy.objects.count)

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(in_a_pool_thread).result() == (True, 0)
