"""Tensors of the Open Inference Protocol <-> numpy, shared by the gRPC and REST frontends.

Raw tensor data (gRPC ``raw_input_contents``, REST binary extension) is little-endian,
row-major, without padding; it becomes a numpy **view** of the received buffer
(``np.frombuffer``), never a copy. ``BYTES`` tensors are a sequence of elements, each a
4-octet little-endian length and that many octets, read and written by the codec's
:func:`mip.protocol.decode_bytes` / :func:`mip.protocol.encode_bytes` (every length
checked against the octets present before anything is taken). Datatype names and their
numpy dtypes come from the one table, :mod:`mip.protocol.dtypes`.

Everything here raises :class:`mip.errors.InvalidInput` on bad input, so each frontend
answers with its protocol's "invalid argument" status.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence

import numpy as np

from mip.errors import InvalidInput, ProtocolError
from mip.protocol import bytes_elements as _bytes_elements
from mip.protocol import datatype_of, numpy_dtype
from mip.protocol import decode_bytes as _decode_bytes
from mip.protocol import encode_bytes as _encode_bytes

__all__ = [
    "MAX_DIMS",
    "PARAMETERS_READ",
    "UNSUPPORTED_PARAMETERS",
    "bytes_elements",
    "check_parameters",
    "check_shape",
    "classify",
    "datatype_of",
    "decode_bytes",
    "element_count",
    "encode_bytes",
    "from_list",
    "from_raw",
    "numpy_dtype",
    "to_raw",
]

if sys.byteorder != "little":  # raw tensor data is little-endian and decoded as views
    raise ImportError("the Open Inference Protocol frontends need a little-endian host")

#: dimensions a tensor may have (Triton's limit is the same order of magnitude).
MAX_DIMS = 32

def check_shape(shape: Iterable[int], name: str = "tensor") -> tuple[int, ...]:
    """``shape`` as a tuple of non-negative ints, at most :data:`MAX_DIMS` of them.

    Raises:
        InvalidInput: a negative or non-integer dimension, or too many dimensions.
    """
    try:
        dims = tuple(map(int, shape))
    except (TypeError, ValueError):
        raise InvalidInput(f"{name} has a shape that is not a list of integers: "
                           f"{shape!r}") from None
    if len(dims) > MAX_DIMS:
        raise InvalidInput(f"{name} has {len(dims)} dimensions; at most {MAX_DIMS} are allowed")
    if dims and min(dims) < 0:
        raise InvalidInput(f"{name} has a negative dimension in shape {list(dims)}")
    return dims


#: (datatype, shape as sent) -> (dims, dtype, element count): what :func:`check_shape` and
#: :func:`numpy_dtype` make of them, kept for the few layouts a server sees.
_LAYOUTS: dict = {}
_LAYOUTS_KEPT = 1024


def _layout(datatype: str, shape, name: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """:func:`check_shape` of ``shape`` (first, so its errors come first), the numpy dtype
    of ``datatype`` and the element count, looked up when seen before. Shapes that are
    equal as tuples (``[1, 16]``, ``[1.0, 16]``) have the same dimensions, so a layout
    found under an equal key is the one :func:`check_shape` would make."""
    key: tuple | None
    try:
        key = (datatype, tuple(shape))
        found = _LAYOUTS.get(key)
    except TypeError:  # not iterable, or a dimension that is not hashable
        key = found = None
    if found is None:
        dims = check_shape(shape, name)
        dtype = numpy_dtype(datatype, name)
        found = (dims, dtype, math.prod(dims))
        if key is not None:
            if len(_LAYOUTS) >= _LAYOUTS_KEPT:
                _LAYOUTS.clear()
            _LAYOUTS[key] = found
    return found


def element_count(shape: tuple[int, ...]) -> int:
    """Elements in a tensor of ``shape`` (1 for a scalar)."""
    return math.prod(shape)


def decode_bytes(buffer, count: int, name: str = "tensor") -> np.ndarray:
    """Read ``count`` BYTES elements (u32 little-endian length + octets each) with the
    codec's :func:`mip.protocol.decode_bytes`: a 1-D numpy object array of ``bytes``.

    Raises:
        InvalidInput: a length runs past the end, fewer or more elements than ``count``,
            or octets left over.
    """
    try:
        return _decode_bytes(buffer, count)
    except ProtocolError as exc:
        raise InvalidInput(f"{name}: {exc}") from None


def bytes_elements(array: np.ndarray, name: str = "tensor") -> list[bytes]:
    """The elements of a BYTES (object, ``S`` or ``U``) array as ``bytes``, row-major
    (:func:`mip.protocol.bytes_elements`; ``name`` is the tensor's, as elsewhere here)."""
    return _bytes_elements(array)


def encode_bytes(array: np.ndarray, name: str = "tensor") -> bytes:
    """A BYTES array as u32 little-endian length + octets per element, row-major
    (:func:`mip.protocol.encode_bytes`).

    Raises:
        InvalidInput: an element larger than 4 GiB.
    """
    try:
        return _encode_bytes(array)
    except ValueError as exc:
        raise InvalidInput(f"{name}: {exc}") from None


def from_raw(name: str, datatype: str, shape: Sequence[int], buffer) -> np.ndarray:
    """A tensor from raw little-endian row-major octets, as a view of ``buffer``.

    Args:
        name: the tensor's name (for error messages).
        datatype: the protocol datatype, e.g. ``"FP16"``.
        shape: the tensor's dimensions.
        buffer: a bytes-like object holding exactly the tensor's octets.

    Raises:
        InvalidInput: the size does not match the shape and datatype.
    """
    dims, dtype, count = _layout(datatype, shape, name)
    if dtype.hasobject:
        return decode_bytes(buffer, count, name).reshape(dims)
    kind = type(buffer)
    size = len(buffer) if kind is bytes else (buffer if kind is memoryview
                                              else memoryview(buffer)).nbytes
    expected = count * dtype.itemsize
    if size != expected:
        raise InvalidInput(f"{name}: shape {list(dims)} of {datatype} takes {expected} octets, "
                           f"{size} were sent")
    # (frombuffer: the array holds the buffer's export, so a mapping stays mapped under it)
    return np.frombuffer(buffer, dtype).reshape(dims)


def _flatten(data, name: str) -> list:
    if not isinstance(data, list):
        return [data]
    if data and isinstance(data[0], list):
        flat: list = []
        stack = [iter(data)]
        while stack:  # iterative, so a deeply nested body cannot exhaust the C stack
            for item in stack[-1]:
                if isinstance(item, list):
                    if len(stack) > MAX_DIMS:
                        raise InvalidInput(f"{name}: data nested deeper than {MAX_DIMS} lists")
                    stack.append(iter(item))
                    break
                flat.append(item)
            else:
                stack.pop()
        return flat
    return data


_INTEGRAL = frozenset((int, bool))  # what integer and BOOL data may hold without a float


def from_list(name: str, datatype: str, shape: Sequence[int], data) -> np.ndarray:
    """A tensor from a list of values (typed gRPC contents or JSON ``data``).

    Nested lists are flattened (row-major). BYTES elements may be ``str`` (stored as
    UTF-8) or ``bytes``. FP16 and BF16 accept numbers here too (the REST form).

    Raises:
        InvalidInput: the element count does not match the shape, or a value does not
            fit the datatype.
    """
    dims, dtype, count = _layout(datatype, shape, name)
    values = _flatten(data, name)
    if len(values) != count:
        raise InvalidInput(f"{name}: shape {list(dims)} holds {count} elements, "
                           f"{len(values)} were sent")
    if dtype == object:
        out = np.empty(count, dtype=object)
        for i, value in enumerate(values):
            if isinstance(value, str):
                out[i] = value.encode("utf-8")
            elif isinstance(value, (bytes, bytearray)):
                out[i] = bytes(value)
            else:
                raise InvalidInput(f"{name}: BYTES element {i} is a {type(value).__name__}, "
                                   "not a string")
        return out.reshape(dims)
    try:
        if dtype.kind in "iub" and not _INTEGRAL.issuperset(map(type, values)):
            if any(isinstance(v, float) for v in values):
                raise InvalidInput(f"{name}: {datatype} data holds a non-integer value")
        array = np.array(values, dtype=dtype)
    except (OverflowError, ValueError, TypeError) as exc:
        raise InvalidInput(f"{name}: data does not fit {datatype}: {exc}") from None
    if array.ndim != 1:
        raise InvalidInput(f"{name}: data must be numbers, not nested objects")
    return array.reshape(dims)


#: outputs smaller than this many octets are copied out (one call), larger ones viewed
_COPY_BELOW = 16 << 10


def to_raw(array: np.ndarray, name: str = "tensor"):
    """An output tensor's raw octets: a zero-copy memoryview when it is contiguous and
    large, else one copy (``bytes``); BYTES are encoded with :func:`encode_bytes`."""
    dtype = array.dtype
    if dtype.hasobject or dtype.kind in "SU":
        return encode_bytes(array, name)
    if not dtype.isnative:
        array = array.astype(dtype.newbyteorder("="))
    if array.nbytes < _COPY_BELOW:
        return array.tobytes()
    flat = np.ascontiguousarray(array).reshape(-1)
    # Viewed as octets so every dtype (bfloat16 included) exports a plain buffer.
    return flat.view(np.uint8).data


# -- parameters of Triton's extensions ---------------------------------------------------

#: Triton's request, input and output parameters that this server does not implement:
#: a request that sets one is refused (INVALID_ARGUMENT / 400) naming it, rather than
#: answered as if it were absent. A zero sequence_id and false sequence flags are
#: what clients send for "no sequence" and pass. (The shared-memory parameters are read
#: by mip.frontends.oip.shm.)
UNSUPPORTED_PARAMETERS = {
    "request": ("sequence_id", "sequence_start", "sequence_end", "priority"),
    "input": (),
    "output": (),
}
#: the parameter names :func:`check_parameters` reads, by kind: a request, input or
#: output whose parameters hold none of them passes it unchanged.
PARAMETERS_READ = {
    "request": frozenset(UNSUPPORTED_PARAMETERS["request"]),
    "input": frozenset(UNSUPPORTED_PARAMETERS["input"]),
    "output": frozenset((*UNSUPPORTED_PARAMETERS["output"], "classification")),
}
_EXPLANATIONS = {
    "sequence_id": "the model is not a sequence model (mip has no sequence batching)",
    "sequence_start": "the model is not a sequence model (mip has no sequence batching)",
    "sequence_end": "the model is not a sequence model (mip has no sequence batching)",
    "priority": "mip has no request priorities",
}


def check_parameters(request: dict | None, inputs: dict[str, dict],
                     outputs: dict[str, dict]) -> dict[str, int] | None:
    """Refuse the parameters of extensions this server does not implement; return the
    classification extension's requests (output name -> class count), or ``None``.

    Args:
        request: the request's parameters (name -> plain value), or ``None``.
        inputs / outputs: tensor name -> its parameters (name -> plain value); only
            tensors that carry parameters need to be given.

    Raises:
        InvalidInput: a parameter this server does not implement, or a class count that
            is not a positive integer.
    """
    for key in UNSUPPORTED_PARAMETERS["request"]:
        value = (request or {}).get(key)
        if value not in (None, 0, "", False):
            raise InvalidInput(f"request parameter {key!r} is not supported: "
                               f"{_EXPLANATIONS[key]}")
    for kind, tensors in (("input", inputs), ("output", outputs)):
        for name, parameters in tensors.items():
            for key in UNSUPPORTED_PARAMETERS[kind]:
                if key in parameters:
                    raise InvalidInput(f"{kind} {name!r}: parameter {key!r} is not supported: "
                                       f"{_EXPLANATIONS[key]}")
    classes = None
    for name, parameters in outputs.items():
        count = parameters.get("classification")
        if count is None:
            continue
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise InvalidInput(f"output {name!r}: parameter 'classification' must be a "
                               f"positive class count, not {count!r}")
        classes = classes or {}
        classes[name] = count
    return classes


def classify(array: np.ndarray, count: int, batched: bool,
             labels: Sequence[str] = (), name: str = "tensor") -> np.ndarray:
    """Triton's classification extension: the ``count`` largest values of ``array`` as
    BYTES ``"value:index"`` or ``"value:index:label"`` (``labels[index]``), largest first.

    A batching model's output is classified row by row (shape ``[rows, count]``), any
    other over the whole tensor (shape ``[count]``); ``count`` is cut to the number of
    classes.

    Raises:
        InvalidInput: a BYTES output (it has no order to rank by).
    """
    if array.dtype == object or array.dtype.kind in "SU":
        raise InvalidInput(f"output {name!r} is BYTES: classification needs numbers")
    if array.dtype.name == "bfloat16":
        array = array.astype(np.float32)
    rows = array.reshape(array.shape[0] if batched and array.ndim else 1, -1)
    count = min(count, rows.shape[1])
    key = rows if rows.dtype.kind == "f" else rows.astype(np.float64)
    order = np.argsort(-key, axis=1, kind="stable")[:, :count]
    top = np.take_along_axis(rows, order, axis=1)
    floating = rows.dtype.kind == "f"
    out = np.empty(order.shape, dtype=object)
    for r in range(order.shape[0]):
        for c in range(count):
            index = int(order[r, c])
            value = f"{float(top[r, c]):f}" if floating else str(int(top[r, c]))
            text = f"{value}:{index}"
            if index < len(labels):
                text += f":{labels[index]}"
            out[r, c] = text.encode("utf-8")
    return out if batched and array.ndim else out.reshape(count)
