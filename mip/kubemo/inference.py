"""KubeMo's model lifecycle (``kubemo.inference``).

A model is a class with ``__init__`` (load), ``preprocess``, ``forward``, ``postprocess``
and ``concat``. A call runs one batch: each item's values are pre-processed, the results
joined by ``concat``, run by ``forward`` once, and every row of the outputs
post-processed into that item's output values.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Generic, Optional, Tuple, TypeVar

from mip.kubemo.serialize import Input, Output, as_input

__all__ = ["Inference", "Tensor"]

Tensor = TypeVar("Tensor")


class Inference(Generic[Tensor]):
    """The lifecycle of a model: load, pre-process, forward, post-process, unload.

    Subclass it and implement the abstract methods, as with KubeMo.

    Args:
        device_id: the accelerator the model uses (``None`` = CPU).
        input_names: names of the model's inputs, in the order ``preprocess`` returns them.
        output_names: names of the outputs ``forward`` returns (``None`` = all).
    """

    def __init__(self, device_id: Optional[int] = None,
                 input_names: Optional[Tuple[str, ...]] = None,
                 output_names: Optional[Tuple[str, ...]] = None) -> None:
        self.input_names = input_names
        self.output_names = output_names
        self.device_id = device_id

    def __del__(self) -> None:
        """Unload: drop what the model holds."""

    @abstractmethod
    def preprocess(self, inputs: Tuple[Input, ...]) -> Tuple[Tensor, ...]:
        """One item's input values -> the model's tensors (with a leading batch axis)."""
        raise NotImplementedError

    @abstractmethod
    def forward(self, inputs: Tuple[Tensor, ...]) -> Tuple[Tensor, ...]:
        """Run the model on the joined tensors of a batch."""
        raise NotImplementedError

    @abstractmethod
    def postprocess(self, outputs: Tuple[Tensor, ...]) -> Tuple[Output, ...]:
        """One row of every output tensor -> that item's output values."""
        raise NotImplementedError

    @abstractmethod
    def concat(self, batch: Tuple[Tuple[Tensor, ...], ...]) -> Tuple[Tensor, ...]:
        """Join the pre-processed items of a batch, tensor by tensor."""
        raise NotImplementedError

    def __call__(self, *args: Tuple[Any, ...]) -> Tuple[Tuple[Output, ...], ...]:
        """Run a batch: each argument is one item's tuple of input values.

        Values straight from a server (codec values, ``str``, ``bytes``) are given to
        ``preprocess`` as KubeMo values first.
        """
        batch_x = tuple(self.preprocess(tuple(as_input(v) for v in x)) for x in args)
        batch_y = self.forward(self.concat(batch_x))
        return tuple(self.postprocess(y) for y in zip(*batch_y))
