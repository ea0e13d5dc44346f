"""The errors the fake server answers, in the ErrorResponse shape of vLLM's OpenAI-compatible server."""

from __future__ import annotations

import re
from typing import Any

from fakevllm.asgi import encode


class ApiError(Exception):
    """An error answered with vLLM's ErrorResponse body."""

    def __init__(self, status: int, message: str, err_type: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param

    def body(self) -> bytes:
        """Return the JSON body vLLM sends for this error."""
        error = {"message": self.message, "type": self.err_type, "param": self.param, "code": self.status}
        return encode({"error": error}).encode()


def validation_error(message: str, param: str | None = None) -> ApiError:
    """Return the 400 vLLM answers when FastAPI/pydantic rejects a request body."""
    return ApiError(400, message, "Bad Request", param)


# vLLM's validation_exception_handler (vllm/entrypoints/serve/exception_handling/handlers/validation.py)
MAX_REPORTED_ERRORS = 10
MAX_ERROR_INPUT_CHARS = 200
MAX_ERROR_CHARS = 1000
_PATHS = (
    re.compile(r"/(?:home|usr|opt|var|tmp|root|lib|mnt|srv)(?:/[\w.\-]+)+"),
    re.compile(r"(?:/[\w\-]+)+/[\w\-]+\.\w+"),
)


def pydantic_errors(errors: list[dict[str, Any]]) -> ApiError:
    """Return the 400 vLLM 0.33 renders for pydantic's errors in a request body, each a dict of pydantic's
    keys (type, loc, msg, input, ctx) with loc already dotted (`body.stop.0`): "N validation error(s):" and
    one line per error (ten at most), its input summarised; the param is the first error's loc."""
    count = len(errors)
    label = "error" if count == 1 else "errors"
    lines = [f"{count} validation {label}:\n"]
    for error in errors[:MAX_REPORTED_ERRORS]:
        shown = {**error, "input": _summarized_input(error["input"])}
        lines.append(f"  {_cut(str(shown), MAX_ERROR_CHARS)}\n")
    if count > MAX_REPORTED_ERRORS:
        lines.append(f"  ...and {count - MAX_REPORTED_ERRORS} more {label}\n")
    message = "".join(lines).rstrip()
    for path in _PATHS:  # sanitize_message: no file paths in an error
        message = path.sub("<path>", message)
    return ApiError(400, message, "Bad Request", errors[0]["loc"])


def _summarized_input(value: Any) -> Any:
    """Return vLLM's size-bounded stand-in for an error's input: containers described, text cut at 200."""
    if isinstance(value, list | tuple | dict):
        return f"<{type(value).__name__} of {len(value)} items>"
    return _cut(value if isinstance(value, str) else str(value), MAX_ERROR_INPUT_CHARS)


def _cut(text: str, limit: int) -> str:
    """Return text, cut at limit characters with vLLM's mark."""
    return text[:limit] + "...[truncated]" if len(text) > limit else text


def bad_request(message: str, param: str | None = None) -> ApiError:
    """Return the 400 vLLM's serving layer answers for a semantically invalid request."""
    return ApiError(400, message, "BadRequestError", param)


NOT_FOUND = ApiError(404, "Not Found", "Not Found")
METHOD_NOT_ALLOWED = ApiError(405, "Method Not Allowed", "Method Not Allowed")

# A request to a dead engine: vLLM's serving layer raises the engine's EngineDeadError (whose message this is,
# vllm/v1/engine/exceptions.py) once the request has passed validation and the model check, and
# OpenAIServing.create_error_response maps any exception other than a bad request to this 500.
ENGINE_DEAD = ApiError(
    500,
    "EngineCore encountered an issue. See stack trace (above) for the root cause.",
    "InternalServerError",
)
