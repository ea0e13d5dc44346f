"""The errors the fake server answers, in the ErrorResponse shape of vLLM's OpenAI-compatible server."""

from __future__ import annotations

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
