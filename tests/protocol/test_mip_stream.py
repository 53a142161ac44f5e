"""The MIP streaming parser: every way of delivering the same octets gives the same messages."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mip
from mip.errors import FrameTooLarge, ProtocolError, UnknownKind, UnsupportedVersion

from . import _wire
from ._parsers import expect_error
from ._values import FAST, QUICK, batches, expected_batch, mip_batch, observed_batch, ref_batch, tensors_in

ITEMS = [
    [("text", "first"), ("tensor", np.arange(6, dtype=np.float32).reshape(2, 3)), ("json", {"k": [1, 2]})],
    [("text", "second ✓"), ("tensor", np.arange(6, dtype=np.float32).reshape(2, 3) * -1), ("json", None)],
]
TENSORS = [[("tensor", np.arange(n, dtype=np.int64)), ("tensor", np.array([b"ab", b"c"], dtype=object))]
           for n in (1, 3)]


def corpus() -> list[bytes]:
    """Hand-built frames of every kind, lengths deliberately not multiples of 8."""
    return [
        _wire.ping(),
        _wire.request(_refs(ITEMS)),
        _wire.error(4),
        _wire.response(_refs(TENSORS), n_input=2),
        _wire.request([[(1, b"odd")]], kind=3, route=("net", "")),
        _wire.pong(),
        _wire.request(_refs([[("tensor", np.arange(20000, dtype=np.float64))]])),
        _wire.response([[(3, b"\x89PNG....")]], n_input=1, kind=3),
        _wire.request([[(1, b"x")]]),
    ]


def _refs(items):
    return ref_batch(items)


def summary(m):
    return (
        m.kind,
        m.subtype,
        m.error_code,
        m.model,
        m.version,
        m.n_input if m.kind >= 2 else None,
        m.n_output if m.kind >= 2 else None,
        observed_batch(m),
    )


STREAM = corpus()
WHOLE = b"".join(STREAM)
EXPECTED = [summary(mip.decode(f)) for f in STREAM]


def feed_chunks(parser, data: bytes, cuts):
    out = []
    prev = 0
    for cut in [*sorted(cuts), len(data)]:
        out += parser.feed(data[prev:cut])
        prev = cut
    return out


def feed_via_buffer(parser, data: bytes, chunk: int, sizehint: int):
    out = []
    pos = 0
    while pos < len(data):
        buf = parser.get_buffer(sizehint)
        assert isinstance(buf, memoryview)
        assert not buf.readonly
        assert len(buf) > 0
        n = min(len(buf), chunk, len(data) - pos)
        buf[:n] = data[pos : pos + n]
        out += parser.buffer_updated(n)
        pos += n
    return out


def test_decode_agrees_with_the_corpus():
    assert EXPECTED[1][7] == expected_batch(ITEMS)
    assert EXPECTED[3][7] == expected_batch(TENSORS)


def test_feed_each_frame_whole():
    parser = mip.FrameParser()
    got = []
    for frame in STREAM:
        got += parser.feed(frame)
    assert [summary(m) for m in got] == EXPECTED


def test_feed_all_frames_at_once():
    parser = mip.FrameParser()
    assert [summary(m) for m in parser.feed(WHOLE)] == EXPECTED
    assert parser.feed(b"") == []


def test_feed_one_octet_at_a_time():
    parser = mip.FrameParser()
    got = []
    small = b"".join(f for f in STREAM if len(f) < 1000)
    for i in range(len(small)):
        got += parser.feed(small[i : i + 1])
    assert [summary(m) for m in got] == [e for f, e in zip(STREAM, EXPECTED) if len(f) < 1000]


def test_big_frame_one_octet_at_a_time_through_get_buffer():
    parser = mip.FrameParser()
    got = feed_via_buffer(parser, WHOLE[:2000], 1, -1)
    got += feed_via_buffer(parser, WHOLE[2000:], 4093, -1)
    assert [summary(m) for m in got] == EXPECTED


@FAST
@given(st.lists(st.integers(0, len(WHOLE)), max_size=40))
def test_random_splits(cuts):
    parser = mip.FrameParser()
    assert [summary(m) for m in feed_chunks(parser, WHOLE, cuts)] == EXPECTED


@FAST
@given(st.integers(1, 70000), st.sampled_from([-1, 0, 1, 7, 4096, 65536, 1 << 20]))
def test_get_buffer_and_buffer_updated(chunk, sizehint):
    parser = mip.FrameParser()
    assert [summary(m) for m in feed_via_buffer(parser, WHOLE, chunk, sizehint)] == EXPECTED


@QUICK
@given(st.lists(st.booleans(), min_size=1, max_size=30), st.randoms(use_true_random=False))
def test_mixing_feed_and_get_buffer(choices, rnd):
    parser = mip.FrameParser()
    got, pos, i = [], 0, 0
    while pos < len(WHOLE):
        n = min(rnd.randint(1, 30000), len(WHOLE) - pos)
        if choices[i % len(choices)]:
            got += parser.feed(WHOLE[pos : pos + n])
        else:
            got += feed_via_buffer(parser, WHOLE[pos : pos + n], n, n)
        pos += n
        i += 1
    assert [summary(m) for m in got] == EXPECTED


@QUICK
@given(batches(max_items=3, max_width=3), st.lists(st.integers(0, 10**6), max_size=8))
def test_random_batches_through_the_parser(items, cuts):
    frame = mip.encode_request(mip_batch(items))
    cuts = [c % (len(frame) + 1) for c in cuts]
    (m,) = feed_chunks(mip.FrameParser(), frame, cuts)
    assert observed_batch(m) == expected_batch(items)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_feed_accepts_any_bytes_like(kind):
    parser = mip.FrameParser()
    got = []
    for frame in STREAM:
        got += parser.feed(kind(frame))
    assert [summary(m) for m in got] == EXPECTED


def test_parser_copies_incomplete_input():
    """A transport may reuse its read buffer: the parser must not keep views of it."""
    frame = STREAM[1]
    parser = mip.FrameParser()
    for cut in (5, 30, len(frame) - 1):
        scratch = bytearray(frame[:cut])
        assert parser.feed(memoryview(scratch)) == []
        scratch[:] = b"\xee" * len(scratch)
        (m,) = parser.feed(frame[cut:])
        assert summary(m) == EXPECTED[1]


def test_tensors_survive_later_feeds():
    parser = mip.FrameParser()
    kept = []
    for m in parser.feed(WHOLE):
        kept += tensors_in(m)
    snapshot = [np.array(t, copy=True) for t in kept]
    for _ in range(6):  # push several MiB through the same parser
        late = feed_via_buffer(parser, WHOLE, 65536, -1)
        assert len(late) == len(STREAM)
        assert len(parser.feed(WHOLE)) == len(STREAM)
    for t, s in zip(kept, snapshot):
        if t.dtype == object:
            assert [bytes(x) for x in t.ravel()] == [bytes(x) for x in s.ravel()]
        else:
            assert t.tobytes() == s.tobytes()
    assert tensors_in(late[6])[0].tolist() == list(range(20000))


def test_parser_tensors_own_their_memory_exclusively():
    """Parser memory is handed to one message only: its tensors are writable views,
    and writing into one message never shows in another or in later frames."""
    parser = mip.FrameParser()
    first = feed_via_buffer(parser, WHOLE, 100000, -1)
    second = feed_via_buffer(parser, WHOLE, 100000, -1)
    before = [[t.tobytes() for t in tensors_in(m) if t.dtype != object] for m in second]
    for m in first:
        for t in tensors_in(m):
            if t.dtype != object and t.size:
                assert t.flags.writeable and not t.flags.owndata
                t.view(np.uint8)[...] = 0xA5
    after = [[t.tobytes() for t in tensors_in(m) if t.dtype != object] for m in second]
    assert after == before


def test_parser_tensors_are_aligned_to_their_item_size():
    """Frames follow each other at arbitrary offsets in the stream; data must still be aligned."""
    for deliver in ("feed", "buffer"):
        parser = mip.FrameParser()
        stream = b"".join([_wire.request([[(1, b"abc")]]), STREAM[3], _wire.pong(), STREAM[6], STREAM[1]])
        got = parser.feed(stream) if deliver == "feed" else feed_via_buffer(parser, stream, 333, -1)
        tensors = [t for m in got for t in tensors_in(m) if t.dtype != object]
        assert len(tensors) == 5
        for t in tensors:
            assert t.ctypes.data % t.dtype.itemsize == 0, (deliver, t.dtype)
            assert t.flags.aligned


def test_nothing_before_a_full_frame():
    for frame in STREAM:
        parser = mip.FrameParser()
        limit = min(len(frame) - 1, 600)
        for cut in range(limit):
            assert parser.feed(frame[cut : cut + 1]) == []
        (m,) = parser.feed(frame[limit:])
        assert summary(m) == summary(mip.decode(frame))


def test_errors_come_after_the_good_messages():
    bad = bytes.fromhex("00 09 00 00 00000000")  # unknown kind 9
    parser = mip.FrameParser()
    first = parser.feed(STREAM[1] + STREAM[0] + bad)
    assert [summary(m) for m in first] == EXPECTED[1:2] + EXPECTED[0:1]
    with pytest.raises(UnknownKind):
        parser.feed(b"")

    expect_error(mip.FrameParser(), bytes.fromhex("07 02 00 00 00000000"), UnsupportedVersion)

    parser = mip.FrameParser()
    buf = parser.get_buffer(-1)
    data = STREAM[0] + bad
    buf[: len(data)] = data
    assert [summary(m) for m in parser.buffer_updated(len(data))] == EXPECTED[0:1]
    with pytest.raises(UnknownKind):
        parser.feed(b"")


def test_max_frame_size_is_enforced_on_the_header():
    parser = mip.FrameParser(max_frame_size=4096)
    small = _wire.request([[(1, b"a" * 100)]])
    assert len(parser.feed(small)) == 1
    big_header = _wire.header(2, 0, 100_000)
    err = expect_error(parser, big_header, FrameTooLarge)  # the payload never needs to arrive
    assert isinstance(err, ProtocolError)
    assert err.error_code == mip.ErrorCode.MEMORY


def test_default_limit_is_64_mib():
    expect_error(mip.FrameParser(), _wire.header(2, 0, 64 * 1024 * 1024 + 1), FrameTooLarge)
    parser = mip.FrameParser()
    assert parser.feed(_wire.header(2, 0, 1024 * 1024)) == []  # a 1 MiB frame is fine


def test_buffer_updated_rejects_counts_it_did_not_hand_out():
    for bad in (lambda n: n + 1, lambda n: -1, lambda n: 1 << 40):
        parser = mip.FrameParser()
        buf = parser.get_buffer(-1)
        with pytest.raises(ValueError):
            parser.buffer_updated(bad(len(buf)))


def test_parser_stays_failed_after_an_error():
    parser = mip.FrameParser()
    expect_error(parser, bytes.fromhex("00 02 07 00 00000000"), ProtocolError)
    for _ in range(2):
        with pytest.raises(ProtocolError):
            parser.feed(STREAM[0])


def test_max_frame_size_counts_the_whole_frame_like_decode():
    frame = STREAM[1]
    for limit in (len(frame), len(frame) + 1):
        assert len(mip.FrameParser(max_frame_size=limit).feed(frame)) == 1
        mip.decode(frame, max_frame_size=limit)
    expect_error(mip.FrameParser(max_frame_size=len(frame) - 1), frame, FrameTooLarge)
    with pytest.raises(FrameTooLarge):
        mip.decode(frame, max_frame_size=len(frame) - 1)
