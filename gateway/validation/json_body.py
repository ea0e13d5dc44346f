"""Strict JSON for request bodies: a JSON object, with no duplicate keys, no NaN or Infinity, no number
beyond a float's range, and no nesting deeper than ``MAX_DEPTH``; anything else is an ``InvalidRequest``.
"""

from __future__ import annotations

import json
import math
from typing import Any

from gateway.errors import InvalidRequest

MAX_DEPTH = 32


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):  # a key repeats: name the first one that does
        seen: set[str] = set()
        for key, _value in pairs:
            if key in seen:
                raise InvalidRequest(f"Duplicate key {key!r} in the JSON body.", param=key)
            seen.add(key)
    return result


def _no_constants(name: str) -> None:
    raise InvalidRequest(f"{name} is not valid JSON.")


def _finite_float(text: str) -> float:
    value = float(text)
    # 1e999: valid JSON, but no float holds it (it would go upstream as Infinity)
    if not math.isfinite(value):
        raise InvalidRequest(f"The number {text[:32]} is too large.")
    return value


def _depth_ok(value: Any) -> bool:
    """Whether nothing in the value lies deeper than MAX_DEPTH (the value itself at depth 1), walked a level
    at a time: a tuple pushed for every value took half a second of the event loop for a 1 MiB body of
    262,144 empty lists, which a client could send again and again (it is checked before the limiter)."""
    level = [value]
    for _depth in range(MAX_DEPTH):
        deeper: list[Any] = []
        for item in level:
            kind = type(item)  # what json builds: dict and list themselves
            if kind is dict:
                deeper += item.values()
            elif kind is list:
                deeper += item
        if not deeper:
            return True
        level = deeper
    return False


# Built once: ``json.loads`` given hooks builds a decoder (and its scanner) for every call, ~16,000
# instructions of the ~45,000 it took for the benchmark's chat body (bench/README.md, session 23)
_DECODER = json.JSONDecoder(
    object_pairs_hook=_no_duplicates, parse_constant=_no_constants, parse_float=_finite_float
)


def body_parse(body: bytes) -> dict[str, Any]:
    """Parse a JSON object body: no duplicate keys, no NaN/Infinity (nor 1e999), bounded nesting."""
    try:
        # as json.loads reads bytes: UTF-8, -16 or -32, told apart as RFC 4627 says
        value = _DECODER.decode(body.decode(json.detect_encoding(body), "surrogatepass"))
    except InvalidRequest:
        raise
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("The body is not valid JSON.") from None
    except RecursionError:
        raise InvalidRequest(f"The JSON body is nested deeper than {MAX_DEPTH} levels.") from None
    if not isinstance(value, dict):
        raise InvalidRequest("The body must be a JSON object.")
    # Nesting cannot be deeper than the number of brackets in the body (those inside strings included; in
    # UTF-8, -16 and -32 alike each is a byte of that value), so a body with few (most are) is not walked.
    if body.count(b"{") + body.count(b"[") > MAX_DEPTH and not _depth_ok(value):
        raise InvalidRequest(f"The JSON body is nested deeper than {MAX_DEPTH} levels.")
    return value
