"""Every layer agrees with the one datatype table (mip.protocol.dtypes): each datatype
round-trips through the MIP codec, the KServe v2 REST and gRPC mappings, the /v1 job
bodies, the ONNX and Triton configuration names, and the independent names of numpy,
ONNX and the KServe v2 protobuf."""

import json

import ml_dtypes
import numpy as np
import onnx
import pytest

import mip
from mip.errors import InvalidInput
from mip.frontends.miaas.tensors import decode_inputs, encode_outputs
from mip.frontends.oip import codec, grpc_codec
from mip.frontends.oip import inference_pb2 as pb
from mip.protocol.dtypes import BY_NAME, DATATYPE_NAMES, DATATYPES, TABLE
from mip.serving import model_config_pb2 as mc
from mip.serving.providers.onnx import from_onnx_type
from mip.serving.triton import _datatype, _type_code

from . import _wire

# Values of each kind, written without the table (the oracle is numpy's own types).
SAMPLES = {
    "BOOL": np.array([[True, False, True]]),
    "UINT8": np.array([[0, 7, 255]], np.uint8),
    "UINT16": np.array([[0, 7, 65535]], np.uint16),
    "UINT32": np.array([[0, 7, 2**32 - 1]], np.uint32),
    "UINT64": np.array([[0, 7, 2**64 - 1]], np.uint64),
    "INT8": np.array([[-128, 0, 127]], np.int8),
    "INT16": np.array([[-32768, 0, 32767]], np.int16),
    "INT32": np.array([[-2**31, 0, 2**31 - 1]], np.int32),
    "INT64": np.array([[-2**63, 0, 2**63 - 1]], np.int64),
    "FP16": np.array([[0.5, -1.0, 65504.0]], np.float16),
    "FP32": np.array([[0.5, -1.0, 3.25]], np.float32),
    "FP64": np.array([[0.5, -1.0, 1e300]], np.float64),
    "BYTES": np.array([[b"ab", b"", b"\xc3\xa9"]], dtype=object),
    "BF16": np.array([[0.5, -1.0, 2.0]], ml_dtypes.bfloat16),
}
NAMES = [d.name for d in TABLE]


def test_the_table_is_whole_and_its_views_agree():
    assert sorted(SAMPLES) == sorted(NAMES)
    assert [d.code for d in TABLE] == list(range(1, len(TABLE) + 1))
    assert DATATYPE_NAMES == {d.code: d.name for d in TABLE}
    assert DATATYPES == {d.name: d.numpy for d in TABLE}
    assert mip.DATATYPES is DATATYPES and mip.DATATYPE_NAMES is DATATYPE_NAMES


@pytest.mark.parametrize("name", NAMES)
def test_numpy_and_the_protocol_agree(name):
    entry = BY_NAME[name]
    sample = SAMPLES[name]
    assert entry.numpy == sample.dtype
    assert mip.numpy_dtype(name) == entry.numpy
    assert mip.datatype_of(sample) == mip.datatype_of(sample.dtype) == name
    assert entry.itemsize == (0 if name == "BYTES" else sample.dtype.itemsize)


@pytest.mark.parametrize("name", NAMES)
def test_mip_wire_round_trip_and_code(name):
    sample = SAMPLES[name]
    assert BY_NAME[name].code == _wire.DTYPE_CODES[name]  # the wire oracle's codes
    frame = mip.encode_request([[sample]])
    decoded = mip.decode(frame).batch[0][0]
    assert mip.datatype_of(decoded) == name
    assert decoded.shape == sample.shape
    assert decoded.tolist() == sample.tolist()


@pytest.mark.parametrize("name", NAMES)
def test_oip_rest_json_and_raw_round_trip(name):
    sample = SAMPLES[name]
    shape = list(sample.shape)
    data = [e.decode("utf-8") for e in codec.bytes_elements(sample)] if name == "BYTES" else (
        sample.astype(np.float32) if name == "BF16" else sample).ravel().tolist()
    assert codec.from_list("x", name, shape, data).tolist() == sample.tolist()
    raw = codec.from_raw("x", name, shape, bytes(codec.to_raw(sample)))
    assert raw.dtype == sample.dtype and raw.tolist() == sample.tolist()


@pytest.mark.parametrize("name", NAMES)
def test_oip_grpc_typed_contents_follow_the_table(name):
    entry = BY_NAME[name]
    fields = {f.name for f in pb.InferTensorContents.DESCRIPTOR.fields}
    sample = SAMPLES[name]
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype=name,
                                                   shape=list(sample.shape))
    if entry.contents is None:
        assert name not in grpc_codec._CONTENTS
        with pytest.raises(InvalidInput, match=f"{name} has no typed contents"):
            grpc_codec._from_contents(tensor)
        return
    assert entry.contents in fields
    grpc_codec._typed_contents(tensor.contents, name, sample, "x")
    assert grpc_codec._from_contents(tensor).tolist() == sample.tolist()


def test_grpc_typed_fields_are_exactly_the_protobuf_ones():
    fields = {f.name for f in pb.InferTensorContents.DESCRIPTOR.fields}
    assert {d.contents for d in TABLE if d.contents} == fields


@pytest.mark.parametrize("name", NAMES)
def test_miaas_job_bodies_round_trip(name):
    sample = SAMPLES[name]
    data = [e.decode("utf-8") for e in codec.bytes_elements(sample)] if name == "BYTES" else (
        sample.astype(np.float32) if name == "BF16" else sample).ravel().tolist()
    tensors, _ = decode_inputs({"inputs": [{"name": "x", "datatype": name,
                                            "shape": list(sample.shape), "data": data}]})
    assert tensors["x"].dtype == sample.dtype and tensors["x"].tolist() == sample.tolist()
    out = encode_outputs({"y": sample}, "m", "1")["outputs"][0]
    assert out["datatype"] == name and out["shape"] == list(sample.shape)


@pytest.mark.parametrize("name", NAMES)
def test_onnx_and_triton_names_agree(name):
    entry = BY_NAME[name]
    assert from_onnx_type(f"tensor({entry.onnx})") == name
    proto = onnx.TensorProto.DataType.Value(entry.onnx.upper())
    assert onnx.helper.tensor_dtype_to_np_dtype(proto) == entry.numpy
    assert _datatype(_type_code(name), "x") == name
    assert mc.DataType.Name(_type_code(name)).removeprefix("TYPE_") == (
        "STRING" if name == "BYTES" else name)


def test_unknown_names_and_dtypes_fail_the_same_way_everywhere():
    with pytest.raises(InvalidInput, match="unknown datatype 'FP99'.*the datatypes are BOOL"):
        mip.numpy_dtype("FP99")
    with pytest.raises(InvalidInput, match="unknown datatype 'FP99'"):
        codec.from_list("x", "FP99", [1], [0])
    with pytest.raises(InvalidInput, match="unknown datatype 'FP99'"):
        decode_inputs({"inputs": [{"name": "x", "datatype": "FP99", "shape": [1],
                                   "data": [0]}]})
    with pytest.raises(TypeError, match="complex64 has no Open Inference Protocol datatype"):
        mip.datatype_of(np.zeros(1, np.complex64))
    with pytest.raises(TypeError, match="complex64 has no Open Inference Protocol datatype"):
        mip.encode_request([[np.zeros(1, np.complex64)]])


def test_job_bodies_have_the_rest_decoders_nesting_bound():
    deep = json.loads("[" * 40 + "0" + "]" * 40)
    for decode in (lambda: codec.from_list("x", "FP32", [1], deep),
                   lambda: decode_inputs({"inputs": [{"name": "x", "datatype": "FP32",
                                                      "shape": [1], "data": deep}]})):
        with pytest.raises(InvalidInput, match="nested deeper than 32 lists"):
            decode()
