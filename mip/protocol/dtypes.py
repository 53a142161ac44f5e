"""The one table of tensor datatypes: Open Inference Protocol names, MIP wire codes, numpy
dtypes, element sizes, ONNX element types and the KServe v2 typed-contents fields.

Every other module reads this table (the MIP codec builds its C lookup arrays from it at
import), so a datatype is added or changed here and nowhere else. Names are the
protocol's (``"FP32"``, ``"BYTES"``); ``BYTES`` tensors are numpy object arrays whose
elements are ``bytes`` (``str`` and KubeMo values are accepted when encoding).
"""

from __future__ import annotations

from typing import NamedTuple

import ml_dtypes
import numpy as np

from mip.errors import InvalidInput

__all__ = [
    "BY_NAME",
    "DATATYPES",
    "DATATYPE_NAMES",
    "TABLE",
    "Datatype",
    "numpy_dtype",
]


class Datatype(NamedTuple):
    """One tensor datatype, as each layer names it.

    Attributes:
        name: the Open Inference Protocol (KServe v2) name, e.g. ``"FP32"``.
        code: the MIP wire code (octet 0 of a tensor value; ``docs/protocol.md``).
        numpy: the numpy dtype tensors of this datatype have.
        itemsize: octets per element on every wire (0 for ``BYTES``: length-prefixed).
        onnx: the ONNX element type name (ONNX Runtime reports ``tensor(<onnx>)``).
        contents: the ``InferTensorContents`` field of KServe v2's typed contents, or
            ``None`` where the protocol has none (FP16, BF16: raw contents only).
    """

    name: str
    code: int
    numpy: np.dtype
    itemsize: int
    onnx: str
    contents: str | None


#: Every datatype, in wire-code order.
TABLE: tuple[Datatype, ...] = (
    Datatype("BOOL", 1, np.dtype(np.bool_), 1, "bool", "bool_contents"),
    Datatype("UINT8", 2, np.dtype(np.uint8), 1, "uint8", "uint_contents"),
    Datatype("UINT16", 3, np.dtype(np.uint16), 2, "uint16", "uint_contents"),
    Datatype("UINT32", 4, np.dtype(np.uint32), 4, "uint32", "uint_contents"),
    Datatype("UINT64", 5, np.dtype(np.uint64), 8, "uint64", "uint64_contents"),
    Datatype("INT8", 6, np.dtype(np.int8), 1, "int8", "int_contents"),
    Datatype("INT16", 7, np.dtype(np.int16), 2, "int16", "int_contents"),
    Datatype("INT32", 8, np.dtype(np.int32), 4, "int32", "int_contents"),
    Datatype("INT64", 9, np.dtype(np.int64), 8, "int64", "int64_contents"),
    Datatype("FP16", 10, np.dtype(np.float16), 2, "float16", None),
    Datatype("FP32", 11, np.dtype(np.float32), 4, "float", "fp32_contents"),
    Datatype("FP64", 12, np.dtype(np.float64), 8, "double", "fp64_contents"),
    Datatype("BYTES", 13, np.dtype(object), 0, "string", "bytes_contents"),
    Datatype("BF16", 14, np.dtype(ml_dtypes.bfloat16), 2, "bfloat16", None),
)

#: name -> :class:`Datatype`.
BY_NAME: dict[str, Datatype] = {d.name: d for d in TABLE}
#: name -> numpy dtype.
DATATYPES: dict[str, np.dtype] = {d.name: d.numpy for d in TABLE}
#: MIP wire code -> name.
DATATYPE_NAMES: dict[int, str] = {d.code: d.name for d in TABLE}

_KNOWN = ", ".join(BY_NAME)


def numpy_dtype(datatype: str, what: str = "tensor") -> np.dtype:
    """The numpy dtype of a datatype name such as ``"FP32"`` (one dict lookup).

    Args:
        datatype: the protocol name.
        what: what carries it, for the message (e.g. ``"input 'x'"``).

    Raises:
        InvalidInput: not a name of the table (the one error for an unknown datatype
            name, wherever it comes from; a numpy dtype without a datatype is a
            ``TypeError`` of :func:`mip.protocol.datatype_of`).
    """
    try:
        return DATATYPES[datatype]
    except (KeyError, TypeError):  # TypeError: not even a string (a JSON list, ...)
        raise InvalidInput(f"{what} has unknown datatype {datatype!r} "
                           f"(the datatypes are {_KNOWN})") from None
