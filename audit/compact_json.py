"""Compact JSON for the gateway's hot path: orjson, and the standard library for what orjson refuses.

A usage record, a request body sent upstream and an upstream answer read for its usage go through here.
``json.JSONEncoder.encode`` spends ~68,000 instructions on a usage record (its Python-level call path, and a
C call per key and value) and ``json.loads`` ~65,000 on a short chat completion; orjson ~7,500 and ~22,000
(bench/README.md, session 23). orjson refuses integers beyond 64 bits, strings with lone surrogates and
keys that are not strings, and (reading) NaN, Infinity and lone surrogates, which the standard library
takes: those go to the standard library, so what is written reads back the same, and what is read is what
``json.loads`` read, but for an integer beyond 64 bits, which orjson reads as a float. orjson writes UTF-8
where the standard encoder escaped non-ASCII characters: the same JSON. It writes a NaN or an infinity as
``null``, where the standard encoder wrote ``NaN``, which PostgreSQL's JSON refuses (no request number
holds one: they are checked finite).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

_STANDARD = json.JSONEncoder(separators=(",", ":"))


def json_compact_dump(value: Any) -> bytes:
    """Return ``value`` as compact JSON, UTF-8."""
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError is one: a big integer, a lone surrogate, a non-string key
        return _STANDARD.encode(value).encode()


def json_parse(data: bytes | str, *, constants: bool = True) -> Any:
    """Parse JSON as ``json.loads`` does (raising a ValueError for what is not JSON); without
    ``constants``, NaN and Infinity are not JSON either (RFC 8259 has no such values)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:  # NaN, Infinity, a lone surrogate: the standard library decides
        return json.loads(data) if constants else json.loads(data, parse_constant=_no_constant)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")
