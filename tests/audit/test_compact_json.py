"""The hot path's JSON: orjson where it can, the standard library where orjson refuses, the same JSON."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from audit.compact_json import json_compact_dump, json_parse

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_what_is_written_reads_back_as_the_standard_library_reads_it(value):
    written = json_compact_dump(value)
    assert json.loads(written) == value
    assert json_parse(written) == json.loads(written)


@pytest.mark.parametrize(
    "value",
    [{"n": 2**70}, {"text": "a\ud800b"}, {1: "not a string key"}],
    ids=["integer beyond 64 bits", "lone surrogate", "integer key"],
)
def test_what_orjson_refuses_to_write_the_standard_library_writes(value):
    written = json_compact_dump(value)
    assert written == json.dumps(value, separators=(",", ":")).encode()
    assert json.loads(written) == json.loads(json.dumps(value))


def test_non_ascii_text_is_written_as_utf8_and_compact():
    assert json_compact_dump({"a": ["é", 1, None]}) == '{"a":["é",1,null]}'.encode()


def test_a_nan_is_written_as_null_as_orjson_writes_it():
    assert json_compact_dump({"ms": float("nan"), "inf": math.inf}) == b'{"ms":null,"inf":null}'


@pytest.mark.parametrize(
    ("data", "check"),
    [
        (b'{"a":NaN,"b":-Infinity}', lambda v: math.isnan(v["a"]) and v["b"] == -math.inf),
        (b'{"a":"\\ud800"}', lambda v: v["a"] == "\ud800"),
    ],
    ids=["NaN and Infinity", "escaped lone surrogate"],
)
def test_what_orjson_refuses_to_read_the_standard_library_reads(data, check):
    assert check(json_parse(data))


@pytest.mark.parametrize("data", [b"", b"{", b'{"a":1,}', b"\xff"])
def test_what_is_not_json_raises_what_json_loads_raises(data):
    with pytest.raises((json.JSONDecodeError, UnicodeDecodeError)):  # ValueErrors both
        json_parse(data)
