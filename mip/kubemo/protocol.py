"""MIP constants under the names the ``kubemo.protocol`` module gives them.

Only the names a model or client file uses; the codec itself is ``mip``.
"""

from __future__ import annotations

__all__ = [
    "FIXED_HEADER_FMT", "FIXED_HEADER_LEN", "PROTOCOL_VERSION", "RESERVED_BYTE",
    "MESSAGE_ERROR", "MESSAGE_PING", "MESSAGE_INFERENCE", "MESSAGE_REQUEST", "MESSAGE_RESPONSE",
    "ERROR_PROTOCOL", "ERROR_SUBTYPE", "ERROR_METHOD", "ERROR_MEMORY", "ERROR_SHAPE",
    "ERROR_INTERNAL", "INFERENCE_HEADER_FMT", "INFERENCE_TL_FMT", "TEXT", "JSON", "IMAGE",
]

FIXED_HEADER_FMT = "!4BL"  #: version, kind, subtype, reserved, remaining size (octets)
FIXED_HEADER_LEN = 8  #: octets
PROTOCOL_VERSION = 0
RESERVED_BYTE = 0

MESSAGE_ERROR = 0
MESSAGE_PING = 1
MESSAGE_INFERENCE = 2

MESSAGE_REQUEST = 0
MESSAGE_RESPONSE = 1

ERROR_PROTOCOL = 0
ERROR_SUBTYPE = 1
ERROR_METHOD = 2
ERROR_MEMORY = 3
ERROR_SHAPE = 4
ERROR_INTERNAL = 5

INFERENCE_HEADER_FMT = "!2BH"  #: n-input, n-output, batch size
INFERENCE_TL_FMT = "!2L"  #: value type, value size (octets)

TEXT = 1
JSON = 2
IMAGE = 3
