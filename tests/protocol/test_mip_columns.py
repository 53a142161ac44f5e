"""Message.column / Message.rows, and values made on first access of Message.batch."""

from __future__ import annotations

import numpy as np
import pytest

import mip


def _frame(batch):
    return mip.encode_request(batch)


def test_one_row_items_give_a_strided_view_of_the_frame():
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal((1, 16)).astype(np.float32) for _ in range(64)]
    frame = _frame([[r, np.array([i], np.int64)] for i, r in enumerate(rows)])
    m = mip.decode(frame)
    col = m.column(0)
    assert col.shape == (64, 16) and col.dtype == np.float32
    assert np.shares_memory(col, np.frombuffer(frame, np.uint8))
    assert col.flags.aligned and not col.flags.writeable
    np.testing.assert_array_equal(col, np.concatenate(rows))
    ids = m.column(1)
    assert ids.shape == (64,) and ids.tolist() == list(range(64))
    assert m.rows(0) == [1] * 64 and len(m) == 64
    # the per-item view agrees with the column
    np.testing.assert_array_equal(np.concatenate([item[0] for item in m.batch]), col)


def test_other_batches_are_concatenated():
    a, b = np.ones((3, 2), np.int16), np.zeros((2, 2), np.int16)
    m = mip.decode(_frame([[a], [b]]))
    assert m.rows(0) == [3, 2]
    np.testing.assert_array_equal(m.column(0), np.concatenate([a, b]))
    single = mip.decode(_frame([[a]]))
    assert single.column(0).shape == (3, 2)
    assert np.shares_memory(single.column(0), single.batch[0][0])


def test_mixed_dtypes_or_shapes_fall_back_or_refuse():
    m = mip.decode(_frame([[np.ones((1, 2), np.float32)], [np.ones((1, 2), np.float64)]]))
    np.testing.assert_array_equal(m.column(0), np.ones((2, 2)))  # numpy's promotion
    bad = mip.decode(_frame([[np.ones((1, 2))], [np.ones((1, 3))]]))
    with pytest.raises(ValueError):
        bad.column(0)
    zero_d = mip.decode(_frame([[np.float32(1.0)], [np.float32(2.0)]]))
    assert zero_d.rows(0) == [-1, -1]
    with pytest.raises(ValueError):
        zero_d.column(0)


def test_text_and_bytes_columns():
    m = mip.decode(_frame([["a"], ["b"]]))
    col = m.column(0)
    assert col.dtype == object and list(col) == [mip.Text("a"), mip.Text("b")]
    assert m.rows(0) == [1, 1]
    strings = mip.decode(_frame([[np.array([b"x"], dtype=object)], [np.array([b"yz"], dtype=object)]]))
    assert strings.column(0).tolist() == [b"x", b"yz"]


def test_index_out_of_range_and_empty_batch():
    m = mip.decode(_frame([[np.ones(1)]]))
    with pytest.raises(IndexError):
        m.column(1)
    with pytest.raises(IndexError):
        m.rows(-1)
    empty = mip.decode(mip.encode_response([], n_output=2))
    assert len(empty) == 0 and empty.batch == []
    with pytest.raises(ValueError):
        empty.column(0)


def test_decode_checks_everything_before_values_are_made():
    frame = bytearray(_frame([["ok"], [np.ones((1, 4), np.float32)]]))
    dim = frame.rfind((4).to_bytes(4, "big"), 0, len(frame) - 16)  # the last dimension, 4
    frame[dim:dim + 4] = (5).to_bytes(4, "big")  # the shape no longer fits the data
    with pytest.raises(mip.InvalidValue):
        mip.decode(bytes(frame))
    bad_text = bytearray(_frame([["é"]]))
    bad_text[-1] = 0xFF
    with pytest.raises(mip.InvalidValue):
        mip.decode(bytes(bad_text))


def test_a_buffer_changed_after_decoding_never_leads_outside_the_frame():
    # more than 8 values: their objects are made on first access, after the change
    frame = bytearray(_frame([[np.ones((1, 4), np.float32)]] * 12))
    m = mip.decode(frame)
    frame[12:16] = (0xFFFFFFF0).to_bytes(4, "big")  # first TLV type becomes reserved/unknown
    frame[16:20] = (0x7FFFFFFF).to_bytes(4, "big")  # and its size runs far past the frame
    with pytest.raises(mip.ProtocolError):
        _ = m.batch
    with pytest.raises(mip.ProtocolError):
        m.column(0)
