"""The codec benchmark's cells, shared by ``test_codec_bench.py`` and ``compare_codec.py``.

A cell is one operation of one implementation on one payload, given as a
function and its arguments so that both harnesses call ``func(*args)`` with no
wrapper in between (a lambda costs ~40 ns, as much as an MSIP header).

Payloads (float32; every item carries its own leading batch dimension of 1):

- tiny: 1 item, 1 tensor of 16 values
- small: 8 items, 1 tensor of 784 values each
- medium: 32 items, 1 tensor of 3x224x224 values each (19.3 MB of data)
- many-small: 256 items, 1 tensor of 16 values each

Implementations:

- ``mip``: ``mip.encode_request`` (one ``bytes``) / ``mip.decode`` then ``Message.batch``: every
  tensor as its own numpy view, as protobuf and kubemo give them
- ``mip-column``: decode only: ``mip.decode`` then ``Message.column(0)``, the batch input as one
  array (a strided view of the frame for one-row items), which is what the server does
- ``mip-buffers``: ``mip.encode_request_buffers`` (headers + the tensors' own memory)
- ``kubemo``: the KubeMo-style ``struct`` + ``BytesIO`` codec of ``kubemo_codec.py``
- ``protobuf``: KServe v2 ``ModelInferRequest`` with ``raw_input_contents``, one
  ``InferInputTensor`` per item; decode is ``ParseFromString`` then ``np.frombuffer`` per tensor
- ``memcpy``: ``np.copyto`` of the batch's tensor bytes into a preallocated buffer
- ``memcpy-bytes``: ``bytes(arr)`` of the same bytes (a fresh object, as an encoder returns)

MSIP: ``mip.msip.encode`` / ``mip.msip.decode`` of an empty-payload frame against
``struct.pack`` / ``struct.unpack`` of the 24-octet header (the latter checks nothing).
"""

from __future__ import annotations

import importlib.util
import os
import struct
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np

# Run from a checkout with the extension built in place, mip need not be installed.
if importlib.util.find_spec("mip") is None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mip  # noqa: E402
from mip import msip  # noqa: E402

import kubemo_codec  # noqa: E402

try:
    from tritonclient.grpc import service_pb2
except ImportError:  # pragma: no cover - the bench extra installs it
    service_pb2 = None

PAYLOADS = ("tiny", "small", "medium", "many-small")
MIP_IMPLS = ("mip", "mip-column", "mip-buffers", "kubemo", "protobuf", "memcpy", "memcpy-bytes")


def mip_decode_items(frame: bytes) -> mip.Message:
    """Decode and make every value object (``Message.batch``)."""
    message = mip.decode(frame)
    _ = message.batch
    return message


def mip_decode_column(frame: bytes) -> np.ndarray:
    """Decode and take input 0 of every item as one array (``Message.column``)."""
    return mip.decode(frame).column(0)
MSIP_IMPLS = ("mip", "struct")

_SHAPES = {
    "tiny": (1, (1, 16)),
    "small": (8, (1, 784)),
    "medium": (32, (1, 3, 224, 224)),
    "many-small": (256, (1, 16)),
}

MSIP_HEADER_FMT = "!4sBBHHHLQ"


def make_batch(payload: str, seed: int = 0) -> list[list[np.ndarray]]:
    """The batch for a payload name: a list of items, each a list of one float32 tensor."""
    items, shape = _SHAPES[payload]
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(shape, dtype=np.float32)] for _ in range(items)]


# -- protobuf (KServe v2 / Triton gRPC) ---------------------------------------------------

_PB_DTYPES = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT32": np.int32,
              "INT64": np.int64, "UINT8": np.uint8, "INT8": np.int8, "BOOL": np.bool_}
_PB_NAMES = {np.dtype(v): k for k, v in _PB_DTYPES.items()}


def pb_encode(batch) -> bytes:
    """A ModelInferRequest with one input tensor per item, its data in raw_input_contents."""
    req = service_pb2.ModelInferRequest(model_name="model")
    for i, item in enumerate(batch):
        for arr in item:
            t = req.inputs.add()
            t.name = "input%d" % i
            t.datatype = _PB_NAMES[arr.dtype]
            t.shape.extend(arr.shape)
            req.raw_input_contents.append(arr.tobytes())
    return req.SerializeToString()


def pb_decode(data: bytes) -> list[np.ndarray]:
    """Parse a ModelInferRequest and view each raw input as an array of its shape."""
    req = service_pb2.ModelInferRequest()
    req.ParseFromString(data)
    raw = req.raw_input_contents
    return [
        np.frombuffer(raw[i], dtype=_PB_DTYPES[t.datatype]).reshape(tuple(t.shape))
        for i, t in enumerate(req.inputs)
    ]


# -- cells ----------------------------------------------------------------------------------

@dataclass
class Cell:
    """One timed operation: ``func(*args)``; ``check(result)`` validates one result."""

    group: str
    impl: str
    func: Callable
    args: tuple
    check: Callable[[object], None] | None = None


def _tensors_equal(batch, arrays) -> None:
    expected = [arr for item in batch for arr in item]
    assert len(arrays) == len(expected)
    for got, want in zip(arrays, expected):
        assert got.shape == want.shape and np.array_equal(got, want)


def mip_cells(payload: str) -> list[Cell]:
    """Encode and decode cells for one payload, every implementation."""
    batch = make_batch(payload)
    frame = mip.encode_request(batch)
    assert kubemo_codec.encode_request(batch) == frame, "the KubeMo-style frame must equal mip's"
    pb_frame = pb_encode(batch) if service_pb2 is not None else None

    flat = np.concatenate([arr.reshape(-1).view(np.uint8) for item in batch for arr in item])
    dst = np.empty_like(flat)

    def check_frame(result):
        assert result == frame

    def check_buffers(result):
        assert b"".join(result) == frame

    def check_pb(result):
        assert result == pb_frame

    def check_mip_decode(msg):
        _tensors_equal(batch, [v for item in msg.batch for v in item])

    def check_column(column):
        assert np.array_equal(column, np.concatenate([item[0] for item in batch]))

    def check_kubemo_decode(result):
        _tensors_equal(batch, [v for item in result[2] for v in item])

    def check_pb_decode(result):
        _tensors_equal(batch, result)

    def check_copyto(_):
        assert np.array_equal(dst, flat)

    def check_bytes(result):
        assert len(result) == flat.nbytes

    enc, dec = "encode-" + payload, "decode-" + payload
    cells = [
        Cell(enc, "mip", mip.encode_request, (batch,), check_frame),
        Cell(enc, "mip-buffers", mip.encode_request_buffers, (batch,), check_buffers),
        Cell(enc, "kubemo", kubemo_codec.encode_request, (batch,), check_frame),
        Cell(enc, "memcpy", np.copyto, (dst, flat), check_copyto),
        Cell(enc, "memcpy-bytes", bytes, (flat,), check_bytes),
        Cell(dec, "mip", mip_decode_items, (frame,), check_mip_decode),
        Cell(dec, "mip-column", mip_decode_column, (frame,), check_column),
        Cell(dec, "kubemo", kubemo_codec.decode, (frame,), check_kubemo_decode),
        Cell(dec, "memcpy", np.copyto, (dst, flat), check_copyto),
        Cell(dec, "memcpy-bytes", bytes, (flat,), check_bytes),
    ]
    if pb_frame is not None:
        cells.insert(3, Cell(enc, "protobuf", pb_encode, (batch,), check_pb))
        cells.insert(-2, Cell(dec, "protobuf", pb_decode, (pb_frame,), check_pb_decode))
    return cells


def msip_cells() -> list[Cell]:
    """MSIP header encode and decode: mip.msip against struct."""
    ft, kind, msg_id = int(msip.FrameType.PING), int(msip.MsgKind.EVENT), 7
    frame = msip.encode(ft, kind, b"", msg_id)
    assert frame == struct.pack(MSIP_HEADER_FMT, b"MSIP", 1, 0, ft, kind, 0, 0, msg_id)

    def check_frame(result):
        assert result == frame

    def check_decoded(f):
        assert (f.frame_type, f.msg_kind, f.msg_id, len(f.payload)) == (ft, kind, msg_id, 0)

    def check_unpacked(t):
        assert t == (b"MSIP", 1, 0, ft, kind, 0, 0, msg_id)

    return [
        Cell("msip-encode", "mip", msip.encode, (ft, kind, b"", msg_id), check_frame),
        Cell("msip-encode", "struct", struct.pack, (MSIP_HEADER_FMT, b"MSIP", 1, 0, ft, kind, 0, 0, msg_id),
             check_frame),
        Cell("msip-decode", "mip", msip.decode, (frame,), check_decoded),
        Cell("msip-decode", "struct", struct.unpack, (MSIP_HEADER_FMT, frame), check_unpacked),
    ]


def all_cells(payloads=PAYLOADS) -> list[Cell]:
    """Every cell, grouped: each payload's encode and decode, then MSIP."""
    cells = []
    for p in payloads:
        cells += mip_cells(p)
    return cells + msip_cells()


# -- ratios and targets -----------------------------------------------------------------------
# results: {(group, impl): seconds per operation}

def _fmt_us(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    us = seconds * 1e6
    if us < 10:
        return "%.3f" % us
    if us < 1000:
        return "%.1f" % us
    return "{:,.0f}".format(us)


def _fmt_ratio(num: float | None, den: float | None) -> str:
    if num is None or den is None or den == 0:
        return "-"
    r = num / den
    return ("%.3f" if r < 1 else "%.2f" if r < 10 else "%.1f" if r < 100 else "%.0f") % r


def ratio_table(results: dict) -> str:
    """A text table: µs per operation for every implementation, then the ratios."""
    head = ["cell"] + list(MIP_IMPLS) + ["protobuf/mip", "kubemo/mip", "mip/memcpy", "mip/memcpy-bytes"]
    rows = []
    for op in ("encode", "decode"):
        for p in PAYLOADS:
            g = "%s-%s" % (op, p)
            if not any(k[0] == g for k in results):
                continue
            r = {impl: results.get((g, impl)) for impl in MIP_IMPLS}
            rows.append([g] + [_fmt_us(r[i]) for i in MIP_IMPLS] + [
                _fmt_ratio(r["protobuf"], r["mip"]),
                _fmt_ratio(r["kubemo"], r["mip"]),
                _fmt_ratio(r["mip"], r["memcpy"]),
                _fmt_ratio(r["mip"], r["memcpy-bytes"]),
            ])
    out = _render(head, rows)
    msip_rows = []
    for g in ("msip-encode", "msip-decode"):
        if (g, "mip") in results:
            m, s = results[(g, "mip")], results.get((g, "struct"))
            msip_rows.append([g, "%.0f" % (m * 1e9), "-" if s is None else "%.0f" % (s * 1e9), _fmt_ratio(s, m)])
    if msip_rows:
        out += "\n\n" + _render(["cell", "mip ns", "struct ns", "struct/mip"], msip_rows)
    return out


def _render(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(  # noqa: E731
        str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


@dataclass
class Target:
    """One performance target: what it asks, what was measured, whether it holds."""

    name: str
    measured: str
    ok: bool | None  # None: not measured in this run


def check_targets(results: dict) -> list[Target]:
    """The codec's performance targets, checked against one run's results."""
    get = results.get
    out = []

    def add(name, ok, measured):
        out.append(Target(name, measured, ok))

    med, many = get(("decode-medium", "mip")), get(("decode-many-small", "mip"))
    if med is not None and many is not None:
        per_med, per_many = med / _SHAPES["medium"][0], many / _SHAPES["many-small"][0]
        add("decode cost independent of payload size (ns/tensor, 602 KB vs 64 B tensors, within 2x)",
            per_med <= 2 * per_many, "%.0f ns vs %.0f ns per tensor" % (per_med * 1e9, per_many * 1e9))
    pb = get(("decode-medium", "protobuf"))
    if med is not None and pb is not None:
        add(">= 200x faster than protobuf decoding medium", pb / med >= 200, "%.0fx" % (pb / med))
    tiny = get(("decode-tiny", "mip"))
    if tiny is not None:
        add("tiny decode < 0.3 us", tiny < 0.3e-6, "%.3f us" % (tiny * 1e6))
    many_col = get(("decode-many-small", "mip-column"))
    if many is not None:
        add("many-small decode < 15 us, every tensor as its own view (Message.batch)",
            many < 15e-6, "%.1f us" % (many * 1e6))
    if many_col is not None:
        add("many-small decode < 15 us, the batch input as one view (Message.column)",
            many_col < 15e-6, "%.1f us" % (many_col * 1e6))
    enc, cp = get(("encode-medium", "mip")), get(("encode-medium", "memcpy-bytes"))
    if enc is not None and cp is not None:
        pre = get(("encode-medium", "memcpy"))
        add("medium encode to bytes within 1.25x of memcpy (fresh bytes)", enc <= 1.25 * cp,
            "%.2fx of bytes(), %sx of copyto" % (enc / cp, "-" if pre is None else "%.2f" % (enc / pre)))
    bufs = {p: get(("encode-" + p, "mip-buffers")) for p in PAYLOADS}
    if all(v is not None for v in bufs.values()):
        worst = max(bufs.values())
        add("buffer-list encode in microseconds (< 100 us on every batch)", worst < 100e-6,
            "worst %.1f us (medium %.1f us)" % (worst * 1e6, bufs["medium"] * 1e6))
    me, md = get(("msip-encode", "mip")), get(("msip-decode", "mip"))
    if me is not None:
        add("MSIP encode < 100 ns", me < 100e-9, "%.0f ns" % (me * 1e9))
    if md is not None:
        add("MSIP validated decode < 150 ns", md < 150e-9, "%.0f ns" % (md * 1e9))
    return out


def format_targets(targets: list[Target]) -> str:
    """PASS/MISS lines for the targets."""
    return "\n".join("%-4s  %-88s %s" % ("PASS" if t.ok else "MISS", t.name, t.measured) for t in targets)
