"""Execution providers: what runs a batch of tensors through a loaded model.

Every provider returns a :class:`Runner`. The engine only calls ``run`` (from a worker
thread, with inputs already concatenated into one batch) and ``close``.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from mip.serving.config import TensorSpec

__all__ = ["Runner"]


class Runner(Protocol):
    """A loaded model version.

    Attributes:
        inputs: the tensors ``run`` takes, shapes with -1 for dynamic dims.
        outputs: the tensors ``run`` returns.
        platform: the repository platform name of the provider.
    """

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    platform: str

    def run(self, inputs: dict[str, np.ndarray],
            outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run one batch; ``outputs=None`` returns every output."""

    def close(self) -> None:
        """Release the model's memory; the runner is not used afterwards."""
