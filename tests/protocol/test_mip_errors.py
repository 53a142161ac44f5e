"""ERROR frames that say why: the optional UTF-8 text after the header (our extension)."""

from __future__ import annotations

import struct

import pytest

import mip
from mip.errors import ErrorCode


def test_bare_error_frame_is_eight_octets_as_before():
    frame = mip.encode_error(ErrorCode.METHOD)
    assert frame == bytes([0, 0, 2, 0, 0, 0, 0, 0])
    m = mip.decode(frame)
    assert (m.error_code, m.error_message) == (2, None)


def test_message_follows_the_header_counted_by_remaining():
    frame = mip.encode_error(ErrorCode.SHAPE, "input 'x' has shape [1, 5], the model wants [-1, 784]")
    version, kind, code, reserved, remaining = struct.unpack(">BBBBI", frame[:8])
    assert (version, kind, code, reserved) == (0, 0, 4, 0)
    assert remaining == len(frame) - 8
    m = mip.decode(frame)
    assert m.error_code == ErrorCode.SHAPE
    assert m.error_message == "input 'x' has shape [1, 5], the model wants [-1, 784]"
    assert "error_message=" in repr(m)


def test_long_messages_are_cut_at_a_character_boundary():
    frame = mip.encode_error(ErrorCode.INTERNAL, "é" * 2000)  # 2 octets each
    assert len(frame) - 8 <= mip.MAX_ERROR_MESSAGE
    text = mip.decode(frame).error_message
    assert set(text) == {"é"} and len(text.encode()) == len(frame) - 8


def test_a_peer_s_invalid_utf8_is_replaced_not_raised():
    frame = bytes([0, 0, 5, 0, 0, 0, 0, 3]) + b"a\xffb"
    assert mip.decode(frame).error_message == "a\ufffdb"


def test_streaming_parser_frames_error_messages():
    frames = mip.encode_error(1, "first") + mip.encode_ping() + mip.encode_error(3, "third")
    parser = mip.FrameParser()
    got = [m for i in range(len(frames)) for m in parser.feed(frames[i:i + 1])]
    assert [(m.kind, m.error_message) for m in got] == [(0, "first"), (1, None), (0, "third")]


def test_code_out_of_range():
    with pytest.raises(ValueError):
        mip.encode_error(256, "x")
