"""The fake vLLM server's public entry point, kept where callers import it from.

`python -m fakevllm`, `manage.py fakevllm`, the benchmark and the tests import these names from here; the
code lives in the package's modules: the app and its endpoints in `fakevllm.app`, the configuration in
`fakevllm.config`, the command line and uvicorn in `fakevllm.cli` (see the package's __init__).
"""

from __future__ import annotations

from fakevllm.app import FakeVLLM, create_app
from fakevllm.cli import add_arguments, config_from_options, main, serve, serving_line
from fakevllm.config import FakeConfig

__all__ = [
    "FakeConfig",
    "FakeVLLM",
    "add_arguments",
    "config_from_options",
    "create_app",
    "main",
    "serve",
    "serving_line",
]

if __name__ == "__main__":
    main()
