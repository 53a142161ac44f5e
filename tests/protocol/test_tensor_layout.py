"""The tensor TLV (type 16): layout, pad rule, dtype conversions, zero copy and alignment."""

from __future__ import annotations

import gc
import struct

import ml_dtypes
import numpy as np
import pytest

import mip
from mip.errors import MipError

from . import _wire
from ._values import tensor_contents, tensors_in

ENCODE_ERRORS = (ValueError, TypeError, OverflowError, MipError)


def sample(name: str, shape) -> np.ndarray:
    count = int(np.prod(shape, dtype=np.int64))
    if name == "BYTES":
        arr = np.empty(count, dtype=object)
        arr[:] = [bytes([65 + i % 26]) * (i % 5) for i in range(count)]
        return arr.reshape(shape)
    if name == "BOOL":
        return (np.arange(count) % 3 == 0).reshape(shape)
    if name == "BF16":
        return (np.arange(count, dtype=np.float32) - 2.5).astype(ml_dtypes.bfloat16).reshape(shape)
    values = np.arange(count, dtype=np.int64) * 37 - 11  # wraps for unsigned types
    return values.astype(_wire.NUMPY_DTYPES[name]).reshape(shape)


SHAPES = [(), (1,), (5,), (2, 3), (3, 1, 2), (0,), (2, 0, 3), (1, 1, 1, 1, 7)]


def walk_tensor_tlvs(frame: bytes):
    """Parse an encoded single-kind-2/3 request by hand; yield (tlv_offset, dtype, ndim,
    pad, flags, dims, data_offset, tlv_end) for every tensor TLV."""
    kind = frame[1]
    pos = 8
    if kind == 3 and frame[2] == 0:
        pos += 1 + frame[pos]
        pos += 1 + frame[pos]
    n_input, n_output, batch = struct.unpack_from("!BBH", frame, pos)
    pos += 4
    count = batch * (n_input if frame[2] == 0 else n_output)
    for _ in range(count):
        vtype, size = struct.unpack_from("!II", frame, pos)
        value = pos + 8
        end = value + size
        if vtype == 16:
            dtype, ndim, pad, flags = struct.unpack_from("!BBBB", frame, value)
            dims = struct.unpack_from(f"!{ndim}I", frame, value + 4)
            data = value + 4 + 4 * ndim + pad
            yield pos, dtype, ndim, pad, flags, dims, data, end
        pos = end
    assert pos == len(frame)


@pytest.mark.parametrize("name", list(_wire.DTYPE_CODES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_dtype_and_shape_matches_reference(name, shape):
    arr = sample(name, shape)
    golden = _wire.request([[arr]])
    assert mip.encode_request([[arr]]) == golden
    ((_, code, ndim, pad, flags, dims, data, end),) = walk_tensor_tlvs(golden)
    assert (code, ndim, flags, dims) == (_wire.DTYPE_CODES[name], len(shape), 0, shape)
    assert data % 8 == 0 and 0 <= pad <= 7
    (out,) = tensors_in(mip.decode(golden))
    assert out.dtype == _wire.NUMPY_DTYPES[name]
    assert out.dtype.byteorder in "=|<"
    assert tensor_contents(out) == tensor_contents(arr)


@pytest.mark.parametrize("name_len", range(1, 9))
@pytest.mark.parametrize("ndim", range(0, 6))
def test_pad_rule_from_every_start_offset(name_len, ndim):
    """Pad depends on the offset from the frame start, which the route block shifts."""
    arr = np.arange(2 ** min(ndim, 3), dtype=np.float64).reshape((2,) * min(ndim, 3) + (1,) * max(ndim - 3, 0))
    route = ("m" * name_len, "")
    small = arr.astype(np.uint8)
    golden = _wire.request([[arr, small]], kind=3, route=route)
    ours = mip.encode_request([[arr, small]], model=route[0])
    assert ours == golden
    for tlv, _, nd, pad, _, _, data, _ in walk_tensor_tlvs(ours):
        assert data % 8 == 0
        assert pad == (-(tlv + 8 + 4 + 4 * nd)) % 8
        assert ours[data - pad : data] == b"\x00" * pad


def test_pads_differ_per_tlv_in_one_frame():
    values = [np.zeros(k, dtype=np.uint8) for k in range(1, 9)]
    golden = _wire.request([values])
    assert mip.encode_request([values]) == golden
    pads = [pad for _, _, _, pad, _, _, _, _ in walk_tensor_tlvs(golden)]
    assert len(set(pads)) > 1  # the vector really exercises different pads
    m = mip.decode(golden)
    assert [t.tolist() for t in tensors_in(m)] == [v.tolist() for v in values]


def test_dims_big_endian_data_little_endian():
    frame = mip.encode_request([[np.array([[0x0102]], dtype=np.uint16)]])
    ((_, code, ndim, pad, _, dims, data, end),) = walk_tensor_tlvs(frame)
    assert (code, ndim, dims) == (3, 2, (1, 1))
    assert frame[data - pad - 8 : data - pad] == bytes.fromhex("00000001 00000001")
    assert frame[data:end] == b"\x02\x01"


@pytest.mark.parametrize("name", ["UINT16", "UINT32", "UINT64", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"])
def test_big_endian_input_is_converted(name):
    arr = sample(name, (2, 3))
    big = arr.astype(arr.dtype.newbyteorder(">"))
    assert mip.encode_request([[big]]) == mip.encode_request([[arr]]) == _wire.request([[arr]])
    (out,) = tensors_in(mip.decode(mip.encode_request([[big]])))
    assert out.dtype.byteorder in "=<"
    assert np.array_equal(out, big)


@pytest.mark.parametrize("name", list(_wire.DTYPE_CODES))
def test_non_contiguous_input_is_converted(name):
    base = sample(name, (4, 6))
    for view in (base[::2], base[:, ::3], base.T, base[::-1, 1:4]):
        contiguous = np.ascontiguousarray(view)
        assert mip.encode_request([[view]]) == _wire.request([[contiguous]])
        (out,) = tensors_in(mip.decode(mip.encode_request([[view]])))
        assert tensor_contents(out) == tensor_contents(contiguous)


def test_fortran_order_is_written_row_major():
    arr = np.asfortranarray(np.arange(12, dtype=np.int32).reshape(3, 4))
    assert mip.encode_request([[arr]]) == _wire.request([[np.ascontiguousarray(arr)]])


@pytest.mark.parametrize(
    "scalar", [np.float32(2.5), np.int64(-7), np.bool_(True), np.uint8(200), np.float16(0.25)], ids=repr
)
def test_numpy_scalars_are_zero_d_tensors(scalar):
    arr = np.asarray(scalar)
    assert mip.encode_request([[scalar]]) == mip.encode_request([[arr]]) == _wire.request([[arr]])
    (out,) = tensors_in(mip.decode(mip.encode_request([[scalar]])))
    assert out.shape == () and out.dtype == arr.dtype and out[()] == scalar


def test_bf16_bits_survive():
    bits = np.array([0x0000, 0x8000, 0x3F80, 0x7F80, 0xFF80, 0x7FC1, 0x0001], dtype=np.uint16)
    arr = bits.view(ml_dtypes.bfloat16)
    frame = mip.encode_request([[arr]])
    assert frame == _wire.request([[arr]])
    (out,) = tensors_in(mip.decode(frame))
    assert out.dtype == ml_dtypes.bfloat16
    assert out.view(np.uint16).tolist() == bits.tolist()


def test_bool_is_one_octet_per_element():
    frame = mip.encode_request([[np.array([True, False, True])]])
    ((_, code, _, _, _, _, data, end),) = walk_tensor_tlvs(frame)
    assert code == 1 and frame[data:end] == b"\x01\x00\x01"


def test_bytes_tensor_elements():
    arr = np.array([[b"", b"a"], [b"\x00" * 300, "bytes ✓".encode()]], dtype=object)
    frame = mip.encode_request([[arr]])
    assert frame == _wire.request([[arr]])
    (out,) = tensors_in(mip.decode(frame))
    assert out.shape == (2, 2)
    assert [bytes(x) for x in out.ravel()] == [bytes(x) for x in arr.ravel()]


def test_thirty_two_dims_encode_and_thirty_three_do_not():
    arr = np.arange(2, dtype=np.int8).reshape((1,) * 31 + (2,))
    frame = mip.encode_request([[arr]])
    assert frame == _wire.request([[arr]])
    (out,) = tensors_in(mip.decode(frame))
    assert out.shape == arr.shape
    with pytest.raises(ENCODE_ERRORS):
        mip.encode_request([[np.zeros((1,) * 33, dtype=np.int8)]])


def test_dims_over_four_gib_are_refused_by_the_encoder():
    with pytest.raises(ENCODE_ERRORS):
        mip.encode_request([[np.empty((2**32, 0), dtype=np.float32)]])
    frame = mip.encode_request([[np.empty((2**32 - 1, 0), dtype=np.float32)]])
    (out,) = tensors_in(mip.decode(frame))
    assert out.shape == (2**32 - 1, 0)


def test_unsupported_dtypes_are_refused_by_the_encoder():
    for arr in (np.zeros(2, dtype=np.complex64), np.zeros(2, dtype=np.complex128), np.zeros(2, dtype="M8[s]")):
        with pytest.raises(ENCODE_ERRORS):
            mip.encode_request([[arr]])


# -- zero copy and alignment ------------------------------------------------

MIXED = [
    [np.arange(3, dtype=np.uint8), np.arange(5, dtype=np.float64), "pad me", np.arange(7, dtype=np.int16)],
    [np.arange(3, dtype=np.uint8) + 1, np.ones((2, 2), dtype=np.float32), "x", np.arange(7, dtype=np.int16) * 2],
    [np.zeros((), dtype=np.int64), np.arange(4, dtype=ml_dtypes.bfloat16), "", np.array([True, False])],
]


def _base_pointer(buffer) -> int:
    return np.frombuffer(buffer, dtype=np.uint8).ctypes.data


def _frames():
    yield mip.encode_request(MIXED)
    yield mip.encode_response(MIXED, n_input=2)
    yield mip.encode_request(MIXED, model="abc", version="7")


@pytest.mark.parametrize("which", range(3))
def test_decoded_tensors_are_aligned_views_of_a_bytes_buffer(which):
    frame = list(_frames())[which]
    assert isinstance(frame, bytes)
    m = mip.decode(frame)
    whole = np.frombuffer(frame, dtype=np.uint8)
    tensors = tensors_in(m)
    assert len(tensors) == 9
    for t in tensors:
        assert np.shares_memory(t, whole)
        assert (t.ctypes.data - whole.ctypes.data) % 8 == 0
        assert t.ctypes.data % 8 == 0  # bytes objects are 8-aligned in memory
        assert t.flags.aligned
        assert not t.flags.writeable
        with pytest.raises(ValueError):
            t.flat[0] = 0


@pytest.mark.parametrize("shift", range(8))
def test_alignment_is_relative_to_the_buffer_start(shift):
    frame = mip.encode_request(MIXED)
    backing = bytearray(shift + len(frame) + 3)
    backing[shift : shift + len(frame)] = frame
    view = memoryview(backing)[shift : shift + len(frame)]
    m = mip.decode(view)
    start = _base_pointer(view)
    for t in tensors_in(m):
        assert np.shares_memory(t, np.frombuffer(view, dtype=np.uint8))
        assert (t.ctypes.data - start) % 8 == 0
    assert [t.tolist() for t in tensors_in(m)] == [t.tolist() for t in tensors_in(mip.decode(frame))]


def test_read_only_buffers_give_read_only_arrays():
    frame = mip.encode_request(MIXED)
    for buffer in (frame, memoryview(frame), memoryview(bytearray(frame)).toreadonly()):
        for t in tensors_in(mip.decode(buffer)):
            assert not t.flags.writeable


def test_views_keep_the_buffer_alive():
    m = mip.decode(bytes(mip.encode_request(MIXED)))
    gc.collect()
    _ = [bytes(1000) for _ in range(100)]  # churn the allocator
    assert tensors_in(m)[1].tolist() == list(range(5))
    assert tensors_in(m)[2].tolist() == list(range(7))


def test_live_views_pin_a_bytearray():
    backing = bytearray(mip.encode_request(MIXED))
    m = mip.decode(backing)
    t = tensors_in(m)[1]
    with pytest.raises(BufferError):
        backing.extend(b"\x00" * 1_000_000)  # would move memory under live views
    assert t.tolist() == list(range(5))


def test_bytes_tensors_decode_to_object_arrays():
    arr = np.array([b"one", b"", b"three"], dtype=object)
    (out,) = tensors_in(mip.decode(mip.encode_request([[arr]])))
    assert out.dtype == object
    assert [bytes(x) for x in out] == [b"one", b"", b"three"]


def test_buffers_variant_sends_large_tensors_without_copy():
    big = np.arange(1 << 18, dtype=np.float32)  # 1 MiB
    small = np.arange(4, dtype=np.float32)
    batch = [[big, "t", small], [big[::-1].copy(), "u", small]]
    buffers = mip.encode_request_buffers(batch)
    assert b"".join(buffers) == mip.encode_request(batch)
    assert any(np.shares_memory(np.frombuffer(b, dtype=np.uint8), big) for b in buffers)
    response_buffers = mip.encode_response_buffers(batch, n_input=1)
    assert b"".join(response_buffers) == mip.encode_response(batch, n_input=1)
    assert any(np.shares_memory(np.frombuffer(b, dtype=np.uint8), big) for b in response_buffers)
    total = sum(memoryview(b).nbytes for b in buffers)
    assert total == len(mip.encode_request(batch))


def test_buffers_variant_converts_what_it_must():
    big = np.arange(1 << 17, dtype=np.float64)
    batch = [[big[::2], big.astype(">f8")]]
    buffers = mip.encode_request_buffers(batch)
    assert b"".join(buffers) == mip.encode_request(batch) == _wire.request([[big[::2].copy(), big]])
