"""The gauges /metrics computes at scrape time: the audit stream's backlog."""

from __future__ import annotations

import math

import pytest
from django.test import Client

from audit.sink import STREAM, usage_entry

pytestmark = pytest.mark.django_db


def backlog_series(body: str) -> float:
    lines = [line for line in body.splitlines() if line.startswith("portcullis_audit_stream_backlog ")]
    assert len(lines) == 1, body
    return float(lines[0].split()[1])


def test_the_audit_streams_backlog_is_what_the_ingest_has_not_stored(redis_client):
    for n in range(3):
        redis_client.xadd(STREAM, usage_entry({"record_id": str(n)}))
    response = Client().get("/metrics")
    assert response.status_code == 200
    assert backlog_series(response.content.decode()) == 3


def test_a_redis_that_does_not_answer_leaves_the_backlog_unknown_not_the_scrape_broken(settings):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    response = Client().get("/metrics")
    assert response.status_code == 200
    assert math.isnan(backlog_series(response.content.decode()))


def test_without_redis_there_is_no_stream_to_wait_in(settings):
    settings.REDIS_URL = ""
    assert backlog_series(Client().get("/metrics").content.decode()) == 0


def test_a_scrape_is_a_get_or_a_head_and_any_other_method_a_405(settings):
    settings.REDIS_URL = ""
    assert Client().head("/metrics").status_code == 200
    refused = Client().post("/metrics")
    assert refused.status_code == 405
    assert refused["Allow"] == "GET, HEAD"
