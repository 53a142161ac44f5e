"""The engine: the one API every frontend calls.

The engine owns the model repository's loaded versions and one :class:`Batcher` per
version. It knows tensors only (``dict[str, numpy.ndarray]``), never a wire format, so
requests from every protocol for the same model batch together.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, NoReturn

import numpy as np

from mip.errors import InvalidInput, ModelLoadError, ModelNotFound, ModelNotReady
from mip.protocol import datatype_of
from mip.protocol.dtypes import numpy_dtype
from mip.serving.batching import Batcher, BatchRecord, Request, Signature
from mip.serving.repository import IndexEntry, ModelMetadata, ModelRepository, ModelVersion

__all__ = ["Engine", "ModelStats", "ModelVersion"]  # ModelVersion: what resolve() gives

log = logging.getLogger("mip.serving")


def _datatype(dtype: np.dtype) -> str:
    """A numpy dtype by its protocol name (FP64, BYTES), for messages clients read."""
    try:
        return datatype_of(dtype)
    except TypeError:
        return f"numpy {dtype}"


def _wrong_shape(version: ModelVersion, name: str, shape: tuple[int, ...]) -> NoReturn:
    spec = next(s for s in version.inputs if s.name == name)
    raise InvalidInput(f"input {name!r} has shape {list(shape)}, "
                       f"the model wants {list(spec.shape)}")


Tensors = dict[str, np.ndarray]
BatchHook = Callable[[str, str, BatchRecord], None]


@dataclass
class ModelStats:
    """Counters of one model version since it was loaded.

    Attributes:
        requests / successes / failures: inference requests received, answered, failed.
        batches: batches executed; ``rows``: rows in them.
        batch_sizes: rows per batch -> number of batches of that size.
        queue_seconds / compute_seconds: summed over batches (oldest request's wait, and
            model time), in seconds.
        queue_depth: requests waiting right now.

    ``successes``, ``failures`` and ``queue_depth`` are read from the batcher by
    :meth:`Engine.stats` (nothing is counted per request outside the batcher's own pass).
    """

    requests: int = 0
    successes: int = 0
    failures: int = 0
    batches: int = 0
    rows: int = 0
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)
    queue_seconds: float = 0.0
    compute_seconds: float = 0.0
    queue_depth: int = 0


class _Served:
    """A loaded version with its batcher and counters."""

    __slots__ = ("version", "batcher", "stats", "refused", "dtypes", "names", "checks", "layout",
                 "queue_policy", "fixed")

    def __init__(self, version: ModelVersion, batcher: Batcher, stats: ModelStats):
        self.version = version
        self.batcher = batcher
        self.stats = stats
        self.refused = 0  # requests that failed before the batcher queued them
        self.dtypes = {spec.name: numpy_dtype(spec.datatype) for spec in version.inputs}
        self.names = frozenset(self.dtypes)
        # Per input, what a request's tensor is checked against: name, numpy dtype, rank,
        # and the fixed dimensions as (axis, size) pairs (-1 dimensions take any size).
        self.checks = tuple(
            (spec.name, self.dtypes[spec.name], len(spec.shape),
             tuple((axis, d) for axis, d in enumerate(spec.shape) if d != -1))
            for spec in version.inputs)
        # A batching model of one input whose dimensions past the first are fixed: a
        # request's tensor of that datatype (the same dtype object) and those dimensions
        # passes every check at once; any other goes through them all (which name the
        # mismatch).
        self.layout: tuple[str, np.dtype, tuple[int, ...]] | None = None
        # ... and then its batch signature and octets a row, which the batcher need not
        # work out again (not for objects: a str tensor passes as one, with another dtype).
        self.fixed: tuple[Signature, int] | None = None
        if version.max_batch_size and len(version.inputs) == 1:
            spec = version.inputs[0]
            if spec.shape and spec.shape[0] == -1 and -1 not in spec.shape[1:]:
                self.layout = layout = (spec.name, self.dtypes[spec.name], tuple(spec.shape[1:]))
                if not layout[1].hasobject:
                    self.fixed = ((layout,), layout[1].itemsize * math.prod(layout[2]))
        # Triton's queue policy, when the model has one (a deadline for every request).
        batching = version.dynamic_batching
        self.queue_policy = (batching if batching is not None and batching.default_timeout_us
                             else None)


def _check_inputs(served: _Served, inputs: Tensors) -> int:
    """A request's row count, once ``inputs`` are checked against the version ``served``
    (:meth:`Engine.validate`); ``InvalidInput`` names the first mismatch."""
    layout = served.layout
    if layout is not None and type(inputs) is dict and len(inputs) == 1:
        array = inputs[layout[0]] if layout[0] in inputs else None
        if type(array) is np.ndarray and array.dtype is layout[1]:
            shape = array.shape
            if shape and shape[1:] == layout[2]:
                return shape[0]
    version = served.version
    if not isinstance(inputs, dict):
        raise InvalidInput("inputs must be a dict of name -> numpy array")
    if inputs.keys() != served.names:
        expected = served.names
        missing = sorted(expected - inputs.keys())
        extra = sorted(inputs.keys() - expected)
        raise InvalidInput(f"model {version.name!r} takes inputs {sorted(expected)}"
                           + (f"; missing {missing}" if missing else "")
                           + (f"; unknown {extra}" if extra else ""))
    rows = None
    batched = version.max_batch_size
    for name, dtype, rank, fixed in served.checks:
        array = inputs[name]
        if type(array) is not np.ndarray and not isinstance(array, np.ndarray):
            raise InvalidInput(f"input {name!r} must be a numpy array, "
                               f"not {type(array).__name__}")
        given = array.dtype
        if given is not dtype and given != dtype and not (
                dtype == object and given.kind in "SU"):
            spec = next(s for s in version.inputs if s.name == name)
            raise InvalidInput(f"input {name!r} has datatype {_datatype(array.dtype)}, "
                               f"the model wants {spec.datatype}")
        shape = array.shape
        if len(shape) != rank:
            _wrong_shape(version, name, shape)
        for axis, d in fixed:
            if shape[axis] != d:
                _wrong_shape(version, name, shape)
        if batched:
            if rows is None:
                rows = shape[0]
            elif shape[0] != rows:
                raise InvalidInput(f"inputs disagree on the batch size: {name!r} has "
                                   f"{shape[0]} rows, another has {rows}")
    return rows if rows is not None else 1


class Engine:
    """Serves the models of a repository.

    Args:
        repository: where the models are.
        models: names to load at :meth:`start` (``None`` = every model in the repository).
        default_model: the model that requests naming no model reach (``None``: the
            repository's only model, if it has exactly one).
        drain_timeout: seconds :meth:`stop` and :meth:`unload` wait for in-flight requests.
        strict_readiness: :meth:`ready` only when every model meant to be served (the
            startup models, then those loaded and not unloaded through the API) has a ready
            version, as Triton's ``--strict-readiness``; without it, when every model that
            did load has one.
        max_queued_per_peer: requests one client address may have waiting in a model's
            queue (``None``: a quarter of the model's ``max_queue_size``).
    """

    def __init__(self, repository: ModelRepository, *, models: Iterable[str] | None = None,
                 default_model: str | None = None, drain_timeout: float = 30.0,
                 strict_readiness: bool = True, max_queued_per_peer: int | None = None):
        self.repository = repository
        self.strict_readiness = strict_readiness
        self._expected: set[str] = set()  # models meant to be served
        self.max_queued_per_peer = max_queued_per_peer
        self._startup_models = None if models is None else list(models)
        self._default_model = default_model
        self._default: str | None = None
        self._default_settled = False  # _default is looked up until the models load
        self._drain_timeout = drain_timeout
        self._served: dict[tuple[str, str], _Served] = {}
        self._hooks: list[BatchHook] = []
        self._lock = asyncio.Lock()
        self._started = False

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Load the startup models (and warm them up). A model that fails is logged and
        reported by :meth:`index`; the others still load."""
        self._started = True
        available = self.repository.names()
        if self._default_model is not None and self._default_model not in available:
            raise ModelNotFound(f"the default model {self._default_model!r} is not in the "
                                f"repository (it has: {', '.join(available) or 'no model'})")
        self._default = self._settle_default(available)
        self._default_settled = True
        names = self._startup_models if self._startup_models is not None else available
        self._expected = set(names)
        for name in names:
            try:
                await self.load(name)
            except (ModelLoadError, ModelNotFound) as exc:
                log.error("%s", exc)

    async def stop(self) -> None:
        """Finish queued and running requests (up to ``drain_timeout``), then unload all."""
        async with self._lock:
            served, self._served = list(self._served.values()), {}
            await asyncio.gather(*(s.batcher.stop(self._drain_timeout) for s in served))
            for name in {s.version.name for s in served}:
                for version in self.repository.unload(name):
                    version.close()
        self._started = False

    async def load(self, model: str, config=None) -> None:
        """Load or reload every version of ``model``; a reload swaps versions without
        failing a request: the old versions serve (and stay ready) while the new ones
        load, then new requests reach the new versions and the old ones finish the
        requests they hold before they are closed. ``config`` (a
        :class:`~mip.serving.config.ModelConfig`) replaces the folder's configuration for
        this load (Triton's load with a config).

        Raises:
            ModelNotFound: no such model in the repository.
            ModelLoadError: no version loaded (the old versions, if any, keep serving); the
                message has every version's reason.
        """
        async with self._lock:
            self._expected.add(model)
            new = await asyncio.to_thread(self.repository.prepare, model, config)
            # From here to the new batchers nothing awaits: the repository and the batchers
            # switch in one step of the event loop, so no request finds one switched and
            # the other not. The old versions' batchers are taken out before the new ones
            # take their keys (a reload keeps the version names): drained, not lost.
            old = self.repository.install(model, new)
            retiring = self._withdraw(model, old)
            for version in new:
                if version.ready:
                    self._serve(version)
                    log.info("serving %s version %s (%s, max_batch_size %d, %s)", model,
                             version.version, version.platform, version.max_batch_size,
                             "dynamic batching" if version.dynamic_batching is not None
                             else "each request alone")
                else:
                    log.error("model %s version %s failed to load: %s", model, version.version,
                              version.reason)
            await self._retire(retiring, old, keep=new)
            if self._started:
                self._default = self._settle_default(self.repository.names())

    async def unload(self, model: str) -> None:
        """Stop serving ``model``: queued and running requests finish first.

        Raises:
            ModelNotFound: the model is not loaded.
        """
        async with self._lock:
            versions = self.repository.unload(model)
            self._expected.discard(model)
            await self._retire(self._withdraw(model, versions), versions, keep=[])

    def _serve(self, version: ModelVersion) -> None:
        stats = ModelStats()
        key = (version.name, version.version)

        def on_batch(record: BatchRecord) -> None:
            stats.batches += 1
            stats.rows += record.rows
            stats.batch_sizes[record.rows] += 1
            stats.queue_seconds += record.queue_seconds
            stats.compute_seconds += record.compute_seconds
            for hook in self._hooks:
                hook(key[0], key[1], record)

        batcher = Batcher(version.run, max_batch_size=version.max_batch_size,
                          dynamic_batching=version.dynamic_batching,
                          instance_count=version.config.instance_count, on_batch=on_batch,
                          name=f"{version.name}/{version.version}",
                          max_queued_per_source=self.max_queued_per_peer)
        batcher.start()
        self._served[key] = _Served(version, batcher, stats)

    def _withdraw(self, model: str, versions: list[ModelVersion]) -> list[_Served]:
        """Stop routing requests to ``versions``; return their served entries."""
        withdrawn = []
        for version in versions:
            served = self._served.get((model, version.version))
            if served is not None and served.version is version:
                del self._served[(model, version.version)]
                withdrawn.append(served)
        return withdrawn

    async def _retire(self, retiring: list[_Served], versions: list[ModelVersion],
                      keep: list[ModelVersion]) -> None:
        """Finish the work queued for ``retiring``, then close ``versions`` not in ``keep``."""
        await asyncio.gather(*(s.batcher.stop(self._drain_timeout) for s in retiring))
        for version in versions:
            if version not in keep:
                await asyncio.to_thread(version.close)

    # -- inference ---------------------------------------------------------------------

    async def infer(self, model: str, inputs: Tensors, *, version: str | None = None,
                    outputs: list[str] | None = None,
                    deadline: float | None = None) -> Tensors:
        """Run one request through the model's batch queue: the engine's API for code that
        calls it directly (frontends use :meth:`submit`, its future form).

        Args:
            model: the model name.
            inputs: input name -> tensor. For a batching model every tensor's first
                dimension is the request's row count; rows of concurrent requests are
                joined into one batch and the outputs split back (as views).
            version: a version name; ``None`` or ``""`` = the highest ready version.
            outputs: names of the outputs wanted; ``None`` = all.
            deadline: a ``time.monotonic()`` instant after which the request fails with
                ``DeadlineExceeded``.

        Returns:
            output name -> tensor (``BYTES`` outputs are numpy object arrays).

        Raises:
            ModelNotFound, ModelNotReady, InvalidInput, QueueFull, DeadlineExceeded,
            InternalError (all ``mip.errors.ServingError``).
        """
        chosen = self.resolve(model, version)
        wanted = self._check_outputs(chosen, outputs)
        result = await self.submit(model, inputs, deadline=deadline, chosen=chosen)
        if wanted is None:
            return result
        return {name: result[name] for name in wanted}

    def submit(self, model: str, inputs: Tensors, version: str | None = None,
               deadline: float | None = None, source=None,
               chosen: ModelVersion | None = None,
               split: bool = False, request_id: str | None = None,
               request_type: type[Request] = Request) -> Request:
        """Queue one request without waiting: the returned future gets every output.

        What :meth:`infer` runs (the same checks and errors: raised here when found at
        once, set on the future otherwise), for frontends that chain callbacks rather than
        run a coroutine per request. Cancelling the future drops the request from the queue.
        ``source`` (the client's address) picks the request's fair share of the queue (see
        :mod:`mip.serving.batching`). ``chosen``: the version :meth:`resolve` gave for
        this request (``model`` and ``version`` are then not looked up again). With
        ``split``, a request of more rows than the model's ``max_batch_size`` runs as
        several batches and is answered as one (:meth:`Batcher.enqueue_split`);
        without, it is refused (``InvalidInput``). ``request_id`` (the client's id of the
        request) is named in the warning logged when the model fails on it.
        ``request_type``: the :class:`~mip.serving.batching.Request` subclass the future
        is made of (a frontend's reply, answered by the batcher itself).
        """
        served = self._lookup(model, version) if chosen is None else self._serving(chosen)
        policy = served.queue_policy
        if policy is not None:
            deadline = policy.deadline(deadline, time.monotonic())  # Triton's queue policy
        served.stats.requests += 1
        try:
            rows = _check_inputs(served, inputs)  # (a function: no method lookup)
            batcher = served.batcher
            if split and rows > batcher.max_batch_size > 0:
                return batcher.enqueue_split(inputs, rows, deadline, source, request_id,
                                             request_type)
            return batcher.enqueue(inputs, rows, deadline, source, request_id, request_type,
                                   served.fixed)
        except BaseException:
            served.refused += 1
            raise

    def validate(self, chosen: ModelVersion, inputs: Tensors) -> int:
        """Check ``inputs`` as :meth:`submit` does, without queueing them: names, datatypes,
        ranks and fixed dimensions against the inputs of ``chosen`` (what :meth:`resolve`
        gave), and one batch size. For work accepted now and run later (``/v1`` jobs).

        Returns:
            the request's row count (1 for a model that does not batch).

        Raises:
            ModelNotReady: ``chosen`` is not serving.
            InvalidInput: the first mismatch, named.
        """
        return _check_inputs(self._serving(chosen), inputs)

    def resolve(self, model: str, version: str | None = None) -> ModelVersion:
        """The version of ``model`` a request reaches: ``version``, or the latest one
        served. Frontends look a request's model up here, once, and pass the result on.

        Raises:
            ModelNotFound: no such model or version.
            ModelNotReady: it is not loaded.
        """
        return self.repository.get(model, version or None)

    def _lookup(self, model: str, version: str | None) -> _Served:
        return self._serving(self.repository.get(model, version or None))

    def _serving(self, chosen: ModelVersion) -> _Served:
        served = self._served.get((chosen.name, chosen.version))
        if served is None or served.version is not chosen:
            raise ModelNotReady(f"model {chosen.name!r} version {chosen.version} is not serving")
        return served

    #: (a staticmethod for :mod:`mip.serving.remote`; the engine calls the function)
    _check_inputs = staticmethod(_check_inputs)

    def check_outputs(self, version: ModelVersion, outputs: list[str] | None) -> list[str] | None:
        """``outputs`` checked against what ``version`` (a repository entry) has: the
        names in order, or ``None`` for all of them.

        Raises:
            InvalidInput: an unknown output name.
        """
        return self._check_outputs(version, outputs)

    @staticmethod
    def _check_outputs(version: ModelVersion, outputs: list[str] | None) -> list[str] | None:
        if not outputs:
            return None
        known = {spec.name for spec in version.outputs}
        unknown = [name for name in outputs if name not in known]
        if unknown:
            raise InvalidInput(f"model {version.name!r} has no output {', '.join(unknown)}; "
                               f"its outputs are {', '.join(sorted(known))}")
        return list(outputs)

    # -- introspection -----------------------------------------------------------------

    def model_metadata(self, model: str, version: str | None = None) -> ModelMetadata:
        """Name, versions, platform, inputs and outputs (shapes with -1 for dynamic dims).

        Raises:
            ModelNotFound, ModelNotReady.
        """
        return self.repository.metadata(model, version or None)

    def model_ready(self, model: str, version: str | None = None) -> bool:
        """Whether ``model`` (or that version) serves requests now."""
        try:
            self._lookup(model, version)
        except (ModelNotFound, ModelNotReady):
            return False
        return True

    def ready(self) -> bool:
        """Whether the engine has started and every model meant to be served (with
        ``strict_readiness``; else every model that loaded) has a ready version."""
        if not self._started:
            return False
        names = self._expected if self.strict_readiness else {name for name, _ in self._served}
        return all(self.model_ready(name) for name in names)

    def default_model(self) -> str | None:
        """The model reached by requests that name none: the configured default, or the
        repository's only model (settled when models load, not looked up per request)."""
        if not self._default_settled:
            return self._settle_default(self.repository.names())
        return self._default

    def _settle_default(self, names: list[str]) -> str | None:
        if self._default_model is not None:
            return self._default_model
        return names[0] if len(names) == 1 else None

    def index(self) -> list[IndexEntry]:
        """Every model and version in the repository with its state and reason."""
        return self.repository.index()

    def stats(self) -> dict[tuple[str, str], ModelStats]:
        """Counters per served ``(model, version)``, current."""
        result = {}
        for key, served in self._served.items():
            stats, batcher = served.stats, served.batcher
            stats.queue_depth = batcher.queue_depth
            stats.successes = batcher.successes
            stats.failures = served.refused + batcher.failures
            result[key] = stats
        return result

    def add_batch_hook(self, hook: BatchHook) -> None:
        """Call ``hook(model, version, record)`` on the event loop after every batch."""
        self._hooks.append(hook)


def monotonic_deadline(timeout: float | None) -> float | None:
    """The ``deadline`` for :meth:`Engine.infer` that is ``timeout`` seconds from now."""
    return None if timeout is None else time.monotonic() + timeout

