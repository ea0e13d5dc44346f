"""The command line shared by `python -m fakevllm` and `manage.py fakevllm`, and serving with uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping
from typing import Any

from fakevllm.app import create_app
from fakevllm.config import FakeConfig

logger = logging.getLogger(__name__)


def _port(value: str) -> int:
    """A TCP port, 1-65535: uvicorn would bind 70000 modulo 65536 (4464), without a word."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port: give one from 1 to 65535")
    return port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the command-line options shared by `manage.py fakevllm` and `python -m fakevllm`."""
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8001, help="port to bind, 1-65535 (default 8001)")
    parser.add_argument("--models", default="fake-model", help="comma-separated served model names")
    parser.add_argument(
        "--api-key",
        default=None,
        help="require `Authorization: Bearer KEY` on /v1/* (default: $VLLM_API_KEY, as vLLM reads it)",
    )
    parser.add_argument("--tokens", type=int, default=16, help="tokens generated per choice (default 16)")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="delay between streamed tokens")
    parser.add_argument(
        "--first-chunk-delay-ms",
        type=float,
        default=0.0,
        help="delay before the first token (time to response when not streaming)",
    )
    parser.add_argument(
        "--fail-after-chunks",
        type=int,
        default=None,
        help="end streams with an error frame after this many token chunks",
    )
    parser.add_argument(
        "--fail-without-done",
        dest="fail_sends_done",
        action="store_false",
        help="end the injected error without the data: [DONE] that vLLM sends after it",
    )
    parser.add_argument("--embedding-dim", type=int, default=8, help="embedding vector size (default 8)")
    parser.add_argument(
        "--matryoshka-models",
        default="",
        help="comma-separated served models that honour an embeddings `dimensions` (others refuse it)",
    )
    parser.add_argument("--refuse", action="store_true", help="start in refuse mode (close every connection)")
    parser.add_argument(
        "--engine-dead",
        action="store_true",
        help="start with a dead engine, as vLLM after an engine failure: /health 503, inference 500",
    )
    parser.add_argument(
        "--enable-request-id-headers",
        action="store_true",
        help="answer with an X-Request-Id header, as vLLM's option of the same name does",
    )


def config_from_options(options: Mapping[str, Any]) -> FakeConfig:
    """Build a FakeConfig from parsed command-line options (raises ValueError when invalid)."""
    return FakeConfig(
        models=_names(options["models"]),
        # as vLLM: the option, else the environment variable (a key on the command line is any user's to read)
        api_key=options.get("api_key") or os.environ.get("VLLM_API_KEY") or None,
        tokens=options["tokens"],
        chunk_delay_s=options["chunk_delay_ms"] / 1000.0,
        first_chunk_delay_s=options["first_chunk_delay_ms"] / 1000.0,
        fail_after_chunks=options.get("fail_after_chunks"),
        embedding_dim=options["embedding_dim"],
        matryoshka_models=_names(options.get("matryoshka_models")),
        refuse=bool(options.get("refuse")),
        fail_sends_done=bool(options.get("fail_sends_done", True)),
        engine_dead=bool(options.get("engine_dead")),
        enable_request_id_headers=bool(options.get("enable_request_id_headers")),
    )


def _names(option: object) -> list[str]:
    """Split a comma-separated option into names, dropping blanks."""
    return [name.strip() for name in str(option or "").split(",") if name.strip()]


def serving_line(config: FakeConfig, host: str, port: int) -> str:
    """Return the line that announces the server: its models and address, and whether /v1 needs a key (never
    the key itself, which must stay out of logs)."""
    guard = "an API key is required on /v1" if config.api_key is not None else "no API key"
    return f"fakevllm: serving {', '.join(config.models)} on http://{host}:{port} ({guard})"


def serve(config: FakeConfig, host: str, port: int) -> None:
    """Run the app with uvicorn (httptools + uvloop, quiet) until interrupted."""
    import uvicorn

    logger.info("%s", serving_line(config, host, port))
    uvicorn.run(
        create_app(config),
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        ws="none",
        log_level="warning",
        access_log=False,
        workers=1,  # an app object cannot be forked; also ignores a WEB_CONCURRENCY in the environment
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m fakevllm`."""
    parser = argparse.ArgumentParser(prog="fakevllm", description="Fake vLLM OpenAI-compatible server.")
    add_arguments(parser)
    options = vars(parser.parse_args(argv))
    try:
        config = config_from_options(options)
    except ValueError as exc:
        parser.error(str(exc))
    serve(config, options["host"], options["port"])
