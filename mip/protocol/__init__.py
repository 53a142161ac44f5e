"""The sans-I/O codec core: MIP and MSIP frames, bytes in, messages out.

No sockets, no event loop: transports feed octets to the parsers and send
what the encoders return.
"""

import sys as _sys

if _sys.byteorder != "little":  # tensor data on the wire is little-endian, decoded as views
    raise ImportError("mip's codec needs a little-endian host")

from mip.protocol.dtypes import DATATYPE_NAMES, DATATYPES, numpy_dtype  # noqa: E402
from mip.protocol._mip import (  # noqa: E402
    DEFAULT_COPY_THRESHOLD,
    DEFAULT_MAX_FRAME_SIZE,
    HEADER_SIZE,
    IMAGE,
    JSON,
    KIND_ERROR,
    KIND_INFERENCE,
    KIND_PING,
    KIND_ROUTED,
    REQUEST,
    MAX_ERROR_MESSAGE,
    RESPONSE,
    TENSOR,
    TEXT,
    FrameParser,
    Image,
    Json,
    JsonEncoder,
    Message,
    Text,
    Value,
    bytes_elements,
    datatype_of,
    decode,
    decode_bytes,
    encode_bytes,
    encode_error,
    encode_ping,
    encode_pong,
    encode_request,
    encode_request_buffers,
    encode_response,
    encode_response_buffers,
)
__all__ = [
    "MAX_ERROR_MESSAGE",
    "DATATYPE_NAMES",
    "DATATYPES",
    "DEFAULT_COPY_THRESHOLD",
    "DEFAULT_MAX_FRAME_SIZE",
    "HEADER_SIZE",
    "IMAGE",
    "JSON",
    "KIND_ERROR",
    "KIND_INFERENCE",
    "KIND_PING",
    "KIND_ROUTED",
    "REQUEST",
    "RESPONSE",
    "TENSOR",
    "TEXT",
    "FrameParser",
    "Image",
    "Json",
    "JsonEncoder",
    "Message",
    "Text",
    "Value",
    "bytes_elements",
    "datatype_of",
    "decode",
    "decode_bytes",
    "encode_bytes",
    "encode_error",
    "encode_ping",
    "encode_pong",
    "encode_request",
    "encode_request_buffers",
    "encode_response",
    "encode_response_buffers",
    "numpy_dtype",
]
# `msip` stays out of __all__: `mip` re-exports this list with `*`, and its own `mip.msip`
# namespace (the codec plus Broker, Client, AsyncClient) must not be shadowed by this module.
