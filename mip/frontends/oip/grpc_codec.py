"""The protobuf side of KServe v2 ``ModelInfer``: serialized messages to engine values and back.

Inference requests are read as bytes: the raw tensor fields (``raw_input_contents``) are
located in the received message (:func:`split_raw_inputs`) and handed to the engine as
numpy views of it, and the reply's raw tensor fields are appended to the serialized reply
header (:func:`encode_reply`), so tensor octets are not copied by protobuf. A request that
used ``raw_input_contents`` is answered with ``raw_output_contents``; one that used typed
``contents`` is answered with typed contents (FP16/BF16 outputs, which have no typed form,
make the reply raw). The common request (every tensor raw, no parameters) and its reply are
read and written without protobuf, by :mod:`mip.protocol.oip` (:func:`read_plain_request`
here, ``write_infer_reply`` in the service's callback): its inputs are views of the
received message, so between the socket's buffer and the batch a tensor's octets are
copied once, into that message. No I/O here: bytes in, values out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mip.errors import InvalidInput
from mip.frontends.oip import codec, shm
from mip.frontends.oip import inference_pb2 as pb
from mip.protocol.oip import read_infer_request
from mip.protocol.dtypes import BY_NAME, TABLE

__all__ = ["encode_reply", "extension_parameters", "parameter", "parse_request",
           "parse_request_header", "plain", "read_inputs", "read_plain_request",
           "split_raw_inputs", "stream_error", "stream_reply"]

# Typed contents: the field of InferTensorContents for each datatype that has one (from
# the datatype table), and the numpy type the field's values are read as before the range
# check (None: BYTES, read as a list).
_FIELD_TYPES: dict[str, type | None] = {
    "bool_contents": np.bool_, "int_contents": np.int32, "int64_contents": np.int64,
    "uint_contents": np.uint32, "uint64_contents": np.uint64, "fp32_contents": np.float32,
    "fp64_contents": np.float64, "bytes_contents": None}
_CONTENTS = {d.name: (d.contents, _FIELD_TYPES[d.contents]) for d in TABLE if d.contents}
_RAW_INPUT_FIELD = 7  # ModelInferRequest.raw_input_contents
#: requests shorter than this are parsed whole by protobuf (copying raw contents out is
#: cheaper than locating them); longer ones have their raw contents viewed in place.
_SPLIT_ABOVE = 64 << 10
_RAW_OUTPUT_TAG = b"\x32"  # ModelInferResponse.raw_output_contents: field 6, length-delimited
_STREAM_RESPONSE_TAG = b"\x12"  # ModelStreamInferResponse.infer_response: field 2


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise InvalidInput("malformed ModelInferRequest: bad varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def split_raw_inputs(data: bytes | memoryview) -> tuple[bytes, list[memoryview]]:
    """Separate a serialized ModelInferRequest's ``raw_input_contents`` from the rest.

    Returns ``(rest, raws)``: the message without those fields (to parse with protobuf)
    and each raw content as a view of ``data``, in order.

    Raises:
        InvalidInput: the top-level fields do not parse.
    """
    view = memoryview(data)
    end = len(data)
    pos = 0
    raws: list[memoryview] = []
    kept: list[memoryview] = []
    kept_from = 0
    while pos < end:
        start = pos
        key, pos = _read_varint(data, pos, end)
        wire = key & 7
        if wire == 0:
            _, pos = _read_varint(data, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _read_varint(data, pos, end)
            if length > end - pos:
                raise InvalidInput("malformed ModelInferRequest: a field runs past the end")
            if key >> 3 == _RAW_INPUT_FIELD:
                raws.append(view[pos:pos + length])
                kept.append(view[kept_from:start])
                kept_from = pos + length
            pos += length
        else:
            raise InvalidInput(f"malformed ModelInferRequest: wire type {wire}")
        if pos > end:
            raise InvalidInput("malformed ModelInferRequest: a field runs past the end")
    if not raws:  # (a message received in the shared arena: read with protobuf, rarely)
        return data if type(data) is bytes else bytes(data), raws
    kept.append(view[kept_from:end])
    return b"".join(kept), raws


def parse_request(data: bytes | memoryview) -> tuple[Any, bytes, Sequence]:
    """A serialized ModelInferRequest as ``(request, rest, raws)``: the parsed message,
    the serialized message without its raw contents (the whole of ``data`` when they were
    not split off) and the raw contents (views of ``data`` for a large request).

    Raises:
        InvalidInput: it does not parse.
    """
    try:
        if len(data) < _SPLIT_ABOVE:
            data = bytes(data)  # (no copy of bytes)
            request = pb.ModelInferRequest.FromString(data)
            return request, data, request.raw_input_contents
        rest, raws = split_raw_inputs(data)
        return pb.ModelInferRequest.FromString(rest), rest, raws
    except InvalidInput:
        raise
    except Exception as exc:  # protobuf's DecodeError and friends
        raise InvalidInput(f"malformed ModelInferRequest: {exc}") from None


def read_plain_request(data: bytes | memoryview) -> tuple | None:
    """A serialized ModelInferRequest of the common form (raw contents, no parameters) as
    ``(model_name, model_version, id, inputs, outputs)``, its inputs numpy views of
    ``data`` (``bytes``, or a ``memoryview`` of a message received in the shared arena),
    read without protobuf (:func:`mip.protocol.oip.read_infer_request`); ``None`` for any
    other request (read it with :func:`parse_request`)."""
    return read_infer_request(data) if type(data) is bytes or type(data) is memoryview else None


def parse_request_header(data: bytes | memoryview) -> Any | None:
    """The ModelInferRequest in ``data`` without its raw contents (to name its model and
    id), or ``None`` if it does not parse."""
    try:
        return pb.ModelInferRequest.FromString(split_raw_inputs(data)[0])
    except Exception:
        return None


def parameter(value: Any) -> Any:
    """An InferParameter's value (``None``: none is set)."""
    which = value.WhichOneof("parameter_choice")
    return None if which is None else getattr(value, which)


def plain(parameters: Mapping) -> dict:
    """A protobuf map of InferParameter as name -> plain value."""
    return {key: parameter(value) for key, value in parameters.items()}


def extension_parameters(request: Any, serialized: bytes) -> dict[str, int] | None:
    """:func:`codec.check_parameters` of a ModelInferRequest. Skipped when none of the
    parameter names it acts on occurs in ``serialized`` (the message without its raw
    contents): the common case, found without reading the protobuf maps (which costs
    microseconds a tensor)."""
    if (b"sequence_" not in serialized and b"priority" not in serialized
            and b"classification" not in serialized):
        return None
    tensors = [(t.name, t.parameters) for t in request.inputs if t.parameters]
    wanted = [(o.name, o.parameters) for o in request.outputs if o.parameters]
    if not (request.parameters or tensors or wanted):
        return None
    return codec.check_parameters(plain(request.parameters),
                                  {name: plain(p) for name, p in tensors},
                                  {name: plain(p) for name, p in wanted})


def read_inputs(request: Any, raws: Sequence, regions: shm.SystemSharedMemory | None = None
                ) -> dict[str, np.ndarray]:
    """The request's inputs, from its raw contents or its typed contents; with ``regions``,
    those whose parameters name a shared memory region are read from it (and have no
    raw_input_contents entry)."""
    placed = {i for i, t in enumerate(request.inputs)
              if "shared_memory_region" in t.parameters} if regions is not None else set()
    sent = len(request.inputs) - len(placed)
    if raws and len(raws) != sent:
        raise InvalidInput(f"raw_input_contents has {len(raws)} entries for {sent} inputs"
                           + (" not in shared memory" if placed else ""))
    inputs: dict[str, np.ndarray] = {}
    index = 0
    for position, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in inputs:
            raise InvalidInput(f"input {name!r} appears twice")
        if position in placed:
            assert regions is not None
            inputs[name] = regions.input(name, tensor.datatype, tensor.shape,
                                         plain(tensor.parameters))
            continue
        if raws:
            if tensor.HasField("contents"):
                raise InvalidInput(f"input {name!r} has contents and raw_input_contents; "
                                   "send one or the other")
            inputs[name] = codec.from_raw(name, tensor.datatype, tensor.shape, raws[index])
            index += 1
        else:
            inputs[name] = _from_contents(tensor)
    return inputs


def _from_contents(tensor: Any) -> np.ndarray:
    name, datatype = tensor.name, tensor.datatype
    shape = codec.check_shape(tensor.shape, name)
    entry = _CONTENTS.get(datatype)
    if entry is None:
        if datatype in BY_NAME:  # a datatype without typed contents (FP16, BF16)
            raise InvalidInput(f"input {name!r}: {datatype} has no typed contents; send it "
                               "in raw_input_contents")
        codec.numpy_dtype(datatype, f"input {name!r}")  # raises for unknown names
        raise InvalidInput(f"input {name!r}: unknown datatype {datatype!r}")
    field, wide = entry
    values = getattr(tensor.contents, field)
    count = codec.element_count(shape)
    if len(values) != count:
        raise InvalidInput(f"input {name!r}: shape {list(shape)} holds {count} elements, "
                           f"{len(values)} were sent in {field}")
    if wide is None:
        return codec.from_list(name, datatype, shape, list(values))
    array: np.ndarray = np.fromiter(values, dtype=wide, count=count)
    target = codec.numpy_dtype(datatype)
    if target != array.dtype:
        info = np.iinfo(target)
        if count and (array.min() < info.min or array.max() > info.max):
            raise InvalidInput(f"input {name!r}: a value does not fit {datatype}")
        array = array.astype(target)
    return array.reshape(shape)


def _typed_contents(contents: Any, datatype: str, array: np.ndarray, name: str) -> None:
    field, _ = _CONTENTS[datatype]
    if datatype == "BYTES":
        contents.bytes_contents.extend(codec.bytes_elements(array, name))
    else:
        getattr(contents, field).extend(array.ravel().tolist())


def encode_reply(request: Any, result: Any, raw: bool, targets: dict | None = None
                 ) -> bytes | list:
    """The serialized ModelInferResponse answering ``request`` with ``result`` (an
    :class:`~mip.serving.engine.InferResult`): bytes, or with raw outputs a list of buffers
    whose concatenation it is, the tensors' memory not copied. Outputs with ``targets``
    (:meth:`~mip.frontends.oip.shm.SystemSharedMemory.output`) are written to shared
    memory and carry only parameters (and, in a raw reply, an empty raw_output_contents
    entry, so entries stay in the order of the outputs)."""
    response = pb.ModelInferResponse(model_name=result.model, model_version=result.version,
                                     id=request.id)
    datatypes = [codec.datatype_of(a) for a in result.outputs.values()]
    raw = raw or any(d in ("FP16", "BF16") for d in datatypes)
    in_shm = shm.SystemSharedMemory.write(targets, result.outputs) if targets else {}
    parts: list = []
    for (name, array), datatype in zip(result.outputs.items(), datatypes):
        tensor = response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        if name in in_shm:
            for key, value in in_shm[name].items():
                if isinstance(value, str):
                    tensor.parameters[key].string_param = value
                else:
                    tensor.parameters[key].int64_param = value
            if raw:
                parts += (_RAW_OUTPUT_TAG, b"\x00")
        elif raw:
            content = codec.to_raw(array, name)
            parts += (_RAW_OUTPUT_TAG, _varint(len(content)), content)
        else:
            _typed_contents(tensor.contents, datatype, array, name)
    header = response.SerializeToString()
    # Fields may come in any order: the raw contents follow the header as they are.
    return [header, *parts] if parts else header


def stream_reply(reply: bytes | list) -> bytes:
    """A serialized ModelInferResponse (as :func:`encode_reply` gives it) as the
    ModelStreamInferResponse that carries it."""
    if isinstance(reply, list):
        reply = b"".join(reply)
    return _STREAM_RESPONSE_TAG + _varint(len(reply)) + reply


def stream_error(message: str, data: bytes | memoryview) -> bytes:
    """The ModelStreamInferResponse saying that the request ``data`` failed with
    ``message`` (naming the request's id, when it can be read)."""
    reply = pb.ModelStreamInferResponse(error_message=message)
    request = parse_request_header(data)
    reply.infer_response.id = request.id if request is not None else ""
    return reply.SerializeToString()
