"""Small numeric helpers that KubeMo model files use."""

from __future__ import annotations

import numpy

__all__ = ["softmax"]


def softmax(x: numpy.ndarray) -> numpy.ndarray:
    """Softmax over all elements of ``x`` (KubeMo applies it to one item's logits)."""
    shifted = numpy.exp(x - numpy.max(x))  # shift by the max so exp cannot overflow
    return shifted / shifted.sum()
