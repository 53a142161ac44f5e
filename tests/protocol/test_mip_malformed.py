"""Malformed MIP input: every defect raises its specific ProtocolError subclass.

Frames are built by hand (``_wire``) and then broken on purpose. Each case is
checked through ``mip.decode`` and through ``mip.FrameParser``.
"""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest

import mip
from mip.errors import (
    BadSubtype,
    ErrorCode,
    FrameTooLarge,
    InconsistentCounts,
    InvalidValue,
    ProtocolError,
    TruncatedFrame,
    UnknownKind,
    UnknownValueType,
    UnsupportedVersion,
)

from . import _wire
from ._parsers import expect_error

ITEMSIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 2, 8: 4, 9: 8, 10: 2, 11: 4, 12: 8, 14: 2}
SIZE_ERRORS = (TruncatedFrame, InconsistentCounts)

ITEMS = [
    [
        (1, "abc é".encode()),
        np.array([1.5, -2.0, 3.25], dtype=np.float32),
        (2, b'{"k": [1, 2]}'),
        (3, b"\x89PNG\r\n\x1a\n"),
        (300, b"zz"),
        np.array([b"ab", b"", b"xyz"], dtype=object),
        np.arange(6, dtype=np.int16).reshape(2, 3),
    ],
    [
        (1, b"second"),
        np.array([0.0, 1.0, 2.0], dtype=np.float32),
        (2, b"null"),
        (3, b""),
        (65536, b""),
        np.array([b"q"], dtype=object),
        np.zeros((2, 3), dtype=np.int16),
    ],
]

VALID = {
    "ping": _wire.ping(),
    "pong": _wire.pong(),
    "error": _wire.error(3),
    "request": _wire.request(ITEMS),
    "response": _wire.response(ITEMS, n_input=2),
    "routed request": _wire.request(ITEMS, kind=3, route=("model-α", "12")),
    "routed response": _wire.response(ITEMS, n_input=1, kind=3),
}


def check_offset(exc, low: int, high: int):
    assert isinstance(exc.offset, int), f"{type(exc).__name__} without an offset"
    assert low <= exc.offset <= high, (exc.offset, low, high, str(exc))


def decode_error(frame, expected, **kw):
    with pytest.raises(expected) as info:
        mip.decode(frame, **kw)
    assert isinstance(info.value, ProtocolError)
    assert isinstance(info.value, ValueError)
    return info.value


def parser_error(frame, expected, **kw):
    """A complete bad frame makes the parser raise (now, or on the next call)."""
    return expect_error(mip.FrameParser(**kw), frame, expected)


def both(frame, expected, low=0, high=None):
    high = len(frame) if high is None else high
    exc = decode_error(frame, expected)
    check_offset(exc, low, high)
    parser_exc = parser_error(frame, expected)
    assert isinstance(parser_exc, ProtocolError)
    return exc


def test_valid_frames_decode():
    for name, frame in VALID.items():
        mip.decode(frame)
        assert len(mip.FrameParser().feed(frame)) == 1, name


# -- truncation ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(VALID))
def test_truncated_at_every_offset(name):
    frame = VALID[name]
    expected = mip.decode(frame)
    for cut in range(len(frame)):
        exc = decode_error(frame[:cut], TruncatedFrame)
        check_offset(exc, 0, len(frame))
        assert exc.error_code == ErrorCode.SHAPE
    # The parser waits for the rest instead of failing.
    for cut in range(0, len(frame), 7):
        parser = mip.FrameParser()
        assert parser.feed(frame[:cut]) == []
        (m,) = parser.feed(frame[cut:])
        assert (m.kind, m.subtype, len(m.batch)) == (expected.kind, expected.subtype, len(expected.batch))


@pytest.mark.parametrize("name", ["request", "response", "routed request"])
def test_cut_payload_with_matching_remaining(name):
    """The header agrees with the octets present, but the payload stops early."""
    frame = VALID[name]
    for cut in range(8, len(frame)):
        broken = _wire.set_remaining(frame[:cut], cut - 8)
        with pytest.raises(SIZE_ERRORS) as info:
            mip.decode(broken)
        check_offset(info.value, 0, len(frame))
        parser_error(broken, SIZE_ERRORS)


# -- lying sizes and counts ---------------------------------------------------


@pytest.mark.parametrize("name", list(VALID))
@pytest.mark.parametrize("extra", [1, 7, 8, 1000])
def test_remaining_larger_than_present(name, extra):
    frame = VALID[name]
    broken = _wire.set_remaining(frame, len(frame) - 8 + extra)
    exc = decode_error(broken, TruncatedFrame)
    check_offset(exc, 0, len(broken) + extra)
    assert mip.FrameParser().feed(broken) == []  # just waits


@pytest.mark.parametrize("name", list(VALID))
def test_trailing_octets_after_a_frame(name):
    frame = VALID[name]
    for tail in (b"\x00", b"\x00" * 8, VALID["ping"]):
        exc = decode_error(frame + tail, InconsistentCounts)
        assert exc.offset == len(frame)


@pytest.mark.parametrize("name", ["request", "response", "routed request", "routed response"])
@pytest.mark.parametrize("less", [1, 2, 9])
def test_remaining_smaller_than_present(name, less):
    frame = VALID[name]
    broken = _wire.set_remaining(frame, len(frame) - 8 - less)
    decode_error(broken, SIZE_ERRORS + (InvalidValue,))


def _with_counts(frame: bytes, n_input=None, n_output=None, batch=None, at=8):
    a, b, c = struct.unpack_from("!BBH", frame, at)
    a = a if n_input is None else n_input
    b = b if n_output is None else n_output
    c = c if batch is None else batch
    return frame[:at] + struct.pack("!BBH", a, b, c) + frame[at + 4 :]


def test_counts_promise_more_values_than_present():
    req, resp = VALID["request"], VALID["response"]
    for broken in (
        _with_counts(req, batch=3),
        _with_counts(req, n_input=8),
        _with_counts(req, n_input=255, batch=65535),
        _with_counts(resp, n_output=8),
        _with_counts(resp, batch=3),
    ):
        with pytest.raises(SIZE_ERRORS):
            mip.decode(broken)
        parser_error(broken, SIZE_ERRORS)


def test_counts_promise_fewer_values_than_present():
    req, resp = VALID["request"], VALID["response"]
    routed = VALID["routed request"]
    route_len = 1 + len("model-α".encode()) + 1 + 2
    for broken in (
        _with_counts(req, batch=1),
        _with_counts(req, n_input=6),
        _with_counts(req, n_input=0),
        _with_counts(resp, n_output=1),
        _with_counts(resp, batch=0),
        _with_counts(routed, batch=1, at=8 + route_len),
    ):
        both(broken, InconsistentCounts)


def test_response_n_input_is_informational():
    resp = VALID["response"]
    for n_input in (0, 1, 255):
        m = mip.decode(_with_counts(resp, n_input=n_input))
        assert m.n_input == n_input and len(m.batch) == 2


def _single(value_type: int, data: bytes, kind=2) -> bytes:
    return _wire.request([[(value_type, data)]], kind=kind)


def _set_tlv_size(frame: bytes, tlv_offset: int, size: int) -> bytes:
    return frame[: tlv_offset + 4] + struct.pack("!I", size) + frame[tlv_offset + 8 :]


def test_tlv_size_runs_past_the_frame():
    layout = _wire.inference(ITEMS)
    last = layout.tlv_offsets[-1]
    for size_delta in (1, 8, 1 << 20):
        size = layout.tlv_ends[-1] - last - 8 + size_delta
        broken = _set_tlv_size(layout.data, last, size)
        exc = decode_error(broken, SIZE_ERRORS)
        check_offset(exc, 0, len(broken))
    text = _single(1, b"abcdef")
    for size in (7, 100, 0xFFFFFFFF):
        exc = decode_error(_set_tlv_size(text, 12, size), SIZE_ERRORS)
        check_offset(exc, 12, len(text))


def test_tlv_size_shorter_than_its_value_leaves_trailing_octets():
    text = _single(1, b"abcdef")
    both(_set_tlv_size(text, 12, 5), InconsistentCounts, 12)


# -- limits --------------------------------------------------------------------


def _peak_during(fn) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_four_gib_claims_raise_frame_too_large_without_allocating():
    huge = _wire.header(2, 0, 0xFFFFFFFF)

    def run():
        with pytest.raises(FrameTooLarge) as info:
            mip.decode(huge + b"\x01\x00\x00\x01", max_frame_size=1 << 20)
        assert info.value.error_code == ErrorCode.MEMORY
        check_offset(info.value, 0, 8)
        for limit in (1 << 20, 64 << 20):
            parser = mip.FrameParser(max_frame_size=limit)
            with pytest.raises(FrameTooLarge):
                parser.feed(huge)
                parser.feed(b"")
        parser = mip.FrameParser()  # the default limit refuses it too
        with pytest.raises(FrameTooLarge):
            parser.feed(huge)
            parser.feed(b"")
        parser = mip.FrameParser(max_frame_size=1 << 20)
        with pytest.raises(FrameTooLarge):
            buf = parser.get_buffer(-1)
            buf[:8] = huge
            parser.buffer_updated(8)
            parser.feed(b"")

    assert _peak_during(run) < 512 * 1024


def test_max_frame_size_on_decode():
    frame = VALID["request"]
    assert mip.decode(frame, max_frame_size=len(frame) + 100).n_input == 7
    exc = decode_error(frame, FrameTooLarge, max_frame_size=len(frame) // 2)
    check_offset(exc, 0, 8)
    decode_error(_wire.header(2, 0, 1 << 30), FrameTooLarge, max_frame_size=1 << 20)


def test_huge_inner_claims_do_not_allocate():
    def tensor_frame(code, dims, data=b"", pad=None):
        ndim = len(dims)
        pad = (-(20 + 4 + 4 * ndim)) % 8 if pad is None else pad
        value = struct.pack("!BBBB", code, ndim, pad, 0) + struct.pack(f"!{ndim}I", *dims) + b"\x00" * pad + data
        return _single(16, value)

    cases = [
        (_set_tlv_size(_single(1, b"x"), 12, 0xFFFFFFFF), SIZE_ERRORS),
        (tensor_frame(12, (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)), (InvalidValue,)),
        (tensor_frame(12, (0xFFFFFFFF,) * 32, b"\x00" * 8), (InvalidValue,)),
        (tensor_frame(13, (1 << 31,), b"\x00\x00\x00\x00"), (InvalidValue,)),
        (tensor_frame(13, (0xFFFFFFFF, 0xFFFFFFFF), b"\x00" * 8), (InvalidValue,)),
        (_with_counts(VALID["request"], n_input=255, batch=65535), SIZE_ERRORS),
    ]

    def run():
        for frame, expected in cases:
            with pytest.raises(expected):
                mip.decode(frame)

    assert _peak_during(run) < 512 * 1024


# -- header fields -------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2, 0x7F, 0xFF])
def test_unsupported_version(version):
    for frame in (VALID["ping"], VALID["request"], VALID["error"]):
        broken = bytes([version]) + frame[1:]
        exc = both(broken, UnsupportedVersion, 0, 0)
        assert exc.error_code == ErrorCode.PROTOCOL


@pytest.mark.parametrize("kind", [4, 5, 9, 16, 100, 0xFF])
def test_unknown_kind(kind):
    for frame in (VALID["ping"], VALID["request"]):
        broken = frame[:1] + bytes([kind]) + frame[2:]
        exc = both(broken, UnknownKind, 0, 1)
        assert exc.error_code == ErrorCode.METHOD


@pytest.mark.parametrize("subtype", [2, 3, 0x80, 0xFF])
@pytest.mark.parametrize("name", ["ping", "request", "response", "routed request"])
def test_bad_subtype(name, subtype):
    frame = VALID[name]
    broken = frame[:2] + bytes([subtype]) + frame[3:]
    exc = both(broken, BadSubtype, 0, 2)
    assert exc.error_code == ErrorCode.SUBTYPE


def test_all_error_codes_decode():
    for code in ErrorCode:
        assert mip.decode(_wire.error(code)).error_code == code


# -- value types ---------------------------------------------------------------

RESERVED_TYPES = [0]


@pytest.mark.parametrize("value_type", RESERVED_TYPES)
def test_reserved_value_types(value_type):
    frame = _single(value_type, b"abc")
    exc = both(frame, UnknownValueType, 12, 19)
    assert exc.error_code == ErrorCode.SHAPE
    # In the middle of a bigger frame too.
    layout = _wire.inference(ITEMS)
    at = layout.tlv_offsets[4]  # the application-defined (300) value
    broken = layout.data[:at] + struct.pack("!I", value_type) + layout.data[at + 4 :]
    both(broken, UnknownValueType, at, at + 8)


def test_application_defined_types_are_not_reserved():
    # 4-15 and 17-255 too: KubeMo's applications register kinds there
    for value_type in (4, 5, 15, 17, 100, 254, 255, 256, 257, 0x10000, 0xFFFFFFFF):
        frame = _single(value_type, b"ok")
        (item,) = mip.decode(frame).batch
        assert item[0].type == value_type and bytes(item[0].data) == b"ok"
        (message,) = mip.FrameParser().feed(frame)
        assert message.batch[0][0] == mip.Value(value_type, b"ok")
        assert mip.encode_request([[mip.Value(value_type, b"ok")]]) == frame


def test_the_protocols_own_types_cannot_be_made_as_application_values():
    for value_type in (0, 16):
        with pytest.raises(ValueError, match=f"TLV type {value_type} is reserved"):
            mip.Value(value_type, b"")


@pytest.mark.parametrize(
    "data",
    [b"\xff", b"\xc3", b"abc\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"ok\x80", b"\xc0\xaf"],
    ids=lambda d: d.hex(),
)
def test_invalid_utf8_text(data):
    frame = _single(1, data)
    exc = both(frame, InvalidValue, 12, len(frame))
    assert exc.error_code == ErrorCode.SHAPE


def test_invalid_utf8_in_the_route_block():
    good = _wire.request([[(1, b"x")]], kind=3, route=("ab", "1"))
    bad_name = good[:9] + b"\xff" + good[10:]
    both(bad_name, InvalidValue, 8, 12)
    bad_version = good[:12] + b"\xfe" + good[13:]
    both(bad_version, InvalidValue, 8, 14)


def test_route_block_lengths_past_the_frame():
    good = _wire.request([[(1, b"x")]], kind=3, route=("ab", "1"))
    for name_len in (200, 255):
        broken = good[:8] + bytes([name_len]) + good[9:]
        with pytest.raises(SIZE_ERRORS):
            mip.decode(broken)
    empty = _wire.header(3, 0, 0)
    with pytest.raises(SIZE_ERRORS):
        mip.decode(empty)
    only_name = _wire.header(3, 0, 3) + b"\x02ab"
    with pytest.raises(SIZE_ERRORS):
        mip.decode(only_name)


def test_kind_two_request_without_inference_header():
    for payload in (b"", b"\x01", b"\x01\x00\x00"):
        frame = _wire.header(2, 0, len(payload)) + payload
        with pytest.raises(SIZE_ERRORS):
            mip.decode(frame)


# -- tensor headers ------------------------------------------------------------


def tensor_value(code=11, dims=(2,), pad=None, flags=0, data=None, ndim=None, value_offset=20):
    ndim = len(dims) if ndim is None else ndim
    if pad is None:
        pad = (-(value_offset + 4 + 4 * len(dims))) % 8
    if data is None:
        data = b"\x00" * (int(np.prod(dims, dtype=np.uint64)) * ITEMSIZE.get(code, 1))
    head = struct.pack("!BBBB", code, ndim, pad, flags) + struct.pack(f"!{len(dims)}I", *dims)
    return head + b"\x00" * pad + data


def tensor_frame(**kw) -> bytes:
    return _single(16, tensor_value(**kw))


def test_tensor_helper_builds_valid_frames():
    for code in ITEMSIZE:
        for dims in ((), (3,), (2, 0), (1, 2, 3)):
            (item,) = mip.decode(tensor_frame(code=code, dims=dims)).batch
            assert item[0].shape == dims


@pytest.mark.parametrize("code", [0, 15, 16, 17, 100, 255])
def test_tensor_bad_dtype(code):
    frame = tensor_frame(code=code, dims=(2,), data=b"\x00" * 8)
    both(frame, InvalidValue, 12, len(frame))


@pytest.mark.parametrize("ndim", [33, 34, 64, 255])
def test_tensor_too_many_dims(ndim):
    frame = tensor_frame(code=2, dims=(1,) * ndim, data=b"\x07")
    both(frame, InvalidValue, 12, len(frame))


@pytest.mark.parametrize("pad", [8, 9, 64, 255])
def test_tensor_pad_out_of_range(pad):
    frame = tensor_frame(code=2, dims=(1,), pad=pad, data=b"\x07")
    both(frame, InvalidValue, 12, len(frame))


@pytest.mark.parametrize("flags", [1, 2, 0x80, 0xFF])
def test_tensor_flags_must_be_zero(flags):
    frame = tensor_frame(code=11, dims=(2,), flags=flags)
    both(frame, InvalidValue, 12, len(frame))


@pytest.mark.parametrize(
    "code,dims,data_len",
    [
        (11, (2,), 7),
        (11, (2,), 9),
        (11, (2,), 0),
        (12, (2, 3), 47),
        (12, (2, 3), 56),
        (2, (0,), 1),
        (2, (4, 0, 2), 3),
        (3, (), 1),
        (3, (), 3),
        (1, (5,), 4),
        (14, (3,), 5),
    ],
)
def test_tensor_dims_do_not_match_data(code, dims, data_len):
    frame = tensor_frame(code=code, dims=dims, data=b"\x01" * data_len)
    both(frame, InvalidValue, 12, len(frame))


def test_tensor_value_too_short_for_its_header():
    for value in (b"", b"\x0b", b"\x0b\x01\x00", b"\x0b\x02\x00\x00\x00\x00\x00\x01"):
        frame = _single(16, value)
        with pytest.raises((InvalidValue, TruncatedFrame)) as info:
            mip.decode(frame)
        check_offset(info.value, 12, len(frame))


def test_tensor_pad_runs_past_the_value():
    value = struct.pack("!BBBB", 2, 1, 7, 0) + struct.pack("!I", 0) + b"\x00" * 3
    frame = _single(16, value)
    with pytest.raises((InvalidValue, TruncatedFrame)):
        mip.decode(frame)


@pytest.mark.parametrize(
    "dims,data",
    [
        ((1,), b""),  # no room for the length
        ((1,), b"\x05\x00\x00"),  # length cut short
        ((1,), b"\x05\x00\x00\x00abcd"),  # element runs past the end
        ((1,), b"\xff\xff\xff\xffabcd"),  # 4 GiB element
        ((2,), b"\x01\x00\x00\x00a"),  # one element missing
        ((1,), b"\x01\x00\x00\x00ab"),  # trailing octet
        ((1,), b"\x01\x00\x00\x00a\x00\x00\x00\x00"),  # an extra element
        ((0,), b"\x00\x00\x00\x00"),  # data for an empty tensor
    ],
)
def test_bytes_tensor_elements_malformed(dims, data):
    frame = tensor_frame(code=13, dims=dims, data=data)
    both(frame, InvalidValue, 12, len(frame))


@pytest.mark.parametrize("code", [2, 11, 12, 13])
@pytest.mark.parametrize(
    "dims",
    [
        (0, 0xFFFFFFFF),
        (0xFFFFFFFF, 0),
        (0xFFFFFFFF, 0xFFFFFFFF, 0),
        (0, 0xFFFFFFFF, 0xFFFFFFFF),
        (0,) + (0xFFFFFFFF,) * 31,
        (0xFFFFFFFF,) * 31 + (0,),
    ],
    ids=lambda d: "x".join(str(x) for x in d[:4]),
)
def test_empty_tensors_with_huge_dims(code, dims):
    """Zero elements, but the other dims are huge: an empty array of that shape or InvalidValue,
    never another exception."""
    frame = tensor_frame(code=code, dims=dims, data=b"")
    try:
        (item,) = mip.decode(frame).batch
    except InvalidValue:
        return
    assert item[0].shape == dims and item[0].size == 0


def test_malformed_tensor_in_a_later_item():
    layout = _wire.inference(ITEMS)
    at = layout.tlv_offsets[7 + 1]  # item 1's FP32 tensor
    value = at + 8
    broken = layout.data[: value + 3] + b"\x01" + layout.data[value + 4 :]  # flags = 1
    both(broken, InvalidValue, at, layout.tlv_ends[8])


def test_error_codes_of_the_classes():
    assert TruncatedFrame("x").error_code == ErrorCode.SHAPE
    assert FrameTooLarge("x").error_code == ErrorCode.MEMORY
    assert UnsupportedVersion("x").error_code == ErrorCode.PROTOCOL
    assert UnknownKind("x").error_code == ErrorCode.METHOD
    assert BadSubtype("x").error_code == ErrorCode.SUBTYPE
    assert InvalidValue("x", offset=3).offset == 3
