"""The ASGI lifespan: start-up ends by freezing what it loaded, so full collections do not stall requests."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

from config import asgi
from tests.e2e.conftest import ROOT


def test_startup_freezes_the_loaded_objects_before_it_reports_ready(monkeypatch, settings):
    settings.REDIS_URL = "redis://127.0.0.1:6379/0"  # no embedded beat
    order: list[str] = []

    async def started() -> None:
        order.append("runtime")

    monkeypatch.setattr(asgi, "runtime_get", started)
    monkeypatch.setattr(asgi, "runtime_stop", started)
    monkeypatch.setattr(asgi, "gc_freeze_startup", lambda: order.append("freeze"))
    inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

    async def receive() -> dict[str, Any]:
        return inbox.pop(0)

    async def send(message: dict[str, Any]) -> None:
        order.append(message["type"])

    asyncio.run(asgi.lifespan({"type": "lifespan"}, receive, send))
    assert order == [
        "runtime",
        "freeze",
        "lifespan.startup.complete",
        "runtime",
        "lifespan.shutdown.complete",
    ]


def test_freezing_moves_the_startup_objects_out_of_the_collectors_generations():
    script = (
        "import gc, os; os.environ.setdefault('DJANGO_DEBUG', 'true');"
        "import config.asgi as m; assert gc.get_freeze_count() == 0; m.gc_freeze_startup();"
        "print(gc.get_freeze_count(), sum(gc.get_count()), *gc.get_threshold())"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, timeout=60, check=True
    )
    frozen, left, *thresholds = (int(v) for v in done.stdout.split())
    assert frozen > 50_000  # Django and the apps: what a full collection no longer walks
    assert left < 1_000
    assert thresholds == [asgi.GC_YOUNG_EVERY, 10, asgi.GC_FULL_EVERY]  # the middle one keeps the default
