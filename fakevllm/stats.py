"""What the fake server counts and remembers, for /metrics and GET /_fake/state."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fakevllm.generation import Generation

HISTORY = 50  # requests whose headers and bodies /_fake/state shows
MAX_TRACKED_PATHS = 1000  # distinct paths counted one by one; the rest are "(other)"


class Stats:
    """Counters and recent-request history exposed by /metrics and /_fake/state."""

    def __init__(self) -> None:
        self.running = 0
        self.model_running: dict[str, int] = {}
        self.reset()

    def reset(self) -> None:
        """Clear every counter and the history (requests in flight stay counted as running)."""
        self.total = 0
        self.by_path: dict[str, int] = {}
        self.aborted = 0
        self.finished = 0
        self.refused = 0
        self.headers: deque[list[tuple[bytes, bytes]]] = deque(maxlen=HISTORY)
        self.bodies: deque[Any] = deque(maxlen=HISTORY)
        self.prompt_tokens: dict[str, int] = {}
        self.generation_tokens: dict[str, int] = {}
        self.successes: dict[tuple[str, str], int] = {}

    def record(self, path: str, headers: list[tuple[bytes, bytes]]) -> None:
        """Count one received request and remember its headers."""
        self.total += 1
        by_path = self.by_path
        if path in by_path:
            by_path[path] += 1
        elif len(by_path) < MAX_TRACKED_PATHS:
            by_path[path] = 1
        else:
            by_path["(other)"] = by_path.get("(other)", 0) + 1
        self.headers.append(headers)

    def record_success(self, gen: Generation) -> None:
        """Add a finished generation to the vLLM-style token and success counters."""
        model = gen.model
        self.prompt_tokens[model] = self.prompt_tokens.get(model, 0) + gen.prompt_tokens
        self.generation_tokens[model] = self.generation_tokens.get(model, 0) + gen.completion_tokens
        key = (model, gen.finish)
        self.successes[key] = self.successes.get(key, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """Return the JSON-ready state served by GET /_fake/state."""
        return {
            "requests_total": self.total,
            "requests_by_path": dict(self.by_path),
            "running": self.running,
            "aborted": self.aborted,
            "finished": self.finished,
            "refused": self.refused,
            "last_headers": [headers_dict(h) for h in self.headers],
            "last_bodies": list(self.bodies),
        }


def headers_dict(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """Turn ASGI headers into a dict with lowercase names, joining repeated headers with ", "."""
    result: dict[str, str] = {}
    for raw_name, raw_value in headers:
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        result[name] = f"{result[name]}, {value}" if name in result else value
    return result
