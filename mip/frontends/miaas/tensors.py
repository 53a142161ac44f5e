"""Open Inference Protocol REST bodies <-> numpy tensors.

Jobs carry their inputs and results as the JSON bodies of the Open Inference Protocol
(KServe v2) REST API, so one schema serves ``/v1`` and ``/v2``::

    {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [...]}],
     "outputs": [{"name": "output"}]}                       # outputs: optional

    {"model_name": "identity", "model_version": "1",
     "outputs": [{"name": "output", "shape": [1, 16], "datatype": "FP32", "data": [...]}]}

``data`` is row-major, flat or nested. ``BYTES`` elements are strings (UTF-8). Inputs are
decoded as ``/v2`` decodes them and checked by the engine (:meth:`DataPlane.validate`):
only the job envelope is this module's.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from mip.errors import InvalidInput
from mip.frontends.oip import codec
from mip.protocol import datatype_of

__all__ = ["decode_inputs", "encode_outputs"]


def _shape(value: Any, name: str) -> list[int]:
    # JSON's types checked here: codec.check_shape would also take 1.5 or "2" for a dimension.
    if not isinstance(value, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise InvalidInput(f"input {name!r}: 'shape' must be a list of at most {codec.MAX_DIMS} "
                           f"non-negative integers")
    return value


def decode_inputs(body: Any) -> tuple[dict[str, np.ndarray], list[str] | None]:
    """Turn an OIP REST inference request body into tensors, with the decoder of the
    ``/v2`` REST frontend (:func:`mip.frontends.oip.codec.from_list`).

    Returns:
        (input name -> array, names of the outputs asked for or ``None`` for all).

    Raises:
        InvalidInput: the body is not a valid request (the message says where).
    """
    if not isinstance(body, dict):
        raise InvalidInput("'input_data' must be an object with an 'inputs' list")
    items = body.get("inputs")
    if not isinstance(items, list) or not items:
        raise InvalidInput("'input_data.inputs' must be a non-empty list")
    tensors: dict[str, np.ndarray] = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise InvalidInput(f"'input_data.inputs[{i}]' must be an object")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"'input_data.inputs[{i}].name' must be a non-empty string")
        if name in tensors:
            raise InvalidInput(f"input {name!r} appears twice")
        datatype = item.get("datatype")
        if not isinstance(datatype, str):
            raise InvalidInput(f"input {name!r}: 'datatype' must be a string such as 'FP32'")
        shape = _shape(item.get("shape"), name)
        if "data" not in item:
            raise InvalidInput(f"input {name!r}: 'data' is missing")
        tensors[name] = codec.from_list(f"input {name!r}", datatype, shape, item["data"])
    outputs = body.get("outputs")
    wanted = None
    if outputs is not None:
        if not isinstance(outputs, list) or not all(
                isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs):
            raise InvalidInput("'input_data.outputs' must be a list of {\"name\": ...} objects")
        wanted = [o["name"] for o in outputs] or None
    return tensors, wanted


def _json_element(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        octets = bytes(value)
        try:
            return octets.decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(octets).decode("ascii")
    if isinstance(value, str):
        return value
    inner = getattr(value, "value", None)  # mip.Text / mip.Json values
    if inner is not None and not isinstance(inner, (bytes, bytearray, memoryview)):
        return inner
    data = getattr(value, "data", None)  # mip.Image and raw values
    if data is not None:
        return _json_element(data)
    if isinstance(value, np.generic):
        return value.item()
    return value


def encode_outputs(outputs: dict[str, np.ndarray], model: str, version: str) -> dict:
    """An OIP REST inference response body for ``outputs`` (data flattened row-major;
    ``BYTES`` as UTF-8 strings, or base64 when not UTF-8)."""
    encoded = []
    for name, array in outputs.items():
        array = np.asarray(array)
        if array.dtype == object or array.dtype.kind in "SU":
            datatype = "BYTES"
            data = [_json_element(v) for v in array.reshape(-1).tolist()]
        else:
            datatype = datatype_of(array)
            if datatype == "BF16":
                array = array.astype(np.float32)
            data = array.reshape(-1).tolist()
        encoded.append({"name": name, "datatype": datatype, "shape": list(array.shape),
                        "data": data})
    return {"model_name": model, "model_version": version, "outputs": encoded}
