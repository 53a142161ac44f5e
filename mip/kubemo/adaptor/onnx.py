"""The ONNX Runtime adaptor (``kubemo.adaptor.onnx``)."""

from __future__ import annotations

import os
from abc import abstractmethod
from typing import Optional, Tuple, Union

from numpy import concatenate, ndarray
from onnxruntime import InferenceSession

from mip.kubemo.inference import Inference as BaseInference
from mip.kubemo.serialize import Input, Output
from mip.errors import DeviceUnavailable
from mip.serving.providers.onnx import _providers

__all__ = ["Inference", "DeviceUnavailable"]


class Inference(BaseInference[ndarray]):
    """A model whose ``forward`` is an ONNX Runtime session.

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
        self.session = InferenceSession(str(path), providers=_providers(device))
        if device_id is not None and "CUDAExecutionProvider" not in self.session.get_providers():
            raise DeviceUnavailable(f"ONNX Runtime could not start CUDA device {device_id}")
        if self.input_names is None:
            self.input_names = tuple(i.name for i in self.session.get_inputs())

    def __del__(self) -> None:
        self.session = None

    def forward(self, inputs: Tuple[ndarray, ...]) -> Tuple[ndarray, ...]:
        names = list(self.output_names) if self.output_names else None
        return tuple(self.session.run(names, dict(zip(self.input_names or (), inputs))))

    def concat(self, batch: Tuple[Tuple[ndarray, ...], ...]) -> Tuple[ndarray, ...]:
        # One copy per tensor; a batch of one item is passed as it is.
        if len(batch) == 1:
            return tuple(batch[0])
        return tuple(concatenate(x) for x in zip(*batch))

    @abstractmethod
    def preprocess(self, inputs: Tuple[Input, ...]) -> Tuple[ndarray, ...]: ...

    @abstractmethod
    def postprocess(self, outputs: Tuple[ndarray, ...]) -> Tuple[Output, ...]: ...
