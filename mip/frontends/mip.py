"""The MIP frontend: MIP request messages in, engine calls, MIP reply buffers out.

Each item of a MIP batch carries its own leading batch dimension; the items'
tensors for one input are concatenated on axis 0 (as KubeMo's ``concat``
does; a single item is passed as the view it is, no copy) and the outputs are
split back per item as views.  Non-tensor values (TEXT, JSON, IMAGE) travel
to Python models as one-row object arrays holding the value objects.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Sequence

import numpy as np

import mip
from mip.errors import InvalidInput, ModelNotFound

__all__ = ["MipHandler"]

log = logging.getLogger("mip.frontends.mip")


def _as_rows(value) -> np.ndarray:
    """A value as rows for the engine: tensors as they are, other values as one object row."""
    if isinstance(value, np.ndarray):
        return value
    rows = np.empty(1, dtype=object)
    rows[0] = value
    return rows


def _gather(batch: Sequence[tuple], index: int) -> tuple[np.ndarray, list[int]]:
    parts = [_as_rows(item[index]) for item in batch]
    for i, part in enumerate(parts):
        if part.ndim == 0:
            raise InvalidInput(f"item {i} value {index} is a 0-d tensor: MIP items carry a "
                               "leading batch dimension")
    rows = [part.shape[0] for part in parts]
    if len(parts) == 1:
        return parts[0], rows
    try:
        return np.concatenate(parts, axis=0), rows
    except ValueError as exc:
        raise InvalidInput(f"items disagree on the shape or datatype of value {index}: {exc}") from None


def _output_value(column: np.ndarray):
    """One item's slice of an output, as a MIP value."""
    if column.dtype == object and column.shape == (1,):
        element = column[0]
        if isinstance(element, (mip.Text, mip.Json, mip.Image, mip.Value)):
            return element
        if isinstance(element, str):
            return mip.Text(element)
    return column


class MipHandler:
    """Serve MIP requests from an :class:`~mip.serving.engine.Engine`.

    Args:
        engine: the engine every frontend shares.
        request_timeout: seconds a request may take, queueing included (None = no limit).
    """

    def __init__(self, engine, *, request_timeout: float | None = None):
        self.engine = engine
        self.request_timeout = request_timeout

    async def __call__(self, message: mip.Message) -> list:
        model = message.model
        if model is None:
            model = self.engine.default_model()
            if model is None:
                raise ModelNotFound("this server has several models and no default one: send a "
                                    "routed (kind 3) request naming the model, or start the "
                                    "server with --mip-model")
        version = message.version
        meta = self.engine.model_metadata(model, version)
        batch = message.batch
        n_inputs = len(meta.inputs)
        if message.n_input != n_inputs:
            raise InvalidInput(f"model {model!r} takes {n_inputs} inputs, the request has "
                               f"{message.n_input} per item")
        if not batch:
            return mip.encode_response_buffers([], n_input=message.n_input, kind=message.kind,
                                               n_output=len(meta.outputs))
        deadline = None
        if self.request_timeout is not None:
            deadline = time.monotonic() + self.request_timeout
        batching = self.engine.repository.get(model, version or None).max_batch_size > 0
        if not batching and len(batch) > 1:
            # A model that does not batch runs each item on its own.
            results = await asyncio.gather(*(
                self._run(model, version, meta, [item], deadline) for item in batch))
            items = [row for result in results for row in result]
        else:
            items = await self._run(model, version, meta, batch, deadline)
        return mip.encode_response_buffers(items, n_input=message.n_input, kind=message.kind)

    async def _run(self, model, version, meta, batch, deadline) -> list[tuple]:
        inputs = {}
        rows = None
        for index, spec in enumerate(meta.inputs):
            inputs[spec.name], rows = _gather(batch, index)
        outputs = await self.engine.infer(model, inputs, version=version, deadline=deadline)
        names = [spec.name for spec in meta.outputs if spec.name in outputs]
        items = []
        start = 0
        for count in rows:
            items.append(tuple(_output_value(outputs[name][start:start + count]) for name in names))
            start += count
        return items
