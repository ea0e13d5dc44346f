"""`manage.py fakevllm`: serve the fake vLLM OpenAI-compatible API with uvicorn (httptools + uvloop).

A thin wrapper around `fakevllm.server`: it parses the options (shared with `python -m fakevllm`), builds
the ASGI app and runs it until interrupted. It skips Django's system checks and never touches the database,
so it starts quickly in development, demos, tests and benchmarks.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from fakevllm import server


class Command(BaseCommand):
    """Run the fake vLLM server."""

    help = "Run fakevllm, a stand-in for vLLM's OpenAI-compatible server (no GPU, deterministic output)."
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        """Declare the fakevllm options."""
        server.add_arguments(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        """Build the app from the options and serve it."""
        try:
            config = server.config_from_options(options)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        host, port = options["host"], options["port"]
        self.stdout.write(server.serving_line(config, host, port))
        server.serve(config, host, port)
