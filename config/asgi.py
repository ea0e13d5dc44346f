"""The one ASGI application: Channels' ProtocolTypeRouter in front of Django.

``lifespan`` starts and stops per-process resources (the embedded beat when there is no broker).
"""

from __future__ import annotations

import os
from typing import Any

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter  # noqa: E402  (after Django is set up)
from django.conf import settings  # noqa: E402

from config.embedded import EmbeddedBeat  # noqa: E402


async def lifespan(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Handle ASGI lifespan startup and shutdown."""
    beat: EmbeddedBeat | None = None
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            if not settings.REDIS_URL and os.environ.get("PORTCULLIS_EMBEDDED_BEAT", "1") == "1":
                beat = EmbeddedBeat()
                beat.start()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if beat is not None:
                beat.stop()
            await send({"type": "lifespan.shutdown.complete"})
            return


application = ProtocolTypeRouter({"http": django_asgi_app, "lifespan": lifespan})
