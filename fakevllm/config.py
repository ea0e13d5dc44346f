"""FakeConfig, the behaviour of the fake server, and the model limits it shares with its vLLM defaults.

Every field can be set on the command line (`fakevllm.cli`) and changed at runtime through
POST /_fake/config (`fakevllm.controls`); __post_init__ validates both the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_MODEL_LEN = 4096  # the context window every served model reports in /v1/models and enforces
VERSION = "0.0.0+fakevllm"  # what GET /version answers, and the version in the system_fingerprint


@dataclass
class FakeConfig:
    """Behaviour of the fake server; every field can also be changed at runtime via POST /_fake/config."""

    models: list[str] = field(default_factory=lambda: ["fake-model"])
    api_key: str | None = field(default=None, repr=False)  # a secret: kept out of reprs, so out of logs
    tokens: int = 16
    chunk_delay_s: float = 0.0
    first_chunk_delay_s: float = 0.0
    fail_after_chunks: int | None = None
    embedding_dim: int = 8
    # the served models whose config says is_matryoshka: only they honour an embeddings request's
    # `dimensions`, which vLLM refuses for any other model (most embedding models: see fakevllm.embeddings)
    matryoshka_models: list[str] = field(default_factory=list)
    refuse: bool = False
    # vLLM ends a stream that fails half-way with an error event and then `data: [DONE]` (the except clauses
    # of chat_completion_stream_generator and completion_stream_generator: see fakevllm.render)
    fail_sends_done: bool = True
    engine_dead: bool = False  # /health and /ping answer 503, inference 500: see fakevllm.app
    enable_request_id_headers: bool = False  # vLLM's --enable-request-id-headers: see fakevllm.request_ids

    def __post_init__(self) -> None:
        """Validate the fields (raising ValueError) and normalise numbers."""
        if not isinstance(self.models, list) or not self.models:
            raise ValueError("models must be a non-empty list of model names")
        if not all(isinstance(m, str) and m for m in self.models):
            raise ValueError("models must be non-empty strings")
        self.models = list(dict.fromkeys(self.models))
        if not isinstance(self.matryoshka_models, list) or not all(
            isinstance(m, str) for m in self.matryoshka_models
        ):
            raise ValueError("matryoshka_models must be a list of model names")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError("api_key must be a non-empty string or null")
        self.tokens = checked_int("tokens", self.tokens, 0, MAX_MODEL_LEN)
        self.embedding_dim = checked_int("embedding_dim", self.embedding_dim, 1, 65536)
        if self.fail_after_chunks is not None:
            self.fail_after_chunks = checked_int("fail_after_chunks", self.fail_after_chunks, 0, 10**9)
        for name in ("chunk_delay_s", "first_chunk_delay_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 3600:
                raise ValueError(f"{name} must be a number of seconds between 0 and 3600")
            setattr(self, name, float(value))
        for name in ("refuse", "fail_sends_done", "engine_dead", "enable_request_id_headers"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a boolean")


def checked_int(name: str, value: object, minimum: int, maximum: int) -> int:
    """Return value if it is an int (not a bool) within [minimum, maximum], else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ValueError(f"{name} must be an integer between {minimum} and {maximum}")
    return value
