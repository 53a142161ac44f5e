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
    "Capability",
    "ZSTD_MAGIC",
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


#: the first octets of a zstd frame: the only data an EVENT is marked COMPRESSED for
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class Flags(enum.IntFlag):
    """MSIP header flags (octet 5). Bits 0-2 are the spec's; the reference ignores the others,
    which mip uses for opt-in extensions (a reference client never sets them):

    * ``AT_LEAST_ONCE`` on SUBSCRIBE: an at-least-once subscription (the session must have
      been granted ``Capability.AT_LEAST_ONCE``);
    * ``ACK_REQUIRED`` on HELLO: the client acknowledges events and wants its session kept
      for the broker's session TTL after a dropped connection;
    * ``PATTERNS`` on HELLO: ``*`` and a final ``>`` in this session's topics are wildcards;
    * ``TAKEOVER`` on HELLO: a connection already using the client id is closed.

    A HELLO with any of these bits set is answered with the client id followed by a u32
    :class:`Capability` set: what the broker grants the session.
    """

    NONE = 0
    ACK_REQUIRED = 1
    COMPRESSED = 2
    URGENT = 4
    AT_LEAST_ONCE = 8
    PATTERNS = 16
    TAKEOVER = 32


class Capability(enum.IntFlag):
    """What a broker of ours grants a session: the u32 after the client id in the HELLO's ACK
    (absent when the HELLO set none of the extension flags, and from the reference broker)."""

    NONE = 0
    AT_LEAST_ONCE = 1  #: event ACKs, redelivery, the session kept after a dropped connection
    PATTERNS = 2  #: wildcard topics
    TAKEOVER = 4  #: the HELLO took the client id over from another connection, if any
