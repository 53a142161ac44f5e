"""Tensor data types as the serving layer names them.

The engine speaks Open Inference Protocol type names (``"FP32"``, ``"INT64"``,
``"BYTES"`` ...) in metadata and numpy dtypes in tensors. This table is the one
place where those names meet numpy and ONNX; it does not import the codec, so
the engine stays independent of any wire format.
"""

from __future__ import annotations

import numpy as np

__all__ = ["to_numpy", "from_numpy", "from_onnx_type", "DATATYPES"]

#: OIP name -> numpy dtype. ``BYTES`` tensors are numpy object arrays whose
#: elements are ``bytes``, ``str`` or value objects (KubeMo TEXT/JSON/IMAGE).
_NUMPY = {
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
}

DATATYPES = frozenset(_NUMPY) | {"BF16"}

# ONNX Runtime reports types as "tensor(<onnx name>)".
_ONNX = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float": "FP32",
    "double": "FP64",
    "string": "BYTES",
    "bfloat16": "BF16",
}

_FROM_NUMPY = {dtype: name for name, dtype in _NUMPY.items()}


def to_numpy(datatype: str) -> np.dtype:
    """The numpy dtype of an OIP datatype name (``"BF16"`` needs ``ml_dtypes``)."""
    if datatype == "BF16":
        import ml_dtypes  # imported on demand: only bfloat16 models need it

        return np.dtype(ml_dtypes.bfloat16)
    try:
        return _NUMPY[datatype]
    except KeyError:
        raise ValueError(f"unknown datatype {datatype!r}") from None


def from_numpy(dtype: np.dtype) -> str:
    """The OIP datatype name of a numpy dtype (strings and bytes map to ``"BYTES"``)."""
    dtype = np.dtype(dtype)
    name = _FROM_NUMPY.get(dtype)
    if name is not None:
        return name
    if dtype.kind in "SU":
        return "BYTES"
    if dtype.name == "bfloat16":
        return "BF16"
    raise ValueError(f"numpy dtype {dtype} has no inference datatype")


def from_onnx_type(onnx_type: str) -> str:
    """The OIP datatype name of an ONNX Runtime type string such as ``"tensor(float)"``."""
    inner = onnx_type[len("tensor(") : -1] if onnx_type.startswith("tensor(") else onnx_type
    try:
        return _ONNX[inner]
    except KeyError:
        raise ValueError(f"ONNX type {onnx_type!r} is not a supported tensor type") from None
