"""The MIP frontend: MIP request messages in, engine calls, MIP reply buffers out.

Each item of a MIP batch carries its own leading batch dimension; the items'
tensors for one input are stacked on axis 0 (as KubeMo's ``concat`` does)
with ``Message.column``: one row per item gives a strided view of the frame
with no per-item objects, a single item is passed as the view it is, other
batches are concatenated.  Outputs are split back per item as views.
Non-tensor values travel to the engine as one-row object arrays of engine values: TEXT
as ``str``, JSON as the decoded object, IMAGE as its octets (a bytes-like view of the
frame), and the application-defined types KubeMo's applications register as
``mip.Value`` (they have no plain form); an ONNX model, which takes tensors, refuses
application values. A KubeMo-lifecycle model's outputs (``row_values``) come back as
MIP values the same way: ``str`` TEXT, bytes-like IMAGE, ``mip.Value`` as it is, any
other object JSON. (A JSON value that is a lone string therefore reaches a model, and
returns, as TEXT.)

A request of more rows than the model's ``max_batch_size`` is run as several batches
and answered as one (KubeMo's server takes batches of any size); the KServe v2
frontends refuse it, as Triton does.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

import mip
from mip.errors import InvalidInput, ModelNotFound
from mip.frontends._futures import chain
from mip.frontends.dataplane import DataPlane
from mip.serving.config import PLATFORM_PYTHON

__all__ = ["MipHandler"]

log = logging.getLogger("mip.frontends.mip")


def _as_rows(value) -> np.ndarray:
    """A value as rows for the engine: tensors as they are, other values as one object row."""
    if isinstance(value, np.ndarray):
        return value
    rows = np.empty(1, dtype=object)
    rows[0] = value
    return rows


def _engine_value(value):
    """One MIP value as the engine holds it (see the module's docstring)."""
    kind = type(value)
    if kind is mip.Text:
        return value.value
    if kind is mip.Json:
        return value.value  # InvalidValue for octets that are not JSON
    if kind is mip.Image:
        return value.data
    return value  # mip.Value, and the elements of BYTES tensors


def _engine_values(column: np.ndarray) -> np.ndarray:
    """An object column of MIP values as engine values (a BYTES tensor as it is)."""
    if column.ndim != 1 or not len(column) or type(column[0]) not in _VALUE_TYPES:
        return column
    values = np.empty(len(column), dtype=object)
    values[:] = [_engine_value(v) for v in column]
    return values


_VALUE_TYPES = {mip.Text, mip.Json, mip.Image, mip.Value}
_NO_ROWS: list[int] = []  # (a model has inputs: replaced by the first one's rows)


def _mip_value(element):
    """One value of a model of ``row_values`` as a MIP value: ``str`` TEXT, bytes-like
    IMAGE, ``mip.Value`` and tensors as they are, any other object JSON."""
    if isinstance(element, str):
        return mip.Text(element)
    if isinstance(element, (mip.Value, np.ndarray)):
        return element
    if isinstance(element, (bytes, bytearray, memoryview)):
        return mip.Image(element)
    return mip.Json(element)


def _mip_values(outputs: dict) -> dict:
    """The object columns of a ``row_values`` model's outputs as columns of MIP values."""
    converted = {}
    for name, column in outputs.items():
        if column.dtype == object:
            values = np.empty(column.shape, dtype=object)
            values.reshape(-1)[:] = [_mip_value(v) for v in column.reshape(-1)]
            column = values
        converted[name] = column
    return converted


def _output_value(column: np.ndarray):
    """One item's slice of an output, as a MIP value: a one-row object column's MIP value
    (``str`` as TEXT), else the column as a tensor."""
    if column.dtype.hasobject and column.shape == (1,):
        element = column[0]
        if isinstance(element, (mip.Text, mip.Json, mip.Image, mip.Value)):
            return element
        if isinstance(element, str):
            return mip.Text(element)
    return column


class MipHandler:
    """Serve MIP requests from an :class:`~mip.serving.engine.Engine`, through the data
    plane every frontend shares (requests counted with ``protocol="mip"``).

    Args:
        engine: the engine every frontend shares.
        request_timeout: seconds a request may take, queueing included (None = no limit).
        metrics: a :class:`~mip.frontends.oip.metrics.Metrics` to count requests in.
        access_log: an :class:`~mip.frontends.access.AccessLog` for every request (MIP
            carries no request id: its lines show ``-``), or ``None``.
    """

    def __init__(self, engine, *, request_timeout: float | None = None, metrics=None,
                 access_log=None):
        self.engine = engine
        self.dataplane = DataPlane(engine, metrics, request_timeout, access_log)
        self._loop: asyncio.AbstractEventLoop | None = None
        # id(served version) + kind -> the encoder of a one-item request's reply (ids are
        # multiples of 8: the kind, 2 or 3, keeps them apart; n_input is the version's)
        self._encoders: dict[int, _Encoder] = {}

    def start(self, message: mip.Message, source=None, done=None) -> asyncio.Future:
        """Start serving `message` (read from `source`, the peer's address): a future of
        its reply buffers.

        No coroutine and no task a request: the request goes straight into the model's
        batch queue and the reply is encoded in a callback when its outputs arrive.
        Cancelling the future (the client went away) drops the request from the queue.
        Errors found at once are raised (and reported to the access log); later ones are
        set on the future. ``done(future)``, if given, is called once the future is done
        (see :class:`mip.net.mip_server.StartHandler`).
        """
        started = time.perf_counter()
        try:
            model = message.model
            if model is None:
                model = self._default_model()
            served = self.dataplane.resolve(model, message.version)
            n_input = message.n_input
            if n_input != len(served.inputs):
                raise InvalidInput(f"model {model!r} takes {len(served.inputs)} inputs, the "
                                   f"request has {n_input} per item")
            items = len(message)
            if not items or (served.max_batch_size == 0 and items > 1):
                reply = self._start_apart(message, model, served, source)
                if done is not None:
                    reply.add_done_callback(done)
                return reply
            inputs, rows = _inputs(served, message)  # (a function: no method lookup)
            kind = message.kind
            if items == 1:  # one encoder for every such request (no closure a request)
                key = id(served) + kind
                encoders = self._encoders  # ("in" and a subscript: cheaper than get())
                encoder = encoders[key] if key in encoders else None
                if encoder is None or encoder.served is not served:
                    encoder = self._encoder(key, served, n_input, kind)
                encode = encoder.encode
            else:  # (a closure made here would cost its cells on every request)
                encode = _items_encoder(served, rows, n_input, kind)

            # More rows than the model's max_batch_size: run as several batches, one reply.
            return self.dataplane.submit("mip", model, served.version, inputs,
                                         then_outputs=encode, source=source, chosen=served,
                                         split=True, peer=source, started=started,
                                         notify=done)
        except Exception as exc:
            self.dataplane.refused("mip", message.model or self.engine.default_model(),
                                   message.version, exc, peer=source, started=started)
            raise

    def _encoder(self, key: int, served, n_input: int, kind: int) -> _Encoder:
        if len(self._encoders) >= 64:  # versions come and go: keep the recent ones
            self._encoders.clear()
        encoder = self._encoders[key] = _Encoder(served, n_input, kind)
        return encoder

    def _default_model(self) -> str:
        model = self.engine.default_model()
        if model is None:
            raise ModelNotFound("this server has several models and no default one: send a "
                                "routed (kind 3) request naming the model, or start the "
                                "server with --mip-model")
        return model

    def _start_apart(self, message: mip.Message, model: str, served, source) -> asyncio.Future:
        """A request of no items, or of several for a model that does not batch (each item
        runs on its own)."""
        loop = self._event_loop()
        kind, n_input = message.kind, message.n_input
        if not len(message):
            reply = loop.create_future()
            reply.set_result(mip.encode_response_buffers(
                [], n_input=n_input, kind=kind, n_output=len(served.outputs)))
            return reply
        work = loop.create_task(self._each_item(model, served, message.batch, source))
        return chain(work, lambda items: mip.encode_response_buffers(
            items, n_input=n_input, kind=kind))

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def _each_item(self, model, served, batch, source=None) -> list[tuple]:
        """Run every item as a request of its own (for a model without a batch axis),
        ``instance_count + 1`` at a time, as the parts of a split request: a batch of any
        size neither fills the model's queue nor shuts other clients out. The first
        failure fails the request and drops the items still running."""
        def one(item) -> asyncio.Future:
            inputs, rows = _inputs(served, _single(item))
            return self.dataplane.submit("mip", model, served.version, inputs,
                                         then=lambda result: _split(served, result.outputs, rows),
                                         source=source, chosen=served)

        window = served.config.instance_count + 1
        results: list = [None] * len(batch)
        running: dict[asyncio.Future, int] = {}
        following = iter(enumerate(batch))
        try:
            while True:
                for index, item in following:
                    running[one(item)] = index
                    if len(running) >= window:
                        break
                if not running:
                    break
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    results[running.pop(future)] = future.result()  # the first error raises
        finally:
            for future in running:
                future.cancel()
        return [row for result in results for row in result]


def _inputs(served, source) -> tuple[dict, list[int]]:
    """Every input of the request's items as one array, and the rows each item gave:
    value `index` of every item as a strided view when it can be (``Message.column``)."""
    inputs = {}
    rows = _NO_ROWS
    index = 0
    for spec in served.inputs:
        rows = source.rows(index)
        if -1 in rows:  # (rows() gives -1 for a 0-d tensor, never another negative)
            i = rows.index(-1)
            raise InvalidInput(f"item {i} value {index} is a 0-d tensor: MIP items "
                               "carry a leading batch dimension")
        try:
            column = source.column(index)
        except ValueError as exc:
            raise InvalidInput(f"items disagree on the shape or datatype of value {index}: "
                               f"{exc}") from None
        if column.dtype.hasobject:
            if served.platform != PLATFORM_PYTHON:
                _refuse_application_values(served, column, index)
            column = _engine_values(column)
        inputs[spec.name] = column
        index += 1
    return inputs, rows


def _refuse_application_values(served, column: np.ndarray, index: int) -> None:
    """Application-defined values reach Python models only: say so to any other."""
    for i, value in enumerate(column.reshape(-1)):
        if isinstance(value, mip.Value):
            raise InvalidInput(f"item {i} value {index} is an application-defined value (type "
                               f"{value.type}): model {served.name!r} ({served.platform}) takes "
                               "tensors; application values reach Python models only")


def _split(served, outputs: dict, rows: list[int]) -> list[tuple]:
    """The batch's outputs back as one tuple of values per item (views, no copies)."""
    if served.row_values:
        outputs = _mip_values(outputs)
    names = [spec.name for spec in served.outputs if spec.name in outputs]
    if len(rows) == 1:
        if len(names) == 1:
            return [(_output_value(outputs[names[0]]),)]
        return [tuple([_output_value(outputs[name]) for name in names])]
    items = []
    start = 0
    for count in rows:
        items.append(tuple(_output_value(outputs[name][start:start + count]) for name in names))
        start += count
    return items


def _items_encoder(served, rows: list[int], n_input: int, kind: int):
    """The encoder of the reply of a request of several items, from its outputs."""
    def encode(outputs: dict) -> list:
        return mip.encode_response_buffers(_split(served, outputs, rows), n_input, kind)
    return encode


class _Encoder:
    """The reply of a one-item request to one model version, from its outputs."""

    __slots__ = ("served", "encode")

    def __init__(self, served, n_input: int, kind: int):
        self.served = served
        encode = mip.encode_response_buffers
        outputs = served.outputs
        if len(outputs) == 1 and not served.row_values:
            name = outputs[0].name

            def one(result: dict) -> list:
                column = result[name] if name in result else None
                if column is None:
                    return encode(_split(served, result, _ONE_ROW), n_input, kind)
                if column.dtype.hasobject:  # (a tensor is sent as it is)
                    column = _output_value(column)
                return encode([(column,)], n_input, kind)
            self.encode = one
        else:
            self.encode = lambda result: encode(_split(served, result, _ONE_ROW), n_input, kind)


_ONE_ROW = [1]  # (read only: _split looks at its length)


class _single:
    """One item with the ``rows``/``column`` interface of a ``Message``."""

    __slots__ = ("item",)

    def __init__(self, item: tuple):
        self.item = item

    def rows(self, index: int) -> list[int]:
        value = self.item[index]
        if isinstance(value, np.ndarray):
            return [value.shape[0] if value.ndim else -1]
        return [1]

    def column(self, index: int) -> np.ndarray:
        return _as_rows(self.item[index])
