"""POST /v1/embeddings: deterministic unit vectors, in vLLM's EmbeddingResponse (floats or base64)."""

from __future__ import annotations

import base64
import functools
import math
import struct
import time
import zlib
from collections.abc import Collection, Mapping
from typing import Any

from fakevllm.asgi import encode
from fakevllm.config import MAX_MODEL_LEN
from fakevllm.errors import bad_request, validation_error
from fakevllm.request_ids import base_request_id
from fakevllm.validation import check_cache_salt, input_tokens, optional_int, resolve_model, split_inputs


def embedding_body(
    req: Mapping[str, Any],
    served: Mapping[str, str],
    dim: int,
    request_id_header: str | None = None,
    matryoshka_models: Collection[str] = (),
) -> bytes:
    """Validate an embeddings request and return vLLM's EmbeddingResponse body.

    Its id is `embd-` and the X-Request-Id header, else a random id: vLLM's pooling servers pass no body
    field to `_base_request_id` (fakevllm.request_ids). `dimensions` is honoured only for the models in
    matryoshka_models (see `_output_dim`).
    """
    check_cache_salt(req)  # vLLM 0.16 and later take a cache_salt on pooling requests too
    inputs = split_inputs(req.get("input"), "input")
    model = resolve_model(req, served)
    encoding_format = req.get("encoding_format") or "float"
    if encoding_format not in ("float", "base64"):
        raise validation_error("encoding_format: Input should be 'float' or 'base64'", "encoding_format")
    dimensions = optional_int(req, "dimensions", -(2**63))  # the range check is the pooling params' own
    size = dim if dimensions is None else _output_dim(model, dimensions, dim, model in matryoshka_models)
    prompt = sum(_input_tokens_within_context(item) for item in inputs)
    data = [
        {"index": i, "object": "embedding", "embedding": _encoded(_vector(item, dim, size), encoding_format)}
        for i, item in enumerate(inputs)
    ]
    usage = {
        "prompt_tokens": prompt,
        "total_tokens": prompt,
        "completion_tokens": 0,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }
    response = {
        "id": f"embd-{base_request_id(request_id_header)}",
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": data,
        "usage": usage,
    }
    return encode(response).encode()


def _output_dim(model: str, dimensions: int, dim: int, matryoshka: bool) -> int:
    """Return the vector size a request's `dimensions` asks for, or raise vLLM's 400.

    vLLM's `PoolingParams.verify` (vllm/pooling_params.py) refuses `dimensions` unless the model config says
    `is_matryoshka` (most embedding models do not, e.g. BAAI/bge-m3), as a ValueError that the serving layer
    answers as a BadRequestError without a param; a matryoshka model's pooler keeps the first `dimensions`
    values (all of them when it asks for more) and normalises them again.
    """
    if not matryoshka:
        raise bad_request(
            f'Model "{model}" does not support matryoshka representation, changing output dimensions '
            "will lead to poor results."
        )
    if dimensions < 1:
        raise bad_request("Dimensions must be greater than 0")
    return min(dimensions, dim)


def _input_tokens_within_context(item: str | list[int]) -> int:
    """Estimate the tokens of one embedding input, rejecting inputs longer than the context like vLLM."""
    count = input_tokens(item)
    if count > MAX_MODEL_LEN:
        raise bad_request(
            f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you requested "
            f"{count} tokens in the input for embedding generation. Please reduce the length of the input.",
            "input_tokens",
        )
    return count


def _vector(item: str | list[int], dim: int, size: int) -> list[float]:
    """Return a deterministic unit vector derived from the input: the model's `dim` values, truncated to
    the first `size` and normalised again (a matryoshka model's `dimensions`)."""
    key = item if isinstance(item, str) else ",".join(map(str, item))
    return list(_vector_for_key(key, dim, size))


@functools.lru_cache(maxsize=1024)
def _vector_for_key(key: str, dim: int, size: int) -> tuple[float, ...]:
    """Compute (and cache) the unit vector of one input key."""
    state = zlib.crc32(key.encode("utf-8", "surrogatepass")) or 1
    raw = []
    for _ in range(dim):
        state = (state * 1103515245 + 12345) & 0x7FFFFFFF
        raw.append(state / 0x7FFFFFFF - 0.5)
    del raw[size:]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return tuple(_float32(v / norm) for v in raw)


def _float32(value: float) -> float:
    """The float32 nearest ``value``, as the float whose JSON text is that float32's shortest digits: vLLM
    0.33 hands orjson the pooler's float32 array, which writes ``0.35355338`` where Python's own float
    would be ``0.35355339059327373``."""
    packed = struct.pack("<f", value)
    exact = struct.unpack("<f", packed)[0]
    for digits in range(1, 10):  # nine significant digits always read back as the same float32
        shortest = float(f"{exact:.{digits}g}")
        if struct.pack("<f", shortest) == packed:
            return shortest
    return exact


def _encoded(vector: list[float], encoding_format: str) -> list[float] | str:
    """Return the embedding as floats or, like vLLM, as base64 of little-endian float32."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector
