"""The one data plane under every frontend: MIP, KServe v2 gRPC and REST, and the ``/v1``
job worker.

Each frontend decodes its wire form into tensors, calls :meth:`DataPlane.submit` (a
future: awaited, or chained to the frontend's reply), and encodes what it returns; the model is looked up once, and
deadlines, the version that answered, metrics (labelled ``protocol="mip"``, ``"grpc"``,
``"http"`` or ``"jobs"``) and the access log's line are decided here, so every protocol
behaves, and is counted and logged, the same. No frontend reaches past it into the
repository.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

import mip
from mip.errors import ConfigError, InvalidInput, ModelLoadError, ModelNotFound
from mip.frontends._futures import CANCELLED, Link
from mip.frontends.oip import codec
from mip.serving.batching import Request
from mip.serving.engine import Engine

if TYPE_CHECKING:
    from mip.serving.engine import ModelVersion

__all__ = [
    "EXTENSIONS",
    "SERVER_NAME",
    "DataPlane",
    "InferResult",
    "timeout_parameter",
]

SERVER_NAME = "mip"
#: protocol extensions this server speaks (names as Triton reports them).
EXTENSIONS = ("binary_tensor_data", "classification", "model_configuration",
              "model_repository", "parameters", "statistics", "streaming", "system_shared_memory")


@dataclass(slots=True)
class InferResult:
    """What one inference returned: the version that ran it and its outputs, in order."""

    model: str
    version: str
    outputs: dict[str, np.ndarray]


def timeout_parameter(value) -> float | None:
    """The ``timeout`` request parameter (Triton's: microseconds) in seconds."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise InvalidInput(f"parameter 'timeout' must be a non-negative number of "
                           f"microseconds, not {value!r}")
    return value / 1e6 if value else None


def _classify(outputs: dict, classes: dict[str, int], version) -> None:
    for name, count in classes.items():
        if name in outputs:
            outputs[name] = codec.classify(outputs[name], count, version.max_batch_size > 0,
                                           version.labels.get(name, ()), name)


def _rows(chosen, inputs: dict) -> int:
    """A request's inferences: its batch dimension (1 for a model that does not batch)."""
    if chosen.max_batch_size and inputs:
        first = next(iter(inputs.values()))
        return first.shape[0] if first.ndim else 1
    return 1


_CALL_FIELDS = ("plane", "protocol", "model", "chosen", "wanted", "classes", "then",
                "map_error", "started", "peer", "notify")


def _outputs_of(encode: Callable) -> Callable[[InferResult], Any]:
    """``then`` of a ``then_outputs`` encoder."""
    return lambda result: encode(result.outputs)


class _Reply:
    """One request from the engine's outputs to the frontend's reply: the outputs asked
    for, classified, the frontend's encoder (``then``) and error mapping applied, and the
    outcome counted and logged, at once."""

    __slots__ = ()
    plane: DataPlane
    protocol: str
    model: str
    chosen: ModelVersion
    wanted: list[str] | None
    classes: dict[str, int] | None
    then: Callable | None
    map_error: Callable[[BaseException], BaseException] | None
    rows: int
    started: float
    peer: Any
    request_id: str | None
    notify: Callable[[asyncio.Future], None] | None

    def transform(self, result):
        wanted = self.wanted
        done = InferResult(self.model, self.chosen.version,
                           result if wanted is None else {name: result[name] for name in wanted})
        if self.classes:
            _classify(done.outputs, self.classes, self.chosen)
        then = self.then
        return done if then is None else then(done)

    def error(self, failure: BaseException) -> BaseException:
        return failure if self.map_error is None else self.map_error(failure)

    def settled(self, failure: BaseException | None) -> None:
        plane = self.plane
        metrics, access = plane.metrics, plane.access_log
        if metrics is None and access is None:
            return
        seconds = time.perf_counter() - self.started
        version = self.chosen.version
        if metrics is not None:
            metrics.observe_request(self.model, version, self.protocol, failure is None,
                                    seconds, self.rows)
        if access is not None:
            access.request(self.protocol, self.peer, self.model, version, failure, seconds,
                           self.request_id)


class _Queued(_Reply, Request):
    """The reply of a request queued in this process's engine: the batcher answers the
    reply itself (one future a request, no callback between them)."""

    __slots__ = _CALL_FIELDS  # (and the request's own rows and request_id)

    def answer(self, outputs: dict[str, np.ndarray]) -> None:
        try:
            reply = self.transform(outputs)
        except Exception as exc:  # an encoding failure is the request's
            self.refuse(exc)
            return
        self.set_result(reply)
        self._settled(None)

    def refuse(self, error: BaseException) -> None:
        self.set_exception(self.error(error))
        self._settled(error)

    def cancel(self, msg=None) -> bool:
        if not Request.cancel(self, msg):
            return False
        self._settled(CANCELLED)
        return True

    def _settled(self, failure: BaseException | None) -> None:
        """The future is done: the outcome counted and logged, then ``notify`` told."""
        self.settled(failure)
        notify = self.notify
        if notify is not None:
            notify(self)


class _QueuedOutputs(_Queued):
    """A queued request whose frontend encodes the outputs alone (``then_outputs``): no
    :class:`InferResult` is made, no output is picked or classified, no error mapped."""

    __slots__ = ()

    def transform(self, result):
        return self.then(result)

    def error(self, failure: BaseException) -> BaseException:
        return failure


class _Call(_Reply, Link):
    """The reply of a request queued by an engine elsewhere (a worker process's): chained
    to the engine's future."""

    __slots__ = (*_CALL_FIELDS, "rows", "request_id")


class DataPlane:
    """Inference, metadata and repository calls on one engine, for every frontend.

    Args:
        engine: the :class:`~mip.serving.engine.Engine` every frontend shares.
        metrics: a :class:`~mip.frontends.oip.metrics.Metrics`, or ``None``.
        request_timeout: seconds a request may take, queueing included (``None``: no
            limit beyond what the client asks for).
        access_log: an :class:`~mip.frontends.access.AccessLog` to record every request
            in, or ``None`` (off: nothing about it is done per request).
    """

    def __init__(self, engine, metrics=None, request_timeout: float | None = None,
                 access_log=None):
        self.engine = engine
        self.metrics = metrics
        self.request_timeout = request_timeout
        self.access_log = access_log
        # An engine of this process answers the replies itself.
        self._local = isinstance(engine, Engine)
        #: ``resolve(model, version=None)``: the version of ``model`` a request reaches
        #: (:meth:`Engine.resolve <mip.serving.engine.Engine.resolve>`, which is the
        #: repository's ``get``).
        self.resolve = engine.repository.get if self._local else engine.resolve

    def server_metadata(self) -> dict:
        """``name``, ``version`` and ``extensions`` of this server."""
        return {"name": SERVER_NAME, "version": mip.__version__, "extensions": list(EXTENSIONS)}

    def submit(self, protocol: str, model: str, version: str | None,
               inputs: dict[str, np.ndarray], outputs: list[str] | None = None,
               timeout: float | None = None, then: Callable | None = None,
               error: Callable[[BaseException], BaseException] | None = None,
               classes: dict[str, int] | None = None, source=None,
               chosen=None, split: bool = False, peer=None, request_id: str | None = None,
               started: float | None = None, then_outputs: Callable | None = None,
               notify: Callable[[asyncio.Future], None] | None = None) -> asyncio.Future:
        """Queue one request without waiting: a future of its :class:`InferResult`.

        Await the future, or chain callbacks on it (no coroutine a request). Errors found
        at once are raised; later ones are set on the future. Cancelling the future drops
        the request from the batch queue.

        ``protocol`` (``"mip"``, ``"grpc"``, ``"http"`` or ``"jobs"``) labels the request's
        metrics and access-log line. ``model`` / ``version``: what to run (``version``
        ``None`` or ``""``: the highest ready one). ``inputs``: input name -> tensor.
        ``outputs``: the output names wanted, in the order to answer them (``None``: all).
        ``timeout``: seconds the client allows, queueing included (``None``: no limit
        beyond ``request_timeout``).

        ``then`` (the frontend's reply encoder) and ``error`` (its error mapping) apply in
        the same callback, so the future holds ``then(result)``: one hand-off a request.

        ``classes`` (output name -> class count, from :func:`codec.check_parameters`)
        answers those outputs with Triton's classification extension. ``source`` (the
        client's address) picks the request's fair share of the queue. ``chosen``: the
        version :meth:`resolve` gave, when the frontend needed it first (no second lookup).
        ``split``: a request of more rows than the model's ``max_batch_size`` runs as
        several batches and is answered (and counted) as one request, as MIP serves
        KubeMo's clients; without it such a request is refused, as Triton does.

        ``peer`` (the client's address as the frontend knows it) and ``request_id`` (the
        client's id for the request) are for the access log and the model's failure
        warning; ``started`` is the request's arrival (``time.perf_counter()``; default:
        now), from which its latency is counted. Errors raised here (rather than set on
        the future) are the frontend's to report with :meth:`refused`.

        ``then_outputs``, instead of ``then``: the frontend's encoder of the outputs alone
        (the dict of every output), for a frontend that asks for no ``outputs``,
        ``classes`` or ``error`` and needs neither the model's name nor the version (no
        :class:`InferResult` a request). ``notify(future)`` is called on the event loop
        once the future is done, in the callback that settles it (for a caller that would
        otherwise add a done-callback, scheduled through the loop).
        """
        if started is None:
            started = time.perf_counter()
        engine = self.engine
        if chosen is None:
            chosen = engine.resolve(model, version or None)  # ModelNotFound: no series
        limit = self.request_timeout
        if timeout is not None and (limit is None or timeout < limit):
            limit = timeout
        call: _Queued | _Call
        try:
            wanted = engine.check_outputs(chosen, outputs) if outputs else None
            deadline = None if limit is None else time.monotonic() + limit
            if then_outputs is not None:
                then = then_outputs if self._local else _outputs_of(then_outputs)
            if self._local:
                # (Answered from a later pass of the event loop: filled in first.)
                call = reply = engine.submit(
                    model, inputs, chosen.version, deadline, source, chosen, split, request_id,
                    _Queued if then_outputs is None else _QueuedOutputs)
                call.notify = notify
            else:
                work = engine.submit(model, inputs, chosen.version, deadline, source, chosen,
                                     split, request_id)
                call = _Call(work)
                call.rows, call.request_id = _rows(chosen, inputs), request_id
                reply = call.reply
                if notify is not None:
                    reply.add_done_callback(notify)
        except BaseException:
            if self.metrics is not None:
                self.metrics.observe_request(model, chosen.version, protocol, False,
                                             time.perf_counter() - started,
                                             _rows(chosen, inputs))
            raise
        call.plane, call.protocol, call.model, call.chosen = self, protocol, model, chosen
        call.wanted, call.classes, call.then, call.map_error = wanted, classes, then, error
        call.started, call.peer = started, peer
        return reply

    def refused(self, protocol: str, model, version, failure: BaseException, *,
                peer=None, request_id: str | None = None,
                started: float | None = None) -> None:
        """A request the frontend refused before :meth:`submit` gave it a future (it did
        not parse, named no model that is served, ...): recorded in the access log, when
        there is one. Arguments as :meth:`submit`'s; ``model`` and ``version`` as the
        request named them (``None`` when it could not be read)."""
        access = self.access_log
        if access is not None:
            seconds = 0.0 if started is None else time.perf_counter() - started
            access.request(protocol, peer, model, version, failure, seconds, request_id)

    async def load(self, model: str, parameters: dict) -> None:
        """Triton's load call: ``parameters`` may hold ``config`` (Triton's JSON form of
        ``ModelConfig``, used instead of the folder's configuration for this load); any
        other parameter (the ``file:`` overrides) is refused naming it.

        Raises:
            InvalidInput, ModelNotFound, ModelLoadError.
        """
        unknown = sorted(set(parameters) - {"config"})
        if unknown:
            raise InvalidInput(f"load parameters are not supported: {', '.join(unknown)} "
                               "(only 'config' is)")
        config = None
        if "config" in parameters:
            from mip.serving.triton import config_from_json

            text = parameters["config"]
            if not isinstance(text, str):
                raise InvalidInput("load parameter 'config' must be a string of JSON")
            try:
                config = config_from_json(text, model)
            except ConfigError as exc:
                raise ModelLoadError(f"failed to load {model}: {exc}") from None
        await self.engine.load(model, config)

    def model_config(self, model: str, version: str | None = None):
        """The configuration in force for ``model`` (or that version), as Triton's
        ``ModelConfig`` message.

        Raises:
            ModelNotFound, ModelNotReady.
        """
        from mip.serving.triton import to_triton

        return to_triton(self.engine.resolve(model, version or None))

    def statistics(self, model: str | None = None, version: str | None = None) -> dict:
        """Triton's statistics (``{"model_stats": [...]}``) of every served version, or of
        ``model`` (and ``version``); the numbers are those of ``/metrics``.

        Raises:
            ModelNotFound: ``model`` / ``version`` is not served.
        """
        if self.metrics is None:
            from mip.frontends.oip.metrics import Metrics

            self.metrics = Metrics(self.engine)
        entries = self.metrics.statistics(model or None, version or None)
        if model and not entries:
            what = f"model {model!r}" + (f" version {version}" if version else "")
            raise ModelNotFound(f"requested {what} is not available")
        return {"model_stats": entries}

    def validate(self, chosen, inputs: dict[str, np.ndarray],
                 outputs: list[str] | None = None) -> list[str] | None:
        """The checks :meth:`submit` makes, without running anything: ``inputs`` against
        the inputs of ``chosen`` (the version :meth:`resolve` gave) and ``outputs`` against
        its outputs. For work accepted now and run later (the ``/v1`` jobs).

        Returns:
            the output names in order, or ``None`` for all.

        Raises:
            ModelNotReady, InvalidInput.
        """
        self.engine.validate(chosen, inputs)
        return self.engine.check_outputs(chosen, outputs) if outputs else None
