"""The public ``mip.msip`` namespace: the MSIP codec (24-octet header pub/sub frames).

Header (big-endian): magic ``b"MSIP"``, version 1, flags u8, frame_type u16,
msg_kind u16, reserved u16, payload_len u32, msg_id u64.
"""

from __future__ import annotations

import enum

from mip.protocol._msip import (
    DEFAULT_MAX_PAYLOAD,
    HEADER_SIZE,
    MAGIC,
    VERSION,
    Frame,
    FrameParser,
    decode,
    decode_header,
    decode_hello_payload,
    decode_publish_payload,
    encode,
    encode_header,
    encode_hello_payload,
    encode_publish_payload,
)

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "HEADER_SIZE",
    "MAGIC",
    "VERSION",
    "FrameType",
    "MsgKind",
    "Flags",
    "Frame",
    "FrameParser",
    "decode",
    "decode_header",
    "decode_hello_payload",
    "decode_publish_payload",
    "encode",
    "encode_header",
    "encode_hello_payload",
    "encode_publish_payload",
]


class FrameType(enum.IntEnum):
    """MSIP frame types (header octets 6-7)."""

    HELLO = 1
    SUBSCRIBE = 2
    UNSUBSCRIBE = 3
    PUBLISH = 4
    EVENT = 5
    ACK = 6
    ERROR = 7
    PING = 8
    PONG = 9
    CLOSE = 10


class MsgKind(enum.IntEnum):
    """MSIP application message kinds (header octets 8-9)."""

    EVENT = 1
    COMMAND = 2
    STATE = 3
    LOG = 4
    METRIC = 5


class Flags(enum.IntFlag):
    """MSIP header flags (octet 5); other bits are ignored."""

    NONE = 0
    ACK_REQUIRED = 1
    COMPRESSED = 2
    URGENT = 4
