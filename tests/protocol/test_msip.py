"""MSIP frames: golden bytes from the spec, round trips, the streaming parser, malformed input."""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mip import msip
from mip.errors import (
    BadMagic,
    FrameTooLarge,
    InconsistentCounts,
    InvalidValue,
    ProtocolError,
    TruncatedFrame,
    UnknownFrameType,
    UnknownMessageKind,
    UnsupportedVersion,
)

from . import _wire
from ._parsers import expect_error
from ._values import FAST, QUICK

ROOT = Path(__file__).resolve().parents[2]

FRAME_TYPES = {
    "HELLO": 1,
    "SUBSCRIBE": 2,
    "UNSUBSCRIBE": 3,
    "PUBLISH": 4,
    "EVENT": 5,
    "ACK": 6,
    "ERROR": 7,
    "PING": 8,
    "PONG": 9,
    "CLOSE": 10,
}
MSG_KINDS = {"EVENT": 1, "COMMAND": 2, "STATE": 3, "LOG": 4, "METRIC": 5}


def summary(frame):
    return (frame.frame_type, frame.msg_kind, frame.flags, frame.msg_id, bytes(frame.payload))


# -- constants and golden bytes ---------------------------------------------


def test_constants():
    assert msip.HEADER_SIZE == 24
    assert msip.MAGIC == b"MSIP"
    assert msip.VERSION == 1
    assert {t.name: int(t) for t in msip.FrameType} == FRAME_TYPES
    assert {k.name: int(k) for k in msip.MsgKind} == MSG_KINDS
    assert (int(msip.Flags.ACK_REQUIRED), int(msip.Flags.COMPRESSED), int(msip.Flags.URGENT)) == (1, 2, 4)


def test_hello_hex():
    golden = bytes.fromhex(
        "4d534950"  # magic "MSIP"
        "01"  # version 1
        "01"  # flags: ACK_REQUIRED
        "0001"  # frame_type HELLO
        "0003"  # msg_kind STATE
        "0000"  # reserved
        "00000008"  # payload_len
        "0000000000000005"  # msg_id
        "000000000000002a"  # payload: client id 42
    )
    payload = msip.encode_hello_payload(42)
    assert payload == bytes.fromhex("000000000000002a")
    frame = msip.encode(msip.FrameType.HELLO, msip.MsgKind.STATE, payload, msg_id=5,
                        flags=msip.Flags.ACK_REQUIRED)
    assert frame == golden
    assert msip.encode(1, 3, payload, 5, 1) == golden
    f = msip.decode(golden)
    assert summary(f) == (1, 3, 1, 5, payload)
    assert f.frame_type == msip.FrameType.HELLO and f.msg_kind == msip.MsgKind.STATE
    assert isinstance(f.payload, memoryview)


def test_publish_hex():
    golden = bytes.fromhex(
        "4d534950 01 04 0004 0001 0000 00000009 ffffffffffffffff"  # URGENT, PUBLISH, EVENT
        "0004" + b"a/bc".hex() + b"xyz".hex()
    )
    payload = msip.encode_publish_payload("a/bc", b"xyz")
    assert payload == bytes.fromhex("0004") + b"a/bcxyz"
    assert msip.encode(4, 1, payload, msg_id=2**64 - 1, flags=4) == golden
    f = msip.decode(golden)
    assert summary(f) == (4, 1, 4, 2**64 - 1, payload)
    topic, data = msip.decode_publish_payload(f.payload)
    assert topic == "a/bc" and bytes(data) == b"xyz"
    assert isinstance(data, memoryview)


def test_ping_header_hex():
    golden = bytes.fromhex("4d534950 01 00 0008 0001 0000 00000000 0000000000000001")
    assert msip.encode(msip.FrameType.PING, msip.MsgKind.EVENT, msg_id=1) == golden
    assert msip.encode_header(8, 1, 0, msg_id=1) == golden
    assert summary(msip.decode(golden)) == (8, 1, 0, 1, b"")


@pytest.mark.parametrize("frame_type", list(FRAME_TYPES.values()))
@pytest.mark.parametrize("msg_kind", list(MSG_KINDS.values()))
def test_every_frame_type_and_kind(frame_type, msg_kind):
    payload = bytes([frame_type, msg_kind]) * frame_type
    msg_id = frame_type * 1000 + msg_kind
    flags = (frame_type + msg_kind) % 8
    golden = _wire.msip(frame_type, msg_kind, payload, msg_id, flags)
    assert golden[:4] == b"MSIP" and len(golden) == 24 + len(payload)
    assert msip.encode(frame_type, msg_kind, payload, msg_id, flags) == golden
    assert msip.encode_header(frame_type, msg_kind, len(payload), msg_id, flags) == golden[:24]
    assert summary(msip.decode(golden)) == (frame_type, msg_kind, flags, msg_id, payload)


def test_encode_accepts_bytes_like_payloads():
    for payload in (bytearray(b"abc"), memoryview(b"abc")):
        assert msip.encode(5, 1, payload) == _wire.msip(5, 1, b"abc")


def test_reference_reply_shapes():
    """The reply frames the reference broker sends, spelled with struct."""
    ack = _wire.msip(6, 3, struct.pack("!Q", 1), msg_id=9)
    assert msip.encode(msip.FrameType.ACK, msip.MsgKind.STATE, msip.encode_hello_payload(1), 9) == ack
    pong = _wire.msip(9, 1, b"", msg_id=77)
    assert msip.encode(msip.FrameType.PONG, msip.MsgKind.EVENT, msg_id=77) == pong
    err = _wire.msip(7, 1, "unknown topic ✓".encode())
    assert msip.encode(7, 1, "unknown topic ✓".encode()) == err


def test_hello_payload_helpers():
    assert msip.encode_hello_payload() == b""
    assert msip.encode_hello_payload(None) == b""
    assert msip.encode_hello_payload(0) == bytes(8)
    assert msip.encode_hello_payload(2**64 - 1) == b"\xff" * 8
    assert msip.encode_hello_payload(7, b"tok") == struct.pack("!Q", 7) + b"tok"
    assert msip.decode_hello_payload(b"") == (None, None)
    cid, token = msip.decode_hello_payload(struct.pack("!Q", 123))
    assert cid == 123 and token in (None, b"")
    cid, token = msip.decode_hello_payload(struct.pack("!Q", 5) + b"secret")
    assert cid == 5 and bytes(token) == b"secret"
    # Shorter than a client id: the reference broker reads it as "new session".
    try:
        assert msip.decode_hello_payload(b"\x00\x01\x02") == (None, None)
    except ProtocolError:
        pass


def test_publish_payload_helpers():
    assert msip.encode_publish_payload("", b"") == b"\x00\x00"
    assert msip.encode_publish_payload("é", b"\x00") == b"\x00\x02\xc3\xa9\x00"
    topic, data = msip.decode_publish_payload(b"\x00\x02\xc3\xa9\x00")
    assert topic == "é" and bytes(data) == b"\x00"
    long_topic = "t" * 65535
    topic, data = msip.decode_publish_payload(msip.encode_publish_payload(long_topic, b"d"))
    assert topic == long_topic and bytes(data) == b"d"
    with pytest.raises((ValueError, OverflowError)):
        msip.encode_publish_payload("t" * 65536, b"")
    for bad in (b"", b"\x00", b"\x00\x05abc"):
        with pytest.raises((TruncatedFrame, InvalidValue)):
            msip.decode_publish_payload(bad)
    with pytest.raises(InvalidValue):
        msip.decode_publish_payload(b"\x00\x02\xff\xfedata")


# -- round trips ---------------------------------------------------------------

frames = st.tuples(
    st.sampled_from(list(FRAME_TYPES.values())),
    st.sampled_from(list(MSG_KINDS.values())),
    st.binary(max_size=200),
    st.integers(0, 2**64 - 1),
    st.integers(0, 7),
)


@FAST
@given(frames)
def test_round_trip(spec):
    frame_type, msg_kind, payload, msg_id, flags = spec
    data = msip.encode(frame_type, msg_kind, payload, msg_id, flags)
    assert data == _wire.msip(frame_type, msg_kind, payload, msg_id, flags)
    assert summary(msip.decode(data)) == spec[:2] + (flags, msg_id, payload)


@FAST
@given(st.text(max_size=30), st.binary(max_size=50))
def test_publish_payload_round_trip(topic, data):
    payload = msip.encode_publish_payload(topic, data)
    assert payload == struct.pack("!H", len(topic.encode())) + topic.encode() + data
    got_topic, got_data = msip.decode_publish_payload(payload)
    assert got_topic == topic and bytes(got_data) == data


def test_unknown_flag_bits_are_ignored():
    for flags in (8, 0x80, 0xFF):
        f = msip.decode(_wire.msip(5, 1, b"x", 3, flags))
        assert f.flags & 7 == flags & 7
        assert bytes(f.payload) == b"x"


# -- streaming parser ----------------------------------------------------------

STREAM = [
    _wire.msip(1, 3, struct.pack("!Q", 9), 1, 1),
    _wire.msip(2, 2, b"sensors/#", 2, 1),
    _wire.msip(4, 1, b"\x00\x07sensors" + bytes(range(256)) * 40, 3, 0),
    _wire.msip(8, 1, b"", 4),
    _wire.msip(5, 5, b"\x00\x01m{}", 5, 2),
    _wire.msip(10, 2, b"", 6),
    _wire.msip(7, 4, b"odd length!", 7),
]
WHOLE = b"".join(STREAM)
EXPECTED = [summary(msip.decode(f)) for f in STREAM]


def feed_via_buffer(parser, data: bytes, chunk: int, sizehint: int):
    out = []
    pos = 0
    while pos < len(data):
        buf = parser.get_buffer(sizehint)
        assert isinstance(buf, memoryview) and not buf.readonly and len(buf) > 0
        n = min(len(buf), chunk, len(data) - pos)
        buf[:n] = data[pos : pos + n]
        out += parser.buffer_updated(n)
        pos += n
    return out


def test_parser_whole_and_all_at_once():
    parser = msip.FrameParser()
    got = []
    for f in STREAM:
        got += parser.feed(f)
    assert [summary(f) for f in got] == EXPECTED
    assert [summary(f) for f in msip.FrameParser().feed(WHOLE)] == EXPECTED


def test_parser_one_octet_at_a_time():
    parser = msip.FrameParser()
    got = []
    for i in range(len(WHOLE)):
        got += parser.feed(WHOLE[i : i + 1])
    assert [summary(f) for f in got] == EXPECTED


@FAST
@given(st.lists(st.integers(0, len(WHOLE)), max_size=30))
def test_parser_random_splits(cuts):
    parser = msip.FrameParser()
    got, prev = [], 0
    for cut in [*sorted(cuts), len(WHOLE)]:
        got += parser.feed(WHOLE[prev:cut])
        prev = cut
    assert [summary(f) for f in got] == EXPECTED


@QUICK
@given(st.integers(1, 20000), st.sampled_from([-1, 0, 1, 24, 65536]))
def test_parser_get_buffer(chunk, sizehint):
    parser = msip.FrameParser()
    assert [summary(f) for f in feed_via_buffer(parser, WHOLE, chunk, sizehint)] == EXPECTED


def test_parser_payloads_survive_later_feeds():
    parser = msip.FrameParser()
    first = parser.feed(WHOLE)
    snapshot = [bytes(f.payload) for f in first]
    for _ in range(20):
        assert len(feed_via_buffer(parser, WHOLE, 4096, -1)) == len(STREAM)
        assert len(parser.feed(WHOLE)) == len(STREAM)
    assert [bytes(f.payload) for f in first] == snapshot


def test_parser_copies_incomplete_input():
    frame = STREAM[2]
    parser = msip.FrameParser()
    scratch = bytearray(frame[:100])
    assert parser.feed(scratch) == []
    scratch[:] = b"\x00" * 100
    (f,) = parser.feed(frame[100:])
    assert summary(f) == EXPECTED[2]


def test_parser_max_payload():
    parser = msip.FrameParser(max_payload=1000)
    assert len(parser.feed(_wire.msip(4, 1, b"x" * 1000))) == 1
    expect_error(parser, _wire.msip(4, 1, payload_len=1001), FrameTooLarge)
    expect_error(msip.FrameParser(), _wire.msip(4, 1, payload_len=16 * 1024 * 1024 + 1), FrameTooLarge)


def test_parser_oversized_claim_does_not_allocate():
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        for limit in (1 << 10, 16 << 20):
            expect_error(msip.FrameParser(max_payload=limit), _wire.msip(4, 1, payload_len=0xFFFFFFFF), FrameTooLarge)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 512 * 1024


def test_parser_errors_after_good_frames():
    parser = msip.FrameParser()
    got = parser.feed(STREAM[0] + STREAM[3] + b"MSIQ" + STREAM[3][4:])
    assert [summary(f) for f in got] == [EXPECTED[0], EXPECTED[3]]
    with pytest.raises(BadMagic):
        parser.feed(b"")


# -- malformed -------------------------------------------------------------------

GOOD = _wire.msip(4, 1, b"\x00\x01tdata", 99, 1)


def decode_error(data, expected):
    with pytest.raises(expected) as info:
        msip.decode(data)
    assert isinstance(info.value, ProtocolError)
    return info.value


@pytest.mark.parametrize("magic", [b"MSIQ", b"msip", b"\x00\x00\x00\x00", b"MBUS", b"PISM"])
def test_bad_magic(magic):
    bad = magic + GOOD[4:]
    exc = decode_error(bad, BadMagic)
    assert exc.offset is not None and 0 <= exc.offset < 4
    expect_error(msip.FrameParser(), bad, BadMagic)


@pytest.mark.parametrize("version", [0, 2, 0xFF])
def test_bad_version(version):
    bad = _wire.msip(4, 1, b"\x00\x01tdata", 99, 1, version=version)
    exc = decode_error(bad, UnsupportedVersion)
    assert exc.offset == 4
    expect_error(msip.FrameParser(), bad, UnsupportedVersion)


@pytest.mark.parametrize("frame_type", [0, 11, 12, 0x100, 0xFFFF])
def test_unknown_frame_type(frame_type):
    bad = _wire.msip(frame_type, 1, b"x")
    exc = decode_error(bad, UnknownFrameType)
    assert exc.offset in (6, 7)
    expect_error(msip.FrameParser(), bad, UnknownFrameType)


@pytest.mark.parametrize("msg_kind", [0, 6, 7, 0x100, 0xFFFF])
def test_unknown_msg_kind(msg_kind):
    bad = _wire.msip(5, msg_kind, b"x")
    exc = decode_error(bad, UnknownMessageKind)
    assert exc.offset in (8, 9)
    expect_error(msip.FrameParser(), bad, UnknownMessageKind)


def test_truncated_at_every_offset():
    for cut in range(len(GOOD)):
        exc = decode_error(GOOD[:cut], TruncatedFrame)
        assert exc.offset is not None
        parser = msip.FrameParser()
        assert parser.feed(GOOD[:cut]) == []
        (f,) = parser.feed(GOOD[cut:])
        assert summary(f) == summary(msip.decode(GOOD))


def test_payload_len_lies():
    longer = _wire.msip(4, 1, b"\x00\x01tdata", payload_len=8)
    decode_error(longer, TruncatedFrame)
    shorter = _wire.msip(4, 1, b"\x00\x01tdata", payload_len=6)
    decode_error(shorter, InconsistentCounts)
    decode_error(GOOD + b"\x00", InconsistentCounts)
    decode_error(GOOD + GOOD, InconsistentCounts)
    with pytest.raises((TruncatedFrame, FrameTooLarge)):
        msip.decode(_wire.msip(4, 1, payload_len=0xFFFFFFFF))


def test_parser_buffer_updated_and_failed_state():
    parser = msip.FrameParser()
    buf = parser.get_buffer(-1)
    with pytest.raises(ValueError):
        parser.buffer_updated(len(buf) + 1)
    parser = msip.FrameParser()
    expect_error(parser, b"XSIP" + GOOD[4:], BadMagic)
    with pytest.raises(ProtocolError):
        parser.feed(GOOD)


@pytest.mark.parametrize("frame_type,msg_kind", [(0, 1), (11, 1), (0xFFFF, 1), (1, 0), (1, 6), (1, 0xFFFF)])
def test_encoder_never_writes_what_its_decoder_rejects(frame_type, msg_kind):
    """An undefined frame type or msg_kind is refused when encoding, or the frame still decodes."""
    try:
        data = msip.encode(frame_type, msg_kind, b"")
    except (ValueError, TypeError):
        return
    msip.decode(data)


@pytest.mark.parametrize("statement", [
    "import mip\nfrom mip import msip",
    "from mip import msip",
    "import mip.msip as msip",
    "import mip\nmsip = mip.msip",
])
def test_one_msip_namespace_however_it_is_imported(statement):
    """`mip.msip` is the codec plus Broker, Client and AsyncClient, whichever import reaches it
    (a fresh interpreter each time: the order of imports is what used to break it)."""
    check = statement + textwrap.dedent("""
        from mip.net.msip_broker import Broker
        from mip.net.msip_client import AsyncClient, Client
        assert msip.Broker is Broker and msip.Client is Client and msip.AsyncClient is AsyncClient
        assert msip.decode(msip.encode(8, 1, b"", 3)).msg_id == 3
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
