"""A pure-Python MIP codec written the way KubeMo's reference code is: the baseline.

KubeMo builds a request in a ``BytesIO`` (``struct.pack('!2BH')`` for the
inference header, ``struct.pack('!2L')`` per TLV, then the value's octets),
prefixes the ``!4BL`` fixed header, and reads a reply back with ``.read()``
calls on ``BytesIO`` objects, each of which copies. This module does the same
and carries numpy tensors as raw TENSOR TLVs (type 16, the layout of
``docs/protocol.md``), so its frames are byte-identical to
``mip.encode_request`` for tensor batches and both decoders read the same bytes.

It is a measuring stick, not a second implementation: it checks little and
supports the fixed-size datatypes only (no BYTES, no BF16).
"""

from __future__ import annotations

import struct
from io import BytesIO
from typing import BinaryIO, Sequence, Tuple

import numpy as np

FIXED_HEADER_FMT = "!4BL"
FIXED_HEADER_LEN = 8
INFERENCE_HEADER_FMT = "!2BH"
INFERENCE_TL_FMT = "!2L"
TENSOR_HEADER_FMT = "!4B"

PROTOCOL_VERSION = 0
RESERVED_BYTE = 0
MESSAGE_INFERENCE = 2
MESSAGE_REQUEST = 0
MESSAGE_RESPONSE = 1
TENSOR = 16

# Triton's TRITONSERVER_DataType numbers, as the tensor TLV uses them.
_CODE_OF_DTYPE = {
    np.dtype(np.bool_): 1,
    np.dtype("<u1"): 2,
    np.dtype("<u2"): 3,
    np.dtype("<u4"): 4,
    np.dtype("<u8"): 5,
    np.dtype("<i1"): 6,
    np.dtype("<i2"): 7,
    np.dtype("<i4"): 8,
    np.dtype("<i8"): 9,
    np.dtype("<f2"): 10,
    np.dtype("<f4"): 11,
    np.dtype("<f8"): 12,
}
_DTYPE_OF_CODE = {code: dt for dt, code in _CODE_OF_DTYPE.items()}


def encode_tensor(arr: np.ndarray, data_offset: int) -> bytes:
    """The TENSOR TLV value for ``arr``; ``data_offset`` is where the value starts
    in the frame (octets from the fixed header), needed to 8-align the data."""
    ndim = arr.ndim
    pad = -(data_offset + 4 + 4 * ndim) % 8
    head = struct.pack(TENSOR_HEADER_FMT, _CODE_OF_DTYPE[arr.dtype], ndim, pad, 0)
    dims = struct.pack("!%dL" % ndim, *arr.shape)
    return head + dims + b"\x00" * pad + arr.tobytes()


def encode_request(batch: Sequence[Sequence[np.ndarray]]) -> bytes:
    """Encode a batch (items of tensors) as one MIP INFERENCE request frame."""
    n_input = len(batch[0])
    header = struct.pack(INFERENCE_HEADER_FMT, n_input, 0, len(batch))
    buffer = BytesIO(header)
    buffer.seek(len(header))

    for inputs in batch:
        if len(inputs) != n_input:
            raise ValueError("inconsistent number of inputs")
        for value in inputs:
            # the value starts after the fixed header, what is written so far and its own TL
            data = encode_tensor(value, FIXED_HEADER_LEN + buffer.tell() + 8)
            tl = struct.pack(INFERENCE_TL_FMT, TENSOR, len(data))
            buffer.write(tl + data)

    buffer.seek(0)
    payload = buffer.read()
    fixed = struct.pack(
        FIXED_HEADER_FMT, PROTOCOL_VERSION, MESSAGE_INFERENCE, MESSAGE_REQUEST, RESERVED_BYTE, len(payload)
    )
    return fixed + payload


def decode_single_input(reader: BinaryIO) -> Tuple[int, BinaryIO]:
    """Read one TLV: its type and a reader over its value (a copy, as KubeMo does)."""
    value_type, value_size = struct.unpack(INFERENCE_TL_FMT, reader.read(8))
    return value_type, BytesIO(reader.read(value_size))


def decode_tensor(reader: BinaryIO) -> np.ndarray:
    """Read a TENSOR TLV value into an array over a copy of its data."""
    code, ndim, pad, _flags = struct.unpack(TENSOR_HEADER_FMT, reader.read(4))
    dims = struct.unpack("!%dL" % ndim, reader.read(4 * ndim))
    reader.read(pad)
    return np.frombuffer(reader.read(), dtype=_DTYPE_OF_CODE[code]).reshape(dims)


def decode(frame: bytes) -> Tuple[int, int, Tuple[Tuple[object, ...], ...]]:
    """Decode an INFERENCE frame: ``(subtype, n_input, batch)``.

    Tensors come back as arrays; other values as ``(type, bytes)``.
    """
    reader = BytesIO(frame)
    version, kind, subtype, _, remaining = struct.unpack(FIXED_HEADER_FMT, reader.read(FIXED_HEADER_LEN))
    if version != PROTOCOL_VERSION or kind != MESSAGE_INFERENCE:
        raise ValueError("not a MIP INFERENCE frame")

    reader = BytesIO(reader.read(remaining))
    n_input, n_output, batch_size = struct.unpack(INFERENCE_HEADER_FMT, reader.read(4))
    per_item = n_input if subtype == MESSAGE_REQUEST else n_output

    batch = []
    for _ in range(batch_size):
        item = []
        for _ in range(per_item):
            value_type, value = decode_single_input(reader)
            item.append(decode_tensor(value) if value_type == TENSOR else (value_type, value.read()))
        batch.append(tuple(item))
    return subtype, n_input, tuple(batch)
