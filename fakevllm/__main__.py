"""Run the fake vLLM server without Django: `python -m fakevllm --port 8001 --models a,b`."""

from __future__ import annotations

from fakevllm.server import main

main()
