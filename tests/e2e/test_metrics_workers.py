"""/metrics under several uvicorn workers counts every request, whichever worker answers the scrape."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.e2e.conftest import start_fakevllm, start_server, stop

pytestmark = [pytest.mark.e2e, pytest.mark.django_db]

UNAUTHORISED_MODELS = re.compile(
    r'^portcullis_gateway_requests_total\{model="",route="models",status_class="4xx"\} (\S+)$', re.M
)


def test_two_workers_report_the_sum_of_what_both_counted(tmp_path):
    fake = start_fakevllm(tmp_path, "m1")
    shared = tmp_path / "prometheus"
    shared.mkdir()
    server = start_server(
        tmp_path, VLLM_UPSTREAMS=fake.base, UVICORN_WORKERS="2", PROMETHEUS_MULTIPROC_DIR=str(shared)
    )
    try:
        for _ in range(40):  # a new connection each: the kernel spreads them over both workers
            assert httpx.get(f"{server.base}/v1/models", timeout=10).status_code == 401
        writers = {p.name.rsplit("_", 1)[-1] for p in shared.glob("counter_*.db")}
        assert len(writers) >= 2, sorted(p.name for p in shared.iterdir())  # both workers counted some
        for _ in range(6):  # whichever worker answers, the figure is the sum
            text = httpx.get(f"{server.base}/metrics", timeout=10).text
            found = UNAUTHORISED_MODELS.search(text)
            assert found is not None, text[-2000:]
            assert float(found.group(1)) == 40
    finally:
        stop(server.process)
        stop(fake.process)
