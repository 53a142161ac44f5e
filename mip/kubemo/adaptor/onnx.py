"""The ONNX Runtime adaptor (``kubemo.adaptor.onnx``)."""

from __future__ import annotations

import os
from typing import Optional, Tuple, Union

from numpy import ndarray

from mip.kubemo.adaptor import arith
from mip.errors import DeviceUnavailable
from mip.serving.providers.onnx import inference_session

__all__ = ["Inference", "DeviceUnavailable"]


class Inference(arith.Inference):
    """A model whose ``forward`` is an ONNX Runtime session (``concat`` as the numpy
    adaptor's: items joined on axis 0).

    Args:
        path: the ``.onnx`` file.
        device_id: CUDA device index; ``None`` runs on the CPU. A device that ONNX
            Runtime cannot use raises ``DeviceUnavailable`` (never a silent CPU run).
        input_names: the session inputs fed by ``preprocess``'s tensors, in order
            (``None``: the model's inputs in graph order).
        output_names: outputs to compute (``None``: all, in graph order).
    """

    def __init__(self, path: Union[str, os.PathLike], device_id: Optional[int] = None,
                 input_names: Optional[Tuple[str, ...]] = None,
                 output_names: Optional[Tuple[str, ...]] = None) -> None:
        super().__init__(device_id, input_names, output_names)
        device = "cpu" if device_id is None else f"cuda:{device_id}"
        self.session = inference_session(path, device)
        if self.input_names is None:
            self.input_names = tuple(i.name for i in self.session.get_inputs())

    def __del__(self) -> None:
        self.session = None

    def forward(self, inputs: Tuple[ndarray, ...]) -> Tuple[ndarray, ...]:
        names = list(self.output_names) if self.output_names else None
        return tuple(self.session.run(names, dict(zip(self.input_names or (), inputs))))
