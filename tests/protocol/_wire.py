"""A reference encoder written from the wire specification with ``struct`` only.

Nothing here imports ``mip``: these builders are the independent side of every
golden test. They follow docs of the MIP wire (KubeMo's ``protocol.py`` and
``client.py``: ``!BBBBI`` header, ``!BBH`` inference header, ``!II`` TLVs), the
routed kind 3 block and our tensor TLV (type 16), and the MSIP 24-octet header.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np

FIXED_HEADER = struct.Struct("!BBBBI")
INFERENCE_HEADER = struct.Struct("!BBH")
TLV_HEADER = struct.Struct("!II")
MSIP_HEADER = struct.Struct("!4sBBHHHIQ")

KIND_ERROR, KIND_PING, KIND_INFERENCE, KIND_ROUTED = 0, 1, 2, 3
REQUEST, RESPONSE = 0, 1
TEXT, JSON, IMAGE, TENSOR = 1, 2, 3, 16

# Triton's TRITONSERVER_DataType numbering, as the tensor TLV uses it.
DTYPE_CODES: dict[str, int] = {
    "BOOL": 1,
    "UINT8": 2,
    "UINT16": 3,
    "UINT32": 4,
    "UINT64": 5,
    "INT8": 6,
    "INT16": 7,
    "INT32": 8,
    "INT64": 9,
    "FP16": 10,
    "FP32": 11,
    "FP64": 12,
    "BYTES": 13,
    "BF16": 14,
}

NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}


def dtype_name(dtype: np.dtype) -> str:
    """The wire name of a numpy dtype, whatever its byte order."""
    dtype = np.dtype(dtype)
    if dtype == np.dtype(ml_dtypes.bfloat16):
        return "BF16"
    if dtype.kind == "O":
        return "BYTES"
    little = dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype
    for name, candidate in NUMPY_DTYPES.items():
        if candidate.kind != "O" and little == candidate:
            return name
    raise KeyError(dtype)


def le_bytes(arr: np.ndarray) -> bytes:
    """Row-major little-endian octets of a numeric array."""
    if arr.dtype.byteorder == ">":
        arr = arr.byteswap().view(arr.dtype.newbyteorder("<"))
    return np.ascontiguousarray(arr).tobytes(order="C")


# -- MIP ---------------------------------------------------------------------


def header(kind: int, subtype: int, remaining: int, version: int = 0, reserved: int = 0) -> bytes:
    return FIXED_HEADER.pack(version, kind, subtype, reserved, remaining)


def ping() -> bytes:
    return header(KIND_PING, REQUEST, 0)


def pong() -> bytes:
    return header(KIND_PING, RESPONSE, 0)


def error(code: int) -> bytes:
    return header(KIND_ERROR, code, 0)


def tlv(value_type: int, data: bytes) -> bytes:
    return TLV_HEADER.pack(value_type, len(data)) + bytes(data)


def tensor_value(arr, value_offset: int, pad: int | None = None) -> bytes:
    """The value octets of a tensor TLV whose first octet sits at ``value_offset``
    octets from the first octet of the frame's fixed header."""
    arr = np.asarray(arr)
    name = dtype_name(arr.dtype)
    dims = arr.shape
    head_len = 4 + 4 * len(dims)
    if pad is None:
        pad = (-(value_offset + head_len)) % 8
    head = struct.pack("!BBBB", DTYPE_CODES[name], len(dims), pad, 0)
    head += b"".join(struct.pack("!I", d) for d in dims)
    if name == "BYTES":
        data = b"".join(struct.pack("<I", len(x)) + bytes(x) for x in arr.ravel(order="C"))
    else:
        data = le_bytes(arr)
    return head + b"\x00" * pad + data


def json_bytes(obj) -> bytes:
    """What KubeMo's ``Json(obj)`` carries: ``json.dump(obj, cls=JsonEncoder)``."""
    return json.dumps(obj, cls=NumpyJSONEncoder).encode()


class NumpyJSONEncoder(json.JSONEncoder):
    """KubeMo's ``serialize.JsonEncoder``, restated."""

    def default(self, o):
        if isinstance(o, np.integer):
            return int(o)
        if isinstance(o, np.floating):
            return float(o)
        if isinstance(o, np.ndarray):
            return o.tolist()
        return json.JSONEncoder.default(self, o)


@dataclass
class Layout:
    """A built frame and where each TLV starts (octets from the frame start)."""

    data: bytes
    tlv_offsets: list[int] = field(default_factory=list)
    tlv_ends: list[int] = field(default_factory=list)
    payload_offset: int = 8  # first octet of the ``!BBH`` inference header


def inference(
    items,
    *,
    subtype: int = REQUEST,
    n_input: int | None = None,
    n_output: int | None = None,
    kind: int = KIND_INFERENCE,
    route: tuple[str, str] | None = None,
) -> Layout:
    """Build an inference frame.

    ``items`` is a list of items; each value is either ``(type, octets)`` or a
    numpy array (tensor TLV). Requests default to n_output 0, responses to the
    request's n_input given and n_output = values per item.
    """
    width = len(items[0]) if items else 0
    if subtype == REQUEST:
        n_input = width if n_input is None else n_input
        n_output = 0 if n_output is None else n_output
    else:
        n_input = 0 if n_input is None else n_input
        n_output = width if n_output is None else n_output
    payload = bytearray()
    if route is not None:
        name, version = (s.encode() for s in route)
        payload += bytes([len(name)]) + name + bytes([len(version)]) + version
    payload_offset = 8 + len(payload)
    payload += INFERENCE_HEADER.pack(n_input, n_output, len(items))
    offsets, ends = [], []
    for item in items:
        for value in item:
            pos = 8 + len(payload)
            offsets.append(pos)
            if isinstance(value, (np.ndarray, np.generic)):
                payload += tlv(TENSOR, tensor_value(value, pos + 8))
            else:
                value_type, data = value
                payload += tlv(value_type, data)
            ends.append(8 + len(payload))
    frame = header(kind, subtype, len(payload)) + bytes(payload)
    return Layout(frame, offsets, ends, payload_offset)


def request(items, **kw) -> bytes:
    return inference(items, subtype=REQUEST, **kw).data


def response(items, n_input: int, **kw) -> bytes:
    return inference(items, subtype=RESPONSE, n_input=n_input, **kw).data


def set_remaining(frame: bytes, remaining: int) -> bytes:
    return frame[:4] + struct.pack("!I", remaining) + frame[8:]


# -- MSIP --------------------------------------------------------------------

MSIP_MAGIC = b"MSIP"
MSIP_VERSION = 1


def msip(
    frame_type: int,
    msg_kind: int,
    payload: bytes = b"",
    msg_id: int = 0,
    flags: int = 0,
    *,
    magic: bytes = MSIP_MAGIC,
    version: int = MSIP_VERSION,
    reserved: int = 0,
    payload_len: int | None = None,
) -> bytes:
    if payload_len is None:
        payload_len = len(payload)
    head = MSIP_HEADER.pack(magic, version, flags, frame_type, msg_kind, reserved, payload_len, msg_id)
    return head + bytes(payload)
