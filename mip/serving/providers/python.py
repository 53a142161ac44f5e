"""Python models: ``NAME/model.py`` or ``NAME/VERSION/model.py``.

The file defines one model class (or ``config.json`` names it: ``"python": {"class":
"Name", "kwargs": {...}}``); the repository builds it with those keyword arguments.
A relative ``path`` (or ``*_path``) argument is resolved against the folder of
``model.py`` (then the model's folder), and a CUDA ``device`` in the config becomes
``device_id=N`` for classes that take it.

Two kinds of class are served:

* **KubeMo lifecycle** (``preprocess``, ``forward``, ``postprocess``, ``concat``; e.g. a
  subclass of ``mip.kubemo.adaptor.onnx.Inference``). Every input and output is a
  ``BYTES`` tensor of shape ``[-1]``: one value per row (item), as the engine holds
  values: ``str`` (text), bytes-like (an image), the decoded object (JSON), or
  ``mip.Value`` (an application's kind). The model is given each input as KubeMo's server
  gives it (a ``Dynamic`` of its kind and octets) and its outputs become engine values
  again; frontends turn engine values into their protocol's. A batch of rows is one call
  of the model, which runs ``preprocess`` per item, ``concat``, one ``forward`` and
  ``postprocess`` per row, as KubeMo does. Names default to ``input_0``... and
  ``output_0``; ``config.json`` ``inputs``/``outputs`` rename them or declare tensors.
* **Tensor models**: a class with ``infer(inputs: dict) -> dict`` and ``inputs`` /
  ``outputs`` attributes (lists of ``TensorSpec`` or ``(name, datatype, shape)``), or
  those lists in ``config.json``.
"""

from __future__ import annotations

import importlib.util
import inspect
import io
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

import mip as codec
from mip.errors import ConfigError, InternalError, InvalidValue
from mip.kubemo.protocol import IMAGE, JSON, TEXT
from mip.kubemo.serialize import Dynamic, wire_form
from mip.protocol.dtypes import numpy_dtype
from mip.serving.config import PLATFORM_PYTHON, ModelConfig, TensorSpec
from mip.serving.providers.onnx import parse_device

__all__ = ["PythonRunner", "load_python_model"]

_LIFECYCLE = ("preprocess", "forward", "postprocess", "concat")
# Engine values a lifecycle model's output may already be (mip.kubemo's Text and Json are
# codec values, not str or dict).
_PLAIN = (str, bytes, bytearray, memoryview, np.ndarray, dict, list, int, float, type(None))
# A reload imports the file again while the old module still serves: names must differ.
_module_numbers = itertools.count(1)


def _is_lifecycle(obj: Any) -> bool:
    return all(callable(getattr(obj, name, None)) for name in _LIFECYCLE)


def _is_model_class(obj: Any, module: str) -> bool:
    return (inspect.isclass(obj) and obj.__module__ == module and not inspect.isabstract(obj)
            and (_is_lifecycle(obj) or callable(getattr(obj, "infer", None))))


def _import(path: Path, name: str) -> Any:
    module_name = f"_mip_model_{name}_{next(_module_numbers)}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None  # a path ending in .py always has both
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def _choose_class(module: Any, wanted: str | None, path: Path) -> Any:
    if wanted:
        cls = getattr(module, wanted, None)
        if cls is None:
            raise ConfigError(f"{path.name} defines no {wanted!r}")
        return cls
    candidates = [obj for obj in vars(module).values() if _is_model_class(obj, module.__name__)]
    if len(candidates) != 1:
        found = ", ".join(c.__name__ for c in candidates) or "none"
        raise ConfigError(f"{path.name} must define exactly one model class (KubeMo lifecycle "
                          f"or infer()); found {found}: name one in config.json "
                          f"'python': {{'class': ...}}")
    return candidates[0]


def _resolve_paths(kwargs: dict[str, Any], folder: Path) -> dict[str, Any]:
    resolved = {}
    for key, value in kwargs.items():
        if (key == "path" or key.endswith("_path")) and isinstance(value, str):
            candidate = Path(value)
            if not candidate.is_absolute():
                here, above = folder / candidate, folder.parent / candidate
                candidate = here if here.exists() or not above.exists() else above
            value = str(candidate)
        elif key in ("input_names", "output_names") and isinstance(value, list):
            value = tuple(value)  # KubeMo declares these as tuples
        resolved[key] = value
    return resolved


def _spec(item: Any) -> TensorSpec:
    if isinstance(item, TensorSpec):
        return item
    if isinstance(item, dict):
        return TensorSpec(item["name"], item.get("datatype", "BYTES"),
                          tuple(item.get("shape", (-1,))))
    if isinstance(item, str):
        return TensorSpec(item, "BYTES", (-1,))
    name, datatype, shape = item
    return TensorSpec(name, datatype, tuple(shape))


def _specs(configured: tuple, declared: Any, default_prefix: str) -> list[TensorSpec]:
    if configured:
        return [_spec(item) for item in configured]
    if declared:
        return [_spec(item) for item in declared]
    return [TensorSpec(f"{default_prefix}_0", "BYTES", (-1,))]


def _engine_value(value: Any) -> Any:
    """A lifecycle model's output value as the engine's: KubeMo values (``kind`` and
    ``encode()``: ``mip.kubemo``'s, the ``kubemo`` package's, or an application's
    registered kind) and codec values become ``str`` (TEXT), ``bytes`` (IMAGE), the decoded
    object (JSON), or ``mip.Value`` (an application's kind: no plain form); plain values
    pass as they are."""
    if isinstance(value, _PLAIN):
        return value
    serial = getattr(value, "serial", None)  # KubeMo's Dynamic holds its value here
    if serial is not None and getattr(value, "kind", None) is None:
        value = serial
    if isinstance(value, (codec.Text, codec.Json)):  # mip.kubemo's Text and Json too
        try:
            return value.value
        except InvalidValue as exc:
            raise InternalError(f"the model returned a JSON value that is not JSON: "
                                f"{exc}") from None
    if isinstance(value, codec.Image):
        return value.data
    if isinstance(value, codec.Value):
        return value
    kind, encode = getattr(value, "kind", None), getattr(value, "encode", None)
    if not isinstance(kind, int) or not callable(encode):
        return value
    data = encode()
    if isinstance(data, str):
        data = data.encode()
    if kind == TEXT:
        return bytes(data).decode()
    if kind == JSON:
        try:
            return json.loads(data)
        except ValueError as exc:
            raise InternalError(f"the model returned a JSON value that is not JSON: "
                                f"{exc}") from None
    if kind == IMAGE:
        return bytes(data)
    try:
        return codec.Value(kind, data)
    except (ValueError, OverflowError) as exc:
        raise InternalError(f"the model returned a value of kind {kind}: {exc}") from None


def _model_input(model: Any) -> Any:
    """The function that turns an engine value (``str``, bytes-like, decoded JSON,
    ``mip.Value``) into what KubeMo's server gives ``model``'s ``preprocess``: a
    ``Dynamic`` of its kind and octets, the ``kubemo`` package's for a model written
    against that package (its lifecycle does not accept ``mip.kubemo``'s), else
    ``mip.kubemo``'s (a kind the model registered reaches its class). Numpy arrays pass
    as they are."""
    dynamic: Any = Dynamic
    if any(c.__module__.split(".")[0] == "kubemo" for c in type(model).__mro__):
        # the user's model already imported kubemo
        dynamic = importlib.import_module("kubemo.serialize").Dynamic

    def convert_input(value: Any) -> Any:
        wire = wire_form(value)
        return value if wire is None else dynamic(wire[0], io.BytesIO(wire[1]))

    return convert_input


class PythonRunner:
    """A loaded Python model.

    Attributes:
        model: the model object.
        lifecycle: whether it is served through KubeMo's lifecycle.
    """

    platform = PLATFORM_PYTHON

    def __init__(self, model: Any, config: ModelConfig, module_name: str | None = None):
        self.model = model
        self.lifecycle = _is_lifecycle(model)
        self._module_name = module_name
        self.inputs = _specs(config.inputs, getattr(model, "inputs", None)
                             if not self.lifecycle else None, "input")
        self.outputs = _specs(config.outputs, getattr(model, "outputs", None)
                              if not self.lifecycle else None, "output")
        self._convert = _model_input(model)
        self._dtypes = {s.name: numpy_dtype(s.datatype) for s in self.outputs}

    def run(self, inputs: dict[str, np.ndarray],
            outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run one batch (rows = items for lifecycle models)."""
        if not self.lifecycle:
            results = self.model.infer(inputs)
            names = outputs or [s.name for s in self.outputs]
            missing = [n for n in names if n not in results]
            if missing:
                raise InternalError(f"model returned no {', '.join(missing)}")
            return {name: np.asarray(results[name]) for name in names}
        columns = [inputs[spec.name] for spec in self.inputs]
        rows = len(columns[0])
        convert = self._convert
        # One Python object per item is KubeMo's model: values are not tensors.
        items = [tuple(convert(col[i]) for col in columns) for i in range(rows)]
        results = self.model(*items)
        if len(results) != rows:
            raise InternalError(f"the model returned {len(results)} items for {rows} inputs "
                                f"(each pre-processed item must have one row)")
        for item in results:
            if len(item) != len(self.outputs):
                raise InternalError(f"postprocess returned {len(item)} values; the model "
                                    f"declares {len(self.outputs)} outputs (config.json "
                                    f"'outputs')")
        produced = {}
        for j, spec in enumerate(self.outputs):
            if outputs and spec.name not in outputs:
                continue
            if spec.datatype == "BYTES":
                column = np.empty(rows, dtype=object)
                for i, item in enumerate(results):
                    column[i] = _engine_value(item[j])
            else:
                column = np.stack([np.asarray(item[j]) for item in results]).astype(
                    self._dtypes[spec.name], copy=False)
            produced[spec.name] = column
        return produced

    def close(self) -> None:
        """Drop the model (KubeMo's unload is the object's ``__del__``)."""
        unload = getattr(self.model, "unload", None)
        if callable(unload) and not self.lifecycle:
            unload()
        self.model = None
        if self._module_name:
            sys.modules.pop(self._module_name, None)


def load_python_model(path: Path, config: ModelConfig, name: str = "model") -> PythonRunner:
    """Import ``path`` (a ``model.py``), build its model class and wrap it.

    Raises:
        ConfigError: no single model class, or a device the class cannot take.
        Exception: whatever the model's import or constructor raises.
    """
    module = _import(path, name)
    try:
        cls = _choose_class(module, config.python.get("class"), path)
        kwargs = _resolve_paths(dict(config.python.get("kwargs", {})), path.parent)
        kind, index = parse_device(config.device)
        if kind == "cuda" and "device_id" not in kwargs:
            try:
                parameters = inspect.signature(cls).parameters
            except (TypeError, ValueError):
                parameters = {}  # type: ignore[assignment]
            if "device_id" not in parameters:
                raise ConfigError(f"{cls.__name__} takes no device_id, so it cannot be "
                                  f"placed on {config.device}")
            kwargs["device_id"] = index
        model = cls(**kwargs)
        return PythonRunner(model, config, module.__name__)
    except BaseException:
        sys.modules.pop(module.__name__, None)
        raise
