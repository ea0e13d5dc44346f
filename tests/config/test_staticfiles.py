"""Static files under ASGI: WhiteNoise's answers read off the event loop, without Django's warning."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

from config.staticfiles import blocks_read_in_thread
from tests.conftest import django_asgi_get
from tests.e2e.conftest import ROOT

CSS = "/static/portcullis/site.css"


def test_a_static_file_is_served_under_asgi_from_an_async_stream():
    start, *bodies = django_asgi_get(CSS)  # a synchronous body was a warning: an error in this suite
    assert start["status"] == 200
    served = b"".join(m.get("body", b"") for m in bodies)
    assert served == (ROOT / "authserver/static/portcullis/site.css").read_bytes()


def test_a_revalidated_static_file_is_a_304_without_a_body_or_a_warning():
    start, *_body = django_asgi_get(CSS)
    etag = {name.lower(): value for name, value in start["headers"]}[b"etag"]
    again, *bodies = django_asgi_get(CSS, headers=[(b"if-none-match", etag)])
    assert again["status"] == 304  # what a browser's revalidation gets: an empty synchronous body before
    assert b"".join(m.get("body", b"") for m in bodies) == b""


def test_the_blocks_are_read_in_a_worker_thread_not_on_the_event_loop():
    readers: list[int] = []

    def blocks() -> Iterator[bytes]:
        for block in (b"one", b"two"):
            readers.append(threading.get_ident())
            yield block

    async def collect() -> tuple[list[bytes], int]:
        return [block async for block in blocks_read_in_thread(blocks())], threading.get_ident()

    received, loop_thread = asyncio.run(collect())
    assert received == [b"one", b"two"]
    assert len(readers) == 2
    assert loop_thread not in readers
