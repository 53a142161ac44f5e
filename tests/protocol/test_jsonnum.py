"""Large numeric JSON arrays parsed straight into numpy (mip.protocol._jsonnum), checked
against Python's json module as the reference."""

from __future__ import annotations

import json
import struct

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


# ---- numbers as Python reads them: every form, every length ------------------------------
def _exact_values(texts: list[str], dtype) -> tuple[bytes, bytes]:
    """The octets of ``parse_numbers(exact=True)`` of ``texts`` as one list, and of what
    numpy makes of the values ``json.loads`` reads."""
    body = ("[" + ",".join(texts) + "]").encode()
    got = parse_numbers(body, 0, len(body), dtype, True)
    with np.errstate(over="ignore"):
        want = np.array(json.loads(body), dtype=np.float64).astype(dtype)
    return got.tobytes(), want.tobytes()


_FLOAT_FORMS = st.sampled_from([repr, "%.17g".__mod__, "%.9g".__mod__, "%.3g".__mod__,
                                "%.1e".__mod__, "%.20f".__mod__])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.floats(allow_nan=False, allow_infinity=False, width=64)
                          | st.floats(allow_nan=False, allow_infinity=False, width=32),
                          _FLOAT_FORMS), min_size=1, max_size=40))
def test_printed_floats_read_as_python_reads_them(values):
    texts = [form(x) for x, form in values]
    for dtype in (np.float64, np.float32, np.float16):
        got, want = _exact_values(texts, dtype)
        assert got == want, (dtype, texts)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10 ** 25), st.integers(-360, 330), st.booleans(),
                          st.integers(0, 30)), min_size=1, max_size=40))
def test_long_mantissas_and_exponents_read_as_python_reads_them(parts):
    """Mantissas of up to 26 digits (19 fit the fast reading, more do not) times powers of
    ten from underflow to overflow, written as ``MeE`` and as decimals ``I.F``."""
    texts = []
    for mantissa, exponent, negative, point in parts:
        digits = str(mantissa)
        sign = "-" if negative else ""
        texts.append(f"{sign}{digits}e{exponent}")
        if 0 < point < len(digits) and digits[0] != "0":
            texts.append(f"{sign}{digits[:point]}.{digits[point:]}")
        texts.append(f"{sign}0.{'0' * point}{digits}")
    for dtype in (np.float64, np.float32, np.float16):
        got, want = _exact_values(texts, dtype)
        assert got == want, (dtype, texts)


def test_double_and_fp32_midpoints_round_to_even():
    """Decimals exactly between two doubles (more than 19 digits), next to them, and
    integers between 2**53 and 2**64 (19 digits at most: the fast reading rounds them)."""
    from decimal import Decimal
    rng = np.random.default_rng(11)
    texts = []
    for bits in rng.integers(1, 0x7FEFFFFFFFFFFFFF, 300, dtype=np.int64).tolist():
        low = struct.unpack("<d", struct.pack("<q", bits))[0]
        high = struct.unpack("<d", struct.pack("<q", bits + 1))[0]
        texts.append(str((Decimal(low) + Decimal(high)) / 2))
    texts += [str(2 ** 53 + k) for k in range(-3, 8)] + [str(2 ** 63 + 2 ** 10 * k) for k in range(4)]
    texts += [str(2 ** 64 - 1), "18446744073709551615e-19", "9007199254740993e-16",
              "2.2250738585072011e-308", "2.2250738585072014e-308", "4.9406564584124654e-324",
              "2.4703282292062327e-324", "2.4703282292062328e-324", "1.7976931348623157e308",
              "1.7976931348623158e308", "1.7976931348623159e308", "1e-400", "1e400", "-1e400",
              "9999999999999999999e-343", "3.4028235677973366e38", "1.401298464324817e-45",
              "7.006492321624085e-46", "-0.0", "-0", "0e-999", "-0.0e5", "0.000"]
    for dtype in (np.float64, np.float32, np.float16):
        got, want = _exact_values(texts, dtype)
        assert got == want, dtype


def test_fp32_near_its_midpoints_and_edges_reads_as_python_reads_it():
    """Long decimals (17 to 19 digits, whose double is computed within a few ulps first)
    at and around the middle between two FP32 values, at FP32 values themselves, and at the
    edges of FP32's normal range (the smallest normals, the largest values)."""
    from decimal import Decimal
    rng = np.random.default_rng(13)
    f32 = (rng.standard_normal(200).astype(np.float32)
           * np.float32(10.0) ** rng.integers(-6, 7, 200).astype(np.float32))
    edges = np.array([2.0 ** -126, 2.0 ** -125, 2.0 ** 127, 2.0 ** 126,
                      float(np.finfo(np.float32).max)], np.float32)
    offsets = [*range(-80, 81, 3), *range((1 << 28) - 80, (1 << 28) + 81, 3)]
    texts = []
    for value in np.concatenate([f32, edges, -edges]).tolist():
        bits = struct.unpack("<q", struct.pack("<d", value))[0]
        for offset in offsets:
            double = struct.unpack("<d", struct.pack("<q", bits + offset))[0]
            digits = format(Decimal(double), ".18e")  # (19 digits: as M * 10**E too)
            mantissa, exponent = digits.replace(".", "").split("e")
            texts += [repr(double), digits, format(Decimal(double), ".16e"),
                      f"{mantissa}e{int(exponent) - 18}"]
    got, want = _exact_values(texts, np.float32)
    assert got == want


def test_fractions_of_sixteen_digits_and_what_breaks_them():
    """Fractions read 16 digits at a step: every digit at every place, and each octet next to
    the digits' range at each of the 16 places (an error, or the end of the number)."""
    texts = ["0." + d * 16 for d in "0123456789"] + ["-9." + "9" * 18, "1." + "0" * 15 + "1",
                                                    "0.1234567890123456", "5.6543210987654321e-3"]
    texts += ["0." + "1234567890123456"[k:] + "1234567890123456"[:k] for k in range(16)]
    # 1 to 20 digits after 1 to 4 (up to 19 in all: one reading; more: the careful one)
    texts += [f"{whole}.{'98765432109876543210'[:length]}{tail}"
              for whole in ("0", "-7", "123", "-999", "1234") for length in range(1, 21)
              for tail in ("", "e-7", "E+3")]
    for dtype in (np.float64, np.float32, np.float16):
        got, want = _exact_values(texts, dtype)
        assert got == want, dtype
        got, want = _exact_values(texts[::-1], dtype)  # (others last: under 16 octets left)
        assert got == want, dtype
    for place in range(16):
        for octet in "/:e ,]":
            body = f"[0.{'7' * place}{octet}{'3' * (15 - place)}]".encode()
            try:
                want = np.array(json.loads(body), np.float64)
            except ValueError:
                with pytest.raises(ValueError):
                    parse_numbers(body, 0, len(body), np.float64, True)
                continue
            got = parse_numbers(body, 0, len(body), np.float64, True)
            assert got.tobytes() == want.ravel().tobytes(), body


def test_negative_zero_is_a_float_minus_zero_and_an_integer_zero():
    got = _parse(b"[-0, -0.0, -0e0, 0]", np.float64)
    assert [struct.pack("<d", x)[0:8] for x in got.tolist()] == [
        struct.pack("<d", x) for x in (0.0, -0.0, -0.0, 0.0)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1,
                max_size=60))
def test_float32_without_exact_is_within_an_ulp(values):
    text = json.dumps([float(x) for x in values]).encode()
    got = _parse(text, np.float32).astype(np.float64)
    want = np.array(json.loads(text), np.float32).astype(np.float64)
    with np.errstate(over="ignore"):  # (the spacing past the largest FP32 value: inf)
        ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    assert (np.abs(got - want) <= ulp).all()


@pytest.mark.parametrize("value", [2 ** 63 - 1, -2 ** 63, 10 ** 18 - 1, -(10 ** 18), 10 ** 18,
                                   999999999999999999, 1234567890123456789, 0])
def test_integers_up_to_the_int64_limits(value):
    text = json.dumps([value, 1, value]).encode()
    assert _parse(text, np.int64).tolist() == [value, 1, value]


@pytest.mark.parametrize("text, dtype, message", [
    (b"[1,,2]", np.float64, "a value is missing before ',' at octet 3"),
    (b"[1 2]", np.float64, "a ',' is missing before element 1"),
    (b"[,1]", np.float64, "a value is missing before ',' at octet 1"),
    (b"[1,]", np.float64, "a value is missing before ']' at octet 3"),
    (b"[1,\n]", np.float64, "a value is missing before ']' at octet 4"),
    (b"[01]", np.float64, "element 0 is not a JSON number: b'01'"),
    (b"[1.]", np.float64, "element 0 is not a JSON number: b'1.'"),
    (b"[.5]", np.float64, "element 0 is not a JSON number: b'.5'"),
    (b"[-]", np.float64, "element 0 is not a JSON number: b'-'"),
    (b"[1e]", np.float64, "element 0 is not a JSON number: b'1e'"),
    (b"[+1]", np.float64, "element 0 is not a JSON number: b'+1'"),
    (b"[1-2]", np.float64, "element 0 is not a JSON number: b'1-2'"),
    (b"[12345678.12345678.5]", np.float64,
     "element 0 is not a JSON number: b'12345678.12345678.5'"),
    (b"[1234567812345678-]", np.float64,
     "element 0 is not a JSON number: b'1234567812345678-'"),
    (b"[1234567890123456789012e5e]", np.float64,
     "element 0 is not a JSON number: b'1234567890123456789012e5e'"),
    (b"[0.12345678901234567,1.2e5x]", np.float32, "unexpected 'x' at octet 26"),
    (b"[true]", np.float64, "unexpected 't' at octet 1"),
    (b"[[1],2]]", np.float64, "unbalanced ']'"),
    (b"[[1,2]", np.float64, "unbalanced '['"),
    (b"[1][2]", np.float64, "a ',' is missing before the list at octet 3"),
    (b"[1,2]3", np.float64, "a ',' is missing before element 2"),
    (b"[1.5]", np.int32, "element 0 is not an integer: b'1.5'"),
    (b"[9223372036854775808]", np.int64, "element 0 is out of range: b'9223372036854775808'"),
    (b"[-9223372036854775809]", np.int64,
     "element 0 is out of range: b'-9223372036854775809'"),
])
def test_malformed_arrays_say_what_and_where(text, dtype, message):
    with pytest.raises(ValueError) as raised:
        _parse(text, dtype)
    assert str(raised.value) == message


# ---- finding the arrays: checked against the plain reading, octet by octet ----------------
def _reference_spans(body: bytes, min_length: int) -> list[tuple[int, int]]:
    """The spans split_numeric_arrays finds, found one octet at a time."""
    number_chars, spaces = set(b"0123456789-+.eE"), set(b", \n\r\t")

    def numeric_end(i):
        depth = 0
        for j in range(i, len(body)):
            c = body[j]
            if c == 0x5B:
                depth += 1
            elif c == 0x5D:
                depth -= 1
                if depth == 0:
                    return j + 1
            elif c not in number_chars and c not in spaces:
                return -1
        return -1

    spans, i, in_string = [], 0, False
    while i < len(body):
        c = body[i]
        if in_string:
            if c == 0x5C:
                i += 2
                continue
            in_string = c != 0x22
        elif c == 0x22:
            in_string = True
        elif c == 0x5B:
            end = numeric_end(i)
            if end > 0:
                if end - i >= min_length:
                    spans.append((i, end))
                i = end
                continue
        i += 1
    return spans


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from([b"1", b"-0.25", b"1234567890123456", b"1e-05", b",", b", ",
                                 b"\n", b"[", b"]", b"[1,2]", b'"', b'\\"', b"x", b"/", b"{",
                                 b"}", b":", b"true", b"\xb0", b"\t"]), max_size=80),
       st.integers(0, 40))
def test_split_finds_what_the_octet_by_octet_reading_finds(pieces, min_length):
    body = b"".join(pieces)
    doc, spans = split_numeric_arrays(body, min_length)
    assert spans == _reference_spans(body, min_length)
    if not spans:
        assert doc is body


@pytest.mark.parametrize("octet", list(b'x/:"{}[]\t\n e+\xb0'))
def test_split_sees_every_octet_of_a_long_run(octet):
    """One octet other than those of plain numbers, at every place in a run of them (the
    run is read 8 or 16 octets at a time)."""
    run = b"0.1257302165031433,-0.13210485875606537," * 2
    for at in range(1, len(run) - 1):
        body = b'{"a": [' + run[:at] + bytes([octet]) + run[at:] + b"1]}"
        assert split_numeric_arrays(body, 8)[1] == _reference_spans(body, 8)
