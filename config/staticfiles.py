"""Static files under ASGI: WhiteNoise's answers, read from disk in a worker thread a block at a time.

WhiteNoise (6.x) is WSGI-era middleware: its ``FileResponse`` streams a synchronous file iterator. Django's
ASGI handler can take such a body only by reading all of it into a list in a thread first, and it warns on
every one ("StreamingHttpResponse must consume synchronous iterators"). Here, under ASGI, the same body is
read in a worker thread a block at a time and each block sent as it comes: the event loop never waits on
the disk, and no file is held whole. WSGI requests (the token endpoints' pool) keep WhiteNoise's own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest
from whitenoise.middleware import WhiteNoiseMiddleware

BLOCK_SIZE = 64 * 1024  # a thread hop per block: most of the console's files are one block


async def blocks_read_in_thread(blocks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """Yield a synchronous iterator's blocks, each read in a worker thread."""
    while (block := await asyncio.to_thread(next, blocks, None)) is not None:
        yield block


class AsgiWhiteNoiseMiddleware(WhiteNoiseMiddleware):
    """WhiteNoise, whose file bodies are asynchronous iterators under ASGI."""

    @staticmethod
    def serve(static_file: Any, request: HttpRequest) -> Any:
        response = WhiteNoiseMiddleware.serve(static_file, request)
        if isinstance(request, ASGIRequest):
            response.block_size = BLOCK_SIZE  # read lazily: WhiteNoise has not read a block yet
            response.streaming_content = blocks_read_in_thread(iter(response.streaming_content))
        return response
