"""ONNX Runtime provider: one ``InferenceSession`` per model version.

``device`` is ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. CUDA uses ONNX Runtime's
CUDAExecutionProvider through the same code path as the CPU; when that provider is not
available, loading fails with a clear error instead of running on the CPU unasked.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from mip.errors import DeviceUnavailable, InvalidInput
from mip.protocol.dtypes import TABLE
from mip.serving.config import PLATFORM_ONNX, TensorSpec

__all__ = ["OnnxRunner", "inference_session", "parse_device", "session_options"]

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


#: ONNX element type name -> protocol datatype name.
_FROM_ONNX = {d.onnx: d.name for d in TABLE}


def from_onnx_type(onnx_type: str) -> str:
    """The protocol datatype name of an ONNX Runtime type string such as ``"tensor(float)"``.

    Raises:
        ValueError: not a tensor type the protocol has.
    """
    inner = onnx_type[len("tensor("):-1] if onnx_type.startswith("tensor(") else onnx_type
    try:
        return _FROM_ONNX[inner]
    except KeyError:
        raise ValueError(f"ONNX type {onnx_type!r} is not a supported tensor type") from None


def parse_device(device: str) -> tuple[str, int | None]:
    """Split ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` into ``(kind, index)``."""
    kind, _, index = device.strip().lower().partition(":")
    if kind == "cpu" and not index:
        return "cpu", None
    if kind in ("cuda", "gpu"):
        if not index:
            return "cuda", 0
        if index.isdigit():
            return "cuda", int(index)
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', not {device!r}")


def inference_session(model: str | os.PathLike | bytes, device: str = "cpu",
                      options: dict[str, Any] | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` of ``model`` (a file or its octets) on
    ``device`` ('cpu', 'cuda' or 'cuda:N'), with :func:`session_options` of ``options``.

    Raises :class:`~mip.errors.DeviceUnavailable` when ONNX Runtime cannot run on the
    device: never a silent run on the CPU instead.
    """
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else str(Path(model))
    session = ort.InferenceSession(source, sess_options=session_options(**(options or {})),
                                   providers=_providers(device))
    if parse_device(device)[0] == "cuda" and CUDA_PROVIDER not in session.get_providers():
        raise DeviceUnavailable(
            f"ONNX Runtime could not start {CUDA_PROVIDER} for device {device!r} "
            f"(check the CUDA and cuDNN libraries); refusing to run on the CPU instead")
    return session


def _providers(device: str) -> list[Any]:
    import onnxruntime as ort

    kind, index = parse_device(device)
    if kind == "cpu":
        return [CPU_PROVIDER]
    available = ort.get_available_providers()
    if CUDA_PROVIDER not in available:
        raise DeviceUnavailable(
            f"device {device!r} needs ONNX Runtime's {CUDA_PROVIDER}, but this installation "
            f"offers only {', '.join(available)}; install onnxruntime-gpu with a matching CUDA, "
            f"or set the model's device to 'cpu'")
    # The CPU provider stays listed for the few operators CUDA lacks (ONNX Runtime places
    # them node by node); a CUDA provider that fails to start is caught after loading.
    return [(CUDA_PROVIDER, {"device_id": index}), CPU_PROVIDER]


_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def default_intra_op_threads() -> int:
    """Threads inside one operator when a model does not say: the usable cores but one,
    which is left to the event loop that does the network I/O (at least one).

    ONNX Runtime's own default takes every core, and its pool threads spin between runs on
    the core the event loop needs: on 2 cores a 1x784 MLP at 32 in flight cost 172 µs of
    server CPU a request over REST that way, and 57 µs with one thread."""
    from mip.workers import usable_cores

    return max(1, usable_cores() - 1)


def session_options(intra_op_threads: int | None = None, inter_op_threads: int = 0,
                    graph_optimization_level: str = "all", spin_wait: bool = True) -> Any:
    """Build ``onnxruntime.SessionOptions``.

    Args:
        intra_op_threads: threads inside one operator (``None``:
            :func:`default_intra_op_threads`; 0 = ONNX Runtime's default, every core).
        inter_op_threads: threads across independent operators (0 = default).
        graph_optimization_level: ``disable``, ``basic``, ``extended`` or ``all``.
        spin_wait: let ONNX Runtime's pool threads spin for more work after a run (its
            default). Spinning keeps back-to-back batches fast; turning it off gives the
            CPU those threads burn between sparse requests back to the network I/O that
            shares the cores.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(default_intra_op_threads() if intra_op_threads is None
                                       else intra_op_threads)
    options.inter_op_num_threads = int(inter_op_threads)
    if not isinstance(spin_wait, bool):
        raise ValueError(f"spin_wait must be true or false, not {spin_wait!r}")
    flag = "1" if spin_wait else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", flag)
    options.add_session_config_entry("session.inter_op.allow_spinning", flag)
    try:
        level = _OPT_LEVELS[graph_optimization_level]
    except KeyError:
        raise ValueError(f"graph_optimization_level must be one of {', '.join(_OPT_LEVELS)}, "
                         f"not {graph_optimization_level!r}") from None
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    return options


def _dims(shape: list[Any]) -> tuple[int, ...]:
    # ONNX Runtime reports symbolic dims as strings and unknown ones as None.
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape)


class OnnxRunner:
    """A model version served by ONNX Runtime.

    Args:
        model: path to a ``.onnx`` file, or the serialized model bytes.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        options: keyword arguments of :func:`session_options`.
        input_names / output_names: restrict (and order) the served tensors; empty = all.
    """

    platform = PLATFORM_ONNX

    def __init__(self, model: str | os.PathLike | bytes, device: str = "cpu",
                 options: dict[str, Any] | None = None,
                 input_names: tuple[str | TensorSpec, ...] = (),
                 output_names: tuple[str | TensorSpec, ...] = ()):
        self.session = inference_session(model, device, options)
        self.device = device
        all_inputs = {i.name: TensorSpec(i.name, from_onnx_type(i.type), _dims(i.shape))
                      for i in self.session.get_inputs()}
        all_outputs = {o.name: TensorSpec(o.name, from_onnx_type(o.type), _dims(o.shape))
                       for o in self.session.get_outputs()}
        self.inputs = _select(all_inputs, input_names, "input")
        self.outputs = _select(all_outputs, output_names, "output")
        missing = set(all_inputs) - {spec.name for spec in self.inputs}
        if missing:
            raise ValueError(f"the model needs inputs {', '.join(sorted(missing))}, which the "
                             f"config leaves out")
        self._output_names = [spec.name for spec in self.outputs]

    def run(self, inputs: dict[str, np.ndarray],
            outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run one batch (ONNX Runtime releases the GIL while it computes)."""
        names = outputs or self._output_names
        results = self.session.run(names, {name: _for_onnxruntime(name, array)
                                           for name, array in inputs.items()})
        return dict(zip(names, results))

    def close(self) -> None:
        """Drop the session."""
        self.session = None


def _for_onnxruntime(name: str, array: np.ndarray) -> np.ndarray:
    """Inputs as ONNX Runtime's Python API takes them.

    Its string tensors take ``str`` elements (it would store ``str(b"x")``, i.e. ``"b'x'"``, for
    a bytes element), and it has no numpy type for bfloat16.
    """
    kind = array.dtype.kind  # (dtype.name costs ~7,000 instructions: read only for "V")
    if kind == "O" or kind == "S":
        flat = array.reshape(-1)
        if any(isinstance(x, (bytes, bytearray, memoryview, np.bytes_)) for x in flat):
            try:
                texts = [bytes(x).decode("utf-8") if not isinstance(x, str) else x for x in flat]
            except UnicodeDecodeError as exc:
                raise InvalidInput(f"input {name!r}: ONNX Runtime strings are UTF-8 text, a BYTES "
                                   f"element is not ({exc.reason} at octet {exc.start})") from None
            converted = np.empty(array.shape, dtype=object)
            converted.reshape(-1)[:] = texts
            return converted
        return array
    if kind == "V" and array.dtype.name == "bfloat16":
        raise InvalidInput(f"input {name!r} is BF16, which ONNX Runtime's Python API cannot take; "
                           "send FP32 or serve the model from a Python model that converts")
    return array


def _select(specs: dict[str, TensorSpec], names: tuple[Any, ...], what: str) -> list[TensorSpec]:
    if not names:
        return list(specs.values())
    chosen = []
    for name in names:
        name = name if isinstance(name, str) else name.name
        if name not in specs:
            raise ValueError(f"config names {what} {name!r}, but the model's {what}s are "
                             f"{', '.join(specs)}")
        chosen.append(specs[name])
    return chosen
