"""Round trips of every value type and dtype through encode and decode (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mip
from mip.errors import MipError

from . import _wire
from ._values import (FAST, QUICK, arrays, batches, descs, expected_batch, json_objects, mip_batch,
                      observed_batch, ref_batch)

ENCODE_ERRORS = (ValueError, TypeError, OverflowError, MipError)


@FAST
@given(batches())
def test_request_round_trip(items):
    batch = mip_batch(items)
    frame = mip.encode_request(batch)
    assert isinstance(frame, bytes)
    assert frame == _wire.request(ref_batch(items))
    m = mip.decode(frame)
    assert (m.kind, m.subtype, m.n_input, m.n_output) == (2, 0, len(items[0]), 0)
    assert m.is_request and m.error_code is None
    assert len(m.batch) == len(items)
    assert observed_batch(m) == expected_batch(items)
    assert b"".join(mip.encode_request_buffers(batch)) == frame


@FAST
@given(batches(), st.integers(0, 255))
def test_response_round_trip(items, n_input):
    batch = mip_batch(items)
    frame = mip.encode_response(batch, n_input=n_input)
    assert frame == _wire.response(ref_batch(items), n_input=n_input)
    m = mip.decode(frame)
    assert (m.kind, m.subtype, m.n_input, m.n_output) == (2, 1, n_input, len(items[0]))
    assert m.is_response
    assert observed_batch(m) == expected_batch(items)
    assert b"".join(mip.encode_response_buffers(batch, n_input=n_input)) == frame


@QUICK
@given(batches(max_items=3, max_width=3), st.text(min_size=1, max_size=20), st.text(max_size=12))
def test_routed_round_trip(items, model, version):
    if len(model.encode()) > 255 or len(version.encode()) > 255:
        return
    batch = mip_batch(items)
    frame = mip.encode_request(batch, model=model, version=version)
    assert frame == _wire.request(ref_batch(items), kind=3, route=(model, version))
    m = mip.decode(frame)
    assert (m.kind, m.model, m.version or "") == (3, model, version)
    assert observed_batch(m) == expected_batch(items)
    assert b"".join(mip.encode_request_buffers(batch, model=model, version=version)) == frame
    response = mip.encode_response(batch, n_input=1, kind=3)
    assert response == _wire.response(ref_batch(items), n_input=1, kind=3)
    assert observed_batch(mip.decode(response)) == expected_batch(items)


@FAST
@given(arrays())
def test_every_tensor_round_trips(arr):
    frame = mip.encode_request([[arr]])
    assert frame == _wire.request([[arr]])
    (item,) = mip.decode(frame).batch
    out = item[0]
    assert isinstance(out, np.ndarray)
    assert out.shape == arr.shape
    if arr.dtype.kind == "O":
        assert [bytes(x) for x in out.ravel()] == [bytes(x) for x in arr.ravel()]
    else:
        want = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
        assert out.dtype == want
        assert out.tobytes() == _wire.le_bytes(arr)
        if arr.dtype.kind != "f" and arr.dtype.name != "bfloat16":
            assert np.array_equal(out, arr)


@FAST
@given(arrays(), st.integers(0, 255), st.sampled_from([2, 3]))
def test_one_tensor_response_buffers(arr, n_input, kind):
    # one item of one tensor (the common reply, written at once) is the frame the general
    # layout gives, below and above the copy threshold
    frame = _wire.response([[arr]], n_input=n_input, kind=kind)
    for threshold in (1, 4096):
        buffers = mip.encode_response_buffers([(arr,)], n_input=n_input, kind=kind,
                                              copy_threshold=threshold)
        assert b"".join(buffers) == frame


@FAST
@given(json_objects)
def test_json_values_round_trip(obj):
    frame = mip.encode_request([[mip.Json(obj)]])
    value = mip.decode(frame).batch[0][0]
    assert isinstance(value, mip.Json)
    assert value.value == obj
    assert bytes(value.data) == _wire.json_bytes(obj)


@FAST
@given(st.text())
def test_text_values_round_trip(s):
    value = mip.decode(mip.encode_request([[s]])).batch[0][0]
    assert isinstance(value, mip.Text)
    assert value.value == s
    assert bytes(value.data) == s.encode("utf-8")


@FAST
@given(st.binary(max_size=300))
def test_image_values_round_trip(data):
    value = mip.decode(mip.encode_response([[mip.Image(data)]], n_input=1)).batch[0][0]
    assert isinstance(value, mip.Image)
    assert bytes(value.data) == data


@QUICK
@given(st.integers(256, 2**32 - 1), st.binary(max_size=64))
def test_application_values_round_trip(value_type, data):
    value = mip.decode(mip.encode_request([[mip.Value(value_type, data)]])).batch[0][0]
    assert isinstance(value, mip.Value)
    assert value.type == value_type
    assert bytes(value.data) == data


@pytest.mark.parametrize("name", list(_wire.DTYPE_CODES))
def test_zero_d_and_empty_arrays(name):
    dtype = _wire.NUMPY_DTYPES[name]
    if name == "BYTES":
        zero_d = np.empty((), dtype=object)
        zero_d[()] = b"solo"
    else:
        zero_d = np.ones((), dtype=dtype)
    empties = [np.empty(shape, dtype=dtype) for shape in [(0,), (3, 0), (0, 2, 5), (1, 0, 1)]]
    items = [[("tensor", zero_d)] + [("tensor", e) for e in empties]]
    m = mip.decode(mip.encode_request(mip_batch(items)))
    assert observed_batch(m) == expected_batch(items)
    assert [t.shape for t in m.batch[0]] == [(), (0,), (3, 0), (0, 2, 5), (1, 0, 1)]


def test_many_items():
    items = [[("text", f"item {i}"), ("tensor", np.full(3, i, dtype=np.int32))] for i in range(3000)]
    frame = mip.encode_request(mip_batch(items))
    assert frame == _wire.request(ref_batch(items))
    m = mip.decode(frame)
    assert len(m.batch) == 3000
    assert m.batch[2999][0].value == "item 2999"
    assert m.batch[1234][1].tolist() == [1234] * 3


def test_wire_limits_on_counts():
    # 255 values an item and 65,535 items a batch are the most the header can say.
    wide = [[mip.Text("")] * 255]
    assert mip.decode(mip.encode_request(wide)).n_input == 255
    with pytest.raises(ENCODE_ERRORS):
        mip.encode_request([[mip.Text("")] * 256])
    with pytest.raises(ENCODE_ERRORS):
        mip.encode_response([[mip.Text("")] * 256], n_input=1)
    tall = [[""]] * 65535
    assert len(mip.decode(mip.encode_request(tall)).batch) == 65535
    with pytest.raises(ENCODE_ERRORS):
        mip.encode_request([[""]] * 65536)


def test_route_limits():
    with pytest.raises(ENCODE_ERRORS):
        mip.encode_request([["x"]], model="m" * 256)
    with pytest.raises(ENCODE_ERRORS):
        mip.encode_request([["x"]], model="m", version="v" * 256)
    frame = mip.encode_request([["x"]], model="m" * 255, version="v" * 255)
    m = mip.decode(frame)
    assert (m.model, m.version) == ("m" * 255, "v" * 255)


def test_items_must_have_the_same_width():
    with pytest.raises(ENCODE_ERRORS):
        mip.encode_request([["a", "b"], ["c"]])
    with pytest.raises(ENCODE_ERRORS):
        mip.encode_response([["a"], ["b", "c"]], n_input=1)


def test_unknown_python_values_are_refused():
    for bad in (object(), 3.5, {"a": 1}):
        with pytest.raises(ENCODE_ERRORS):
            mip.encode_request([[bad]])


def test_tuples_and_lists_are_both_batches():
    items = (("a", np.arange(2, dtype=np.int8)), ("b", np.arange(2, dtype=np.int8)))
    assert mip.encode_request(items) == mip.encode_request([list(i) for i in items])


@QUICK
@given(st.lists(descs, min_size=1, max_size=6))
def test_buffers_join_equals_bytes_for_single_items(values):
    batch = [[v for v in mip_batch([values])[0]]]
    assert b"".join(mip.encode_request_buffers(batch)) == mip.encode_request(batch)
    assert b"".join(mip.encode_response_buffers(batch, n_input=3)) == mip.encode_response(batch, n_input=3)


@pytest.mark.parametrize("value_type", [4, 5, 15, 16, 17, 100, 255])
def test_encoder_never_writes_what_its_decoder_rejects(value_type):
    """Types 0-255 belong to the protocol: a ``Value`` of such a type is refused, or, if it is
    written, the frame must still decode."""
    for data in (b"x", b"\x0b\x00\x00\x00\x00\x00\x80\x3f"):
        try:
            frame = mip.encode_request([[mip.Value(value_type, data)]])
        except ENCODE_ERRORS:
            continue
        mip.decode(frame)
