"""The numpy adaptor (``kubemo.adaptor.arith``): you write ``forward`` with numpy."""

from __future__ import annotations

from abc import abstractmethod
from typing import Tuple

from numpy import concatenate, ndarray

from mip.kubemo.inference import Inference as BaseInference
from mip.kubemo.serialize import Input, Output

__all__ = ["Inference"]


class Inference(BaseInference[ndarray]):
    """A model computed with numpy; ``concat`` joins items on axis 0."""

    def concat(self, batch: Tuple[Tuple[ndarray, ...], ...]) -> Tuple[ndarray, ...]:
        # One copy per tensor; a batch of one item is passed as it is.
        if len(batch) == 1:
            return tuple(batch[0])
        return tuple(concatenate(x) for x in zip(*batch))

    @abstractmethod
    def preprocess(self, inputs: Tuple[Input, ...]) -> Tuple[ndarray, ...]: ...

    @abstractmethod
    def forward(self, inputs: Tuple[ndarray, ...]) -> Tuple[ndarray, ...]: ...

    @abstractmethod
    def postprocess(self, outputs: Tuple[ndarray, ...]) -> Tuple[Output, ...]: ...
