"""Large numeric JSON arrays parsed straight into numpy (mip.protocol._jsonnum), checked
against Python's json module as the reference."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mip.protocol._jsonnum import PLACEHOLDER, parse_numbers, split_numeric_arrays


def _parse(text: bytes, dtype):
    return parse_numbers(text, 0, len(text), dtype)


def test_split_replaces_long_numeric_arrays_outside_strings():
    body = (b'{"s": "[1, 2, 3, 4, 5]", "a": [[1, 2], [3, 4.5e3]], "b": [true, false],'
            b' "c": [1]}')
    doc, spans = split_numeric_arrays(body, 8)
    parsed = orjson.loads(doc)
    assert parsed["s"] == "[1, 2, 3, 4, 5]"        # inside a string: left alone
    assert parsed["a"] == PLACEHOLDER + "0"         # long enough, numbers only
    assert parsed["b"] == [True, False] and parsed["c"] == [1]  # not numbers / too short
    start, end = spans[0]
    assert body[start:end] == b"[[1, 2], [3, 4.5e3]]"
    assert split_numeric_arrays(b'{"a": [1, 2]}', 100) == (b'{"a": [1, 2]}', [])


def test_escaped_quotes_do_not_end_a_string():
    body = b'{"s": "x\\"[1,2,3,4,5,6,7,8,9]", "d": [1,2,3,4,5,6,7,8,9]}'
    doc, spans = split_numeric_arrays(body, 8)
    assert orjson.loads(doc) == {"s": 'x"[1,2,3,4,5,6,7,8,9]', "d": PLACEHOLDER + "0"}


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_floats_equal_what_python_parses(dtype):
    rng = np.random.default_rng(7)
    values = np.concatenate([rng.standard_normal(5000) * 10.0 ** rng.integers(-40, 40, 5000),
                             rng.integers(-10 ** 6, 10 ** 6, 500), [0.0, -0.0, 1e-300, 5e-324]])
    text = json.dumps(values.tolist()).encode()
    with np.errstate(over="ignore"):
        expected = np.array(json.loads(text), dtype=dtype)
    np.testing.assert_array_equal(_parse(text, dtype), expected)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=50))
def test_float64_is_exact(values):
    text = json.dumps(values).encode()
    np.testing.assert_array_equal(_parse(text, np.float64), np.array(values, np.float64))


def test_integers_nested_and_their_ranges():
    assert _parse(b"[[1, -2], [3, 4]]", np.int8).tolist() == [1, -2, 3, 4]
    big = [2 ** 63 - 1, -2 ** 63, 123456789012345678, 0]
    assert _parse(json.dumps(big).encode(), np.int64).tolist() == big
    assert _parse(b"[255, 0]", np.uint8).tolist() == [255, 0]
    for text, dtype, message in ((b"[256]", np.uint8, "does not fit"),
                                 (b"[-1]", np.uint32, "does not fit"),
                                 (b"[1.5]", np.int32, "not an integer"),
                                 (b"[1e3]", np.int32, "not an integer"),
                                 (b"[9223372036854775808]", np.int64, "out of range")):
        with pytest.raises(ValueError, match=message):
            _parse(text, dtype)


@pytest.mark.parametrize("text", [b"[1,,2]", b"[1 2]", b"[,1]", b"[1,]", b"[01]", b"[1.]",
                                  b"[.5]", b"[-]", b"[1e]", b"[+1]", b"[1-2]", b"[[1],2]]",
                                  b"[[1,2]", b"[1][2]"])
def test_malformed_arrays_are_refused(text):
    with pytest.raises(ValueError):
        _parse(text, np.float64)


def test_empty_lists_hold_no_elements():
    assert _parse(b"[]", np.float32).size == 0
    assert _parse(b"[[], []]", np.float32).size == 0


def test_exact_float32_is_what_python_floats_give():
    """With ``exact``, FP32 values are those of the correctly rounded doubles (as through
    Python floats) even for decimals at the middle between two FP32 values, where a
    double computed within an ulp may round the other way."""
    rng = np.random.default_rng(7)
    f32 = (rng.standard_normal(5000).astype(np.float32)
           * np.float32(10.0) ** rng.integers(-8, 8, 5000).astype(np.float32))
    low = f32.astype(np.float64)
    middle = (low + np.nextafter(f32, np.float32(np.inf)).astype(np.float64)) / 2
    values = np.concatenate([middle, np.nextafter(middle, np.inf),
                             np.nextafter(middle, -np.inf), low]).tolist() + [0, -0, -0.0]
    text = json.dumps(values).encode()
    got = parse_numbers(text, 0, len(text), np.float32, True)
    want = np.array(json.loads(text), np.float32)
    assert got.view(np.uint32).tolist() == want.view(np.uint32).tolist()


def test_numbers_are_written_into_an_array_given_when_they_fill_it():
    body = b"[1.5, -2, 3e2, 4]"
    out = np.zeros(4, np.float32)
    assert parse_numbers(body, 1, len(body) - 1, np.float32, False, out) is out
    np.testing.assert_array_equal(out, [1.5, -2, 300, 4])
    # as many as it holds, or a new array (whose size the caller checks)
    other = parse_numbers(body, 1, len(body) - 1, np.float32, False, np.zeros(5, np.float32))
    np.testing.assert_array_equal(other, [1.5, -2, 300, 4])
    # integers out of range are refused before anything is written
    out = np.zeros(4, np.int8)
    with pytest.raises(ValueError, match="does not fit"):
        parse_numbers(b"[1, 2, 300, 4]", 1, 13, np.int8, False, out)
    assert not out.any()
