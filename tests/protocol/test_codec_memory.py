"""Reference counting, reads past buffers and receive memory of the codec.

Each test pins down one defect found in the Cython code: values a list held
after their memory was freed, JSON values whose repr raised, numbers read past
the end of a buffer, receive buffers larger than the configured frame limit.
"""

from __future__ import annotations

import gc
import sys
import tracemalloc

import numpy as np
import pytest

import mip
from mip import msip
from mip.errors import InvalidValue
from mip.protocol._jsonnum import parse_numbers, split_numeric_arrays
from mip.protocol._stream import IDLE_SIZE


# ---- Message.rows(): the list holds real, referenced ints ---------------------------
def test_rows_of_a_large_leading_dimension():
    m = mip.decode(mip.encode_request([[np.zeros((1000, 0), np.float32)]]))
    assert m.rows(0) == [1000]


def test_rows_values_are_owned_by_the_list():
    items = [[np.zeros((n, 0), np.float32), "text", np.float32(1.0)] for n in (257, 70000, 1, 0)]
    m = mip.decode(mip.encode_request(items))
    rows = [m.rows(j) for j in range(3)]
    gc.collect()
    # ints made in between reuse freed memory: a list holding freed ints would change
    _ = [int(x) * 3 for x in range(100000, 101000)]
    assert rows == [[257, 70000, 1, 0], [1, 1, 1, 1], [-1, -1, -1, -1]]
    for row in rows[0]:
        assert sys.getrefcount(row) >= 2


def test_rows_repeated_do_not_drain_refcounts():
    m = mip.decode(mip.encode_request([[np.zeros((300, 1), np.uint8)]] * 50))
    for _ in range(2000):
        assert m.rows(0) == [300] * 50


def test_encoding_keeps_its_own_reference_to_each_value():
    """str() of an element of an object array runs Python code while the item is encoded;
    that code may empty the caller's list: the encoder still holds the value it reads."""
    item: list = []

    class Sneaky:
        def __str__(self):
            item.clear()
            return "x" * 100

    arr = np.array([Sneaky(), Sneaky()], dtype=object)
    item.extend([arr, np.arange(300, 600)])
    with pytest.raises(ValueError, match="changed size"):
        mip.encode_request([item])


# ---- Json repr and equality never raise -----------------------------------------------
@pytest.mark.parametrize("data", [b"{bad", b"", b"\xff\xfe", b"[" * 100000, b'"unterminated'])
def test_repr_of_invalid_json_does_not_raise(data):
    frame = mip.encode_request([[mip.Json.from_bytes(data), "x"]])
    m = mip.decode(frame)
    text = repr(m.batch)
    assert "Json.from_bytes(" in text
    with pytest.raises(InvalidValue):
        _ = m.batch[0][0].value


def test_repr_of_valid_json_shows_the_value():
    assert repr(mip.Json.from_bytes(b'{"a": [1, 2]}')) == "Json({'a': [1, 2]})"
    assert repr(mip.Json([1, 2])) == "Json([1, 2])"


def test_invalid_json_compares_by_octets():
    assert mip.Json.from_bytes(b"{bad") == mip.Json.from_bytes(b"{bad")
    assert mip.Json.from_bytes(b"{bad") != mip.Json.from_bytes(b"{worse")
    assert mip.Json.from_bytes(b"{bad") != mip.Json([1])
    assert mip.Json.from_bytes(b"[1]") == mip.Json([1])


# ---- _jsonnum: numbers are read inside their span only ---------------------------------
def _exact_buffer(text: bytes) -> np.ndarray:
    """The octets in memory of exactly their size (no NUL after them, unlike bytes)."""
    return np.frombuffer(text, dtype=np.uint8).copy()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_long_number_at_the_end_of_the_buffer(dtype):
    digits = b"12345678901234567890123"
    got = parse_numbers(_exact_buffer(digits), 0, len(digits), dtype)
    assert got[0] == dtype(float(digits))


def test_long_integer_at_the_end_of_the_buffer_is_out_of_range():
    digits = b"12345678901234567890123"
    with pytest.raises(ValueError, match="out of range"):
        parse_numbers(_exact_buffer(digits), 0, len(digits), np.int64)


def test_number_is_read_only_up_to_the_end_of_its_span():
    body = b"[1,12345678901234567890123]e5"
    assert parse_numbers(body, 0, len(body) - 2, np.float64)[1] == float(b"12345678901234567890123")
    # a span cut inside a number reads the number as it is in the span
    assert parse_numbers(body, 3, 24, np.float64)[0] == float(b"123456789012345678901")


def test_empty_arrays_of_integers():
    for body in (b"[]", b"[[]]", b"[ ]", b"[[ ], [\n]]"):
        got = parse_numbers(body, 0, len(body), np.int32)
        assert got.dtype == np.int32 and got.shape == (0,)


def test_arrays_with_spaces_inside_parse_as_json_does():
    body = b"[ 1 , [ 2 ] , [ ] ]"
    assert parse_numbers(body, 0, len(body), np.int64).tolist() == [1, 2]
    for bad in (b"[1, ]", b"[ , ]", b"[[1] [2]]", b"[1 2]"):
        with pytest.raises(ValueError):
            parse_numbers(bad, 0, len(bad), np.int64)


def test_split_spans_of_spaced_arrays():
    doc = b'{"data": [ ' + b" 1," * 3000 + b" 2 ]}'"
    replaced, spans = split_numeric_arrays(doc[:-1], 4096)
    assert len(spans) == 1
    start, end = spans[0]
    assert parse_numbers(doc, start, end, np.int64).tolist() == [1] * 3000 + [2]


# ---- receive memory of the streaming parsers --------------------------------------------
def _mip_frames(sizes) -> list[bytes]:
    return [mip.encode_request([[np.full(n, 7, np.uint8)]]) for n in sizes]


def _feed_through_buffers(parser, data: bytes, step: int, limit: int, seen: list[int]):
    out = []
    pos = 0
    while pos < len(data):
        buf = parser.get_buffer(-1)
        seen.append(parser.buffer_size)
        assert parser.buffer_size <= limit
        n = min(len(buf), step, len(data) - pos)
        buf[:n] = data[pos:pos + n]
        pos += n
        out += parser.buffer_updated(n)
        assert parser.buffer_size <= limit
    return out


@pytest.mark.parametrize("step", [1, 7, 100, 1000, 5000])
def test_mip_buffer_never_exceeds_max_frame_size(step):
    frames = _mip_frames([0, 10, 500, 1024 - 32, 3, 700])
    assert max(map(len, frames)) == 1024
    parser = mip.FrameParser(max_frame_size=1024)
    assert parser.buffer_size == 0
    seen: list[int] = []
    got = _feed_through_buffers(parser, b"".join(frames), step, 1024, seen)
    assert [m.batch[0][0].size for m in got] == [0, 10, 500, 1024 - 32, 3, 700]
    got = parser.feed(b"".join(frames))
    assert len(got) == 6 and parser.buffer_size <= 1024


def test_msip_buffer_never_exceeds_max_payload_and_header():
    frames = [msip.encode(msip.FrameType.PUBLISH, msip.MsgKind.EVENT, b"p" * n) for n in (0, 1000, 17, 999)]
    parser = msip.FrameParser(max_payload=1000)
    seen: list[int] = []
    for step in (1, 50, 4096):
        got = _feed_through_buffers(parser, b"".join(frames), step, 1000 + msip.HEADER_SIZE, seen)
        assert [f.payload_len for f in got] == [0, 1000, 17, 999]
    got = parser.feed(b"".join(frames) * 3)
    assert len(got) == 12 and parser.buffer_size <= 1024


def test_buffer_is_let_go_after_a_large_frame():
    big = mip.encode_request([[np.ones(1 << 20, np.uint8)]])
    parser = mip.FrameParser()
    sizes: list[int] = []
    (m,) = _feed_through_buffers(parser, big, 1 << 16, mip.DEFAULT_MAX_FRAME_SIZE, sizes)
    assert max(sizes) == len(big)  # the frame got memory of exactly its size
    # the frame is out: the parser holds nothing while the connection waits (asyncio asks
    # for a buffer again only when the next octets arrive); the message keeps its memory
    assert parser.buffer_size == 0
    assert m.batch[0][0].sum() == 1 << 20
    parser.get_buffer(-1)
    assert parser.buffer_size == IDLE_SIZE  # the next read gets the small buffer


def test_idle_connection_holds_no_frame_memory():
    """The memory of a decoded frame is freed once its message is dropped: the parser
    does not keep it for the next read."""
    frame = mip.encode_request([[np.ones(200_000, np.uint8)]])
    tracemalloc.start()
    try:
        parser = mip.FrameParser()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(3):
            (m,) = _feed_through_buffers(parser, frame, 1 << 16, mip.DEFAULT_MAX_FRAME_SIZE, [])
            del m
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert parser.buffer_size == 0
    assert held < 64 * 1024, held


def test_buffer_grows_while_reads_fill_it_and_shrinks_when_quiet():
    stream = b"".join(_mip_frames([100] * 2000))
    parser = mip.FrameParser(chunk_size=65536)
    sizes: list[int] = []
    got = _feed_through_buffers(parser, stream, 1 << 30, 1 << 30, sizes)
    assert len(got) == 2000
    assert sizes[0] == IDLE_SIZE and max(sizes) == 65536  # doubled while every read filled
    del got
    # a read that leaves nothing pending and does not fill its buffer: back to the idle size
    (m,) = parser.buffer_updated(_write(parser, _mip_frames([10])[0]))
    parser.get_buffer(-1)
    assert parser.buffer_size == IDLE_SIZE


def test_a_busy_connection_keeps_reading_in_large_pieces():
    """A read that brought whole frames and left nothing pending sizes the next one (at
    least twice what it brought, in powers of two from the idle size up to chunk_size): a
    pipelining client is not read in idle-sized pieces between its bursts."""
    (frame,) = _mip_frames([3136])  # a 784-float request
    parser = mip.FrameParser(chunk_size=65536)
    sizes = []
    for count in (1, 2, 4, 9, 12, 12):
        buf = parser.get_buffer(-1)
        sizes.append(len(buf))
        data = frame * count
        buf[: len(data)] = data
        assert len(parser.buffer_updated(len(data))) == count
    assert sizes == [IDLE_SIZE, 8192, 16384, 32768, 65536, 65536]
    # one small request: back to the idle size
    (m,) = parser.buffer_updated(_write(parser, _mip_frames([10])[0]))
    parser.get_buffer(-1)
    assert parser.buffer_size == IDLE_SIZE



def test_a_stream_of_frames_just_over_the_idle_size_is_read_in_large_pieces():
    """Frames a little larger than the idle buffer (a 4 KiB EVENT), each read leaving part of
    the next one, the decoded frames let go before the next read: the buffer grows to
    chunk_size rather than staying at two frames, read one frame at a time."""
    frame = msip.encode(5, 1, msip.encode_publish_payload("bench", b"x" * 4096), 1, 0)
    stream = frame * 200
    parser = msip.FrameParser(chunk_size=65536)
    sizes: list[int] = []
    pos = count = 0
    while pos < len(stream):
        buf = parser.get_buffer(-1)
        n = min(len(buf), len(stream) - pos)
        sizes.append(n)
        buf[:n] = stream[pos:pos + n]
        pos += n
        del buf
        count += len(parser.buffer_updated(n))
    assert count == 200
    assert max(sizes) > 60_000 and len(sizes) < 25, sizes

def _write(parser, data: bytes) -> int:
    buf = parser.get_buffer(-1)
    assert len(buf) > len(data)
    buf[: len(data)] = data
    return len(data)


def test_chunk_size_and_max_frame_size_bound_the_idle_buffer():
    parser = mip.FrameParser(max_frame_size=300, chunk_size=256)
    parser.get_buffer(-1)
    assert parser.buffer_size == 256
    parser = mip.FrameParser(max_frame_size=64)
    parser.get_buffer(-1)
    assert parser.buffer_size == 64
    parser = msip.FrameParser(max_payload=0)
    parser.get_buffer(-1)
    assert parser.buffer_size == msip.HEADER_SIZE


def test_idle_parsers_cost_little():
    """A thousand connections waiting for their next request: each parser has handed out
    its receive buffer (as asyncio's BufferedProtocol does) after one request."""
    frame = mip.encode_request([[np.ones(50000, np.float32)]])
    tracemalloc.start()
    try:
        parsers, views = [], []
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(1000):
            p = mip.FrameParser()
            p.feed(frame)  # one request, decoded and dropped
            views.append(p.get_buffer(-1))
            parsers.append(p)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert all(p.buffer_size == IDLE_SIZE for p in parsers)
    # IDLE_SIZE + alignment per parser, plus the objects: far below one 64 KiB buffer each
    assert used < 1000 * (IDLE_SIZE + 2048)


# ---- frames before an error are not lost ----------------------------------------------
@pytest.mark.parametrize("parser, good, count, bad", [
    (lambda: msip.FrameParser(max_payload=8), msip.encode(msip.FrameType.ACK, msip.MsgKind.STATE, msg_id=3), 3,
     msip.encode(msip.FrameType.ERROR, msip.MsgKind.LOG, b"x" * 9)),
    (lambda: mip.FrameParser(max_frame_size=40), mip.encode_ping(), 5,
     mip.encode_request([[np.ones(100, np.uint8)]])),
])
def test_feed_returns_the_frames_before_an_error(parser, good, count, bad):
    """feed() copies in rounds when its input is larger than the buffer: frames of earlier
    rounds come back, the error on the next call."""
    p = parser()
    got = p.feed(good * count + bad)
    assert len(got) == count
    with pytest.raises(mip.ProtocolError):
        p.feed(b"")


def test_trailing_comma_is_refused():
    for bad in (b"1,", b"1, ", b"[1],"):
        with pytest.raises(ValueError, match="after the last ','"):
            parse_numbers(bad, 0, len(bad), np.int64)
