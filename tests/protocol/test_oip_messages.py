"""mip.protocol._oip: the common ModelInfer request read without protobuf, and its reply
written octet for octet as protobuf writes it; protobuf (grpc_codec) is the oracle."""

import ml_dtypes
import numpy as np
import pytest

from mip.frontends.dataplane import InferResult
from mip.frontends.oip import grpc_codec
from mip.frontends.oip import inference_pb2 as pb
from mip.protocol import _oip
from mip.protocol.dtypes import TABLE

FIXED = [d for d in TABLE if d.itemsize and d.name != "BF16"]


def _request(inputs, outputs=(), **fields) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m", model_version="2", id="r-1", **fields)
    for name, datatype, array in inputs:
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    return request


@pytest.mark.parametrize("datatype", FIXED, ids=lambda d: d.name)
def test_every_fixed_size_datatype_is_read_as_a_view_of_the_message(datatype):
    array = (np.arange(12) % 2).astype(datatype.numpy).reshape(3, 4)
    data = _request([("x", datatype.name, array), ("y", "FP32", np.ones(0, np.float32))],
                    ["out"]).SerializeToString()
    model, version, request_id, inputs, outputs = _oip.read_infer_request(data)
    assert (model, version, request_id, outputs) == ("m", "2", "r-1", ["out"])
    assert list(inputs) == ["x", "y"]
    assert inputs["x"].dtype == datatype.numpy and inputs["x"].shape == (3, 4)
    assert (inputs["x"] == array).all()
    assert inputs["x"].base is data and not inputs["x"].flags.writeable  # no copy
    assert inputs["x"].flags.aligned == (inputs["x"].ctypes.data % datatype.itemsize == 0)
    assert inputs["x"].flags.c_contiguous
    assert inputs["y"].shape == (0,)


@pytest.mark.parametrize("wrap", [bytearray, lambda b: memoryview(bytearray(b))],
                         ids=["bytearray", "memoryview"])
def test_inputs_read_from_a_buffer_keep_its_octets_exported(wrap):
    array = np.arange(8, dtype=np.float32).reshape(2, 4)
    data = wrap(_request([("x", "FP32", array)]).SerializeToString())
    inputs = _oip.read_infer_request(data)[3]
    owner = data.obj if isinstance(data, memoryview) else data
    if isinstance(data, memoryview):
        data.release()  # the caller's view: the inputs hold an export of their own
    with pytest.raises(BufferError):
        owner.extend(b"\x00" * (1 << 20))  # would move the octets under the inputs
    assert (inputs["x"] == array).all() and not inputs["x"].flags.writeable


def test_unpacked_dimensions_and_no_outputs():
    request = pb.ModelInferRequest(model_name="m")
    request.raw_input_contents.append(b"\x00" * 8)
    tensor = b"\x0a\x01x\x12\x04FP32" + b"\x18\x01\x18\x02"  # shape [1, 2], not packed
    data = request.SerializeToString() + b"\x2a" + bytes([len(tensor)]) + tensor
    model, version, request_id, inputs, outputs = _oip.read_infer_request(data)
    assert (model, version, request_id, outputs) == ("m", "", "", None)
    assert inputs["x"].shape == (1, 2)


def _uncommon() -> dict:
    x = np.ones((1, 4), np.float32)
    plain = _request([("x", "FP32", x)])
    cases = {}
    with_parameter = pb.ModelInferRequest(); with_parameter.CopyFrom(plain)  # noqa: E702
    with_parameter.parameters["priority"].int64_param = 1
    cases["request parameter"] = with_parameter.SerializeToString()
    tensor_parameter = pb.ModelInferRequest(); tensor_parameter.CopyFrom(plain)  # noqa: E702
    tensor_parameter.inputs[0].parameters["binary_data_size"].int64_param = 16
    cases["input parameter"] = tensor_parameter.SerializeToString()
    output_parameter = _request([("x", "FP32", x)], ["y"])
    output_parameter.outputs[0].parameters["classification"].int64_param = 2
    cases["output parameter"] = output_parameter.SerializeToString()
    typed = pb.ModelInferRequest(model_name="m")
    typed.inputs.add(name="x", datatype="FP32", shape=[1, 2]).contents.fp32_contents.extend([1, 2])
    cases["typed contents"] = typed.SerializeToString()
    cases["BYTES"] = _request([("x", "BYTES", np.frombuffer(b"\x01\x00\x00\x00a", np.uint8))
                               ]).SerializeToString()
    cases["BF16"] = _request([("x", "BF16", np.ones(2, ml_dtypes.bfloat16))]).SerializeToString()
    cases["unknown datatype"] = _request([("x", "FP8", x)]).SerializeToString()
    cases["named twice"] = _request([("x", "FP32", x), ("x", "FP32", x)]).SerializeToString()
    short = _request([("x", "FP32", x)])
    short.raw_input_contents[0] = b"\x00" * 15
    cases["wrong size"] = short.SerializeToString()
    missing = _request([("x", "FP32", x)])
    del missing.raw_input_contents[:]
    cases["no raw contents"] = missing.SerializeToString()
    cases["no inputs"] = pb.ModelInferRequest(model_name="m").SerializeToString()
    negative = _request([("x", "FP32", x)])
    negative.inputs[0].shape[:] = [-1, 4]
    cases["negative dimension"] = negative.SerializeToString()
    deep = _request([("x", "FP32", x)])
    deep.inputs[0].shape[:] = [1] * 33 + [4]
    cases["33 dimensions"] = deep.SerializeToString()
    data = plain.SerializeToString()
    cases["unknown field"] = data + b"\x40\x01"
    cases["fixed64 field"] = data + b"\x09" + b"\x00" * 8
    cases["truncated"] = data[:-1]
    cases["bad varint"] = data + b"\x3a" + b"\xff" * 11
    cases["invalid UTF-8"] = b"\x0a\x02\xc3\x28" + data
    # field 1 in the low bits of a key over 32 bits: not field 1 (protobuf refuses it)
    cases["key over 32 bits"] = bytes([0x8A, 0x80, 0x80, 0x80, 0x80, 0x01]) + b"\x01Z" + data
    return cases


@pytest.mark.parametrize("name,data", list(_uncommon().items()), ids=list(_uncommon()))
def test_anything_uncommon_is_left_to_protobuf(name, data):
    assert _oip.read_infer_request(data) is None


def test_every_cut_of_a_request_is_read_or_refused_without_an_exception():
    data = _request([("x", "FP32", np.arange(6, dtype=np.float32).reshape(2, 3))],
                    ["y", "z"]).SerializeToString()
    for end in range(len(data) + 1):
        _oip.read_infer_request(data[:end])
    rng = np.random.default_rng(7)
    for _ in range(2000):
        noisy = bytearray(data)
        noisy[rng.integers(len(noisy))] = rng.integers(256)
        _oip.read_infer_request(bytes(noisy))


@pytest.mark.parametrize("outputs", [
    {"y": np.arange(10, dtype=np.float32).reshape(1, 10)},
    {d.name.lower(): (np.arange(6) % 2).astype(d.numpy).reshape(2, 3) for d in FIXED},
    {"": np.ones(0, np.float16), "scalar": np.array(3, np.int64)},
    {"big": np.ones((2, 4096), np.float32), "small": np.ones(3, np.bool_),
     "bigger": np.ones(70000, np.uint8)},
    {"rows": np.arange(40, dtype=np.float32).reshape(4, 10)[1:3]},  # a batch's slice
], ids=["mlp", "every datatype", "empty name and scalar", "views", "slice"])
def test_a_reply_is_what_protobuf_writes(outputs):
    mine = _oip.write_infer_reply("m", "2", "r-1", outputs)
    theirs = grpc_codec.encode_reply(pb.ModelInferRequest(id="r-1"), InferResult("m", "2", outputs),
                                     True)

    def whole(reply):
        return b"".join(reply) if isinstance(reply, list) else reply
    assert whole(mine) == whole(theirs)
    if any(a.nbytes >= 16384 for a in outputs.values()):
        assert isinstance(mine, list)  # large tensors are sent as views, not copied
    else:
        assert isinstance(mine, bytes)


@pytest.mark.parametrize("array", [
    np.ones((4, 4), np.float32)[:, 1],  # not contiguous
    np.array([b"a"], object),
    np.ones(2, ml_dtypes.bfloat16),
    np.ones(2, ">f4"),
], ids=["strided", "BYTES", "BF16", "big-endian"])
def test_a_reply_it_cannot_write_is_left_to_protobuf(array):
    assert _oip.write_infer_reply("m", "1", "", {"y": array}) is None
