"""Dynamic batching, as Triton defines it.

Requests for one model version wait in a bounded FIFO queue. The batcher forms a batch
from the head of the queue:

* a batch holds at most ``max_batch_size`` **rows** (the sum of the requests' first
  dimensions), never a split request, and grows no further once its requests' input
  tensors reach ``max_batch_bytes`` (joining large tensors is a copy that buys nothing);
* when the queued rows reach a preferred batch size, the largest preferred size that is
  reachable is sent at once;
* otherwise the batch waits until ``max_queue_delay_us`` has passed since the **oldest**
  queued request arrived (a ``time.monotonic()`` deadline), or until it cannot grow, and
  then the largest batch that fits is sent;
* requests whose tensors cannot be concatenated with the head's (different trailing
  dims or dtypes) wait for the next batch, so order is kept.

Fairness: each request names its *source* (the peer address a frontend read it from;
``None`` for callers that do not say). Each source has its own FIFO sub-queue, and a
batch takes requests round-robin across the sources (the first of each, then the second
of each, ...), starting where the previous batch stopped; a source other than ``None`` may
hold at most ``max_queued_per_source`` queued requests, so one client can neither take a
model's whole queue nor make the others wait behind its backlog. With one source (the
usual case) this is the single FIFO queue above.

A request whose future is cancelled (its client went away, or its deadline passed) is
removed from the queue at once. A batch runs in one of the model's ``instance_count``
runner threads, so the event loop keeps doing I/O while the model computes: the batch is
handed over through a queue and comes back with one ``call_soon_threadsafe`` (not one
callback per request), and its requests' futures are answered in one pass.

A queued request *is* its future (a :class:`Request`); a frontend may queue its own
subclass, whose :meth:`Request.answer` turns the outputs into its reply in that same pass,
so a request costs one future and no callbacks between the batcher and the frontend.

A request of more rows than ``max_batch_size`` is refused (as Triton does), unless it is
queued with :meth:`Batcher.enqueue_split` (MIP's rule: KubeMo's clients send batches of any
size): it is then queued as parts of at most ``max_batch_size`` rows (views of its tensors),
a few at a time, each batched like any request, and answered as one.

Batches that the model has shown to take less than ``inline_below`` seconds (measured on
earlier batches, per row and per call) run on the event loop's thread instead: handing
a few microseconds of work to another thread and back costs more than the work, and
most of a small request's latency.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from queue import SimpleQueue
from typing import Callable, cast

import numpy as np

from mip.errors import (DeadlineExceeded, InternalError, InvalidInput, ModelNotReady, QueueFull,
                        ServingError)
from mip.protocol._batch import join
from mip.serving.config import DEFAULT_MAX_QUEUE_SIZE, DynamicBatching

__all__ = ["DEFAULT_INLINE_BELOW", "Batcher", "BatchRecord", "Request"]

#: batches expected to compute in less than this many seconds (250 µs) run on the event loop.
DEFAULT_INLINE_BELOW = 250e-6
_EWMA = 0.1  # weight of the newest batch in the compute-time estimates
#: seconds between two WARNING lines about one model's failures
FAILURE_LOG_INTERVAL = 10.0
_IDS_NAMED = 8  # request ids a failure warning names, at most

Tensors = dict[str, np.ndarray]
Signature = tuple[tuple[str, np.dtype, tuple[int, ...]], ...]

log = logging.getLogger("mip.serving.batching")


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """What one executed batch looked like, for metrics.

    Attributes:
        rows: rows in the batch (sum of the requests' first dimensions).
        requests: requests in the batch.
        queue_seconds: how long the oldest request of the batch waited, in seconds.
        compute_seconds: time spent in the model, in seconds.
        failed: whether the model raised.
        waited_seconds: the waits of all the batch's requests (each from its arrival in
            the queue to the batch's start), summed, in seconds.
    """

    rows: int
    requests: int
    queue_seconds: float
    compute_seconds: float
    failed: bool = False
    waited_seconds: float = 0.0


class Request(asyncio.Future):
    """One queued request, and the future of its outputs (what :meth:`Batcher.enqueue`
    returns).

    Cancelling it drops the request from the queue. A subclass (given to
    :meth:`Batcher.enqueue` as ``request_type``) may override :meth:`answer` and
    :meth:`refuse`, which the batcher calls (on the event loop, once, while the future is
    not done) instead of setting the result or the exception itself, and :meth:`cancel`
    (calling this one's).
    """

    __slots__ = ("batcher", "inputs", "rows", "nbytes", "signature", "enqueued", "queued",
                 "source", "request_id", "timer")
    #: whether the request counts in the batcher's ``successes`` / ``failures``
    counted = True
    batcher: Batcher
    inputs: Tensors
    rows: int
    nbytes: int
    signature: Signature
    enqueued: float
    queued: bool
    source: object
    request_id: str | None
    timer: asyncio.TimerHandle | None

    def answer(self, outputs: Tensors) -> None:
        """The request's outputs are in (the rows of its batch that are its own)."""
        self.set_result(outputs)

    def refuse(self, error: BaseException) -> None:
        """The request failed (the model raised, its deadline passed, its model stopped)."""
        self.set_exception(error)

    def cancel(self, msg=None) -> bool:
        if not asyncio.Future.cancel(self, msg):
            return False
        self.batcher._dropped(self)
        return True


class _Batch:
    """One batch on its way through the model: its requests, then its outcome."""

    __slots__ = ("batcher", "requests", "rows", "enqueued", "started", "inputs", "outputs",
                 "seconds", "error")

    def __init__(self, batcher: Batcher, requests: list[Request], rows: int, enqueued: float):
        self.batcher = batcher
        self.requests = requests
        self.rows = rows
        self.enqueued = enqueued  # the requests' arrivals, summed
        self.started = time.monotonic()
        self.inputs: Tensors = {}
        self.outputs: Tensors = {}
        self.seconds = 0.0  # in the model
        self.error: BaseException | None = None


def _runner(jobs: SimpleQueue, run: Callable[[Tensors], Tensors],
            loop: asyncio.AbstractEventLoop) -> None:
    """One instance of a model: runs the batches handed to it until it is given ``None``;
    each batch goes back to its batcher on the event loop with one call."""
    monotonic = time.monotonic
    while True:
        batch = jobs.get()
        if batch is None:
            return
        started = monotonic()
        try:
            batch.outputs = run(batch.inputs)
        except BaseException as exc:  # the batch's failure, not this thread's
            batch.error = exc
        batch.seconds = monotonic() - started
        try:
            loop.call_soon_threadsafe(batch.batcher._threaded, batch)
        except RuntimeError:  # the event loop is closed: nobody waits any more
            return
        del batch  # (a batcher nobody holds may go, and stop its runners)


def _stop_runners(jobs: SimpleQueue, count: int) -> None:
    for _ in range(count):
        jobs.put(None)


class Batcher:
    """The queue and batch scheduler of one model version.

    Args:
        run: the model, ``run(inputs) -> outputs``; called in a runner thread with the
            batch's concatenated tensors; every output must have one row per input row.
        max_batch_size: rows per batch; 0 = the model has no batch axis (one request a run).
        dynamic_batching: settings; ``None`` = one request per run (still queued, bounded).
        instance_count: batches that may run at the same time (runner threads).
        on_batch: called on the event loop with a :class:`BatchRecord` after every batch.
        name: used in thread names and error messages.
        inline_below: seconds; batches the model is expected to finish sooner run on the
            event loop's thread (0 = always in a runner thread).
        max_queued_per_source: requests one source (other than ``None``) may have queued;
            ``None`` = a quarter of ``max_queue_size`` (at least 1).

    ``successes`` and ``failures`` count the requests answered and failed (a request queued
    in parts counts once; cancelled ones fail).
    """

    def __init__(self, run: Callable[[Tensors], Tensors], *, max_batch_size: int = 0,
                 dynamic_batching: DynamicBatching | None = None, instance_count: int = 1,
                 on_batch: Callable[[BatchRecord], None] | None = None, name: str = "model",
                 inline_below: float = DEFAULT_INLINE_BELOW,
                 max_queued_per_source: int | None = None):
        self._run = run
        self.inline_below = inline_below
        # Compute-time estimates from the batches run so far (infinite until one ran).
        self._call_seconds = self._row_seconds = float("inf")
        self.name = name
        self.max_batch_size = max_batch_size
        self.batching = max_batch_size > 0 and dynamic_batching is not None
        policy = dynamic_batching or DynamicBatching()
        self.max_queue_delay = policy.max_queue_delay_us / 1e6  # seconds
        self.preferred = tuple(p for p in policy.preferred_batch_sizes if p <= max_batch_size)
        self._preferred = frozenset(self.preferred)  # (what _choose looks rows up in)
        self.max_queue_size = policy.max_queue_size if dynamic_batching else DEFAULT_MAX_QUEUE_SIZE
        self.max_batch_bytes = policy.max_batch_bytes or float("inf")  # None, 0: no limit
        self.instance_count = instance_count
        self._on_batch = on_batch
        self.max_queued_per_source = max(1, max_queued_per_source or self.max_queue_size // 4)
        # One FIFO sub-queue per source, and the sources with queued requests in the
        # round-robin order of the next batch.
        self._queues: dict[object, collections.deque[Request]] = {}
        self._order: collections.deque = collections.deque()
        self._depth = 0  # requests queued, all sources
        self._idle = instance_count
        self.successes = self.failures = 0
        self._warned_at = float("-inf")  # when a failure of this model was last logged
        self._unlogged = 0  # failed batches since, not logged
        self._soon: asyncio.Handle | None = None  # the scheduler's next pass, when due
        self._timer: asyncio.TimerHandle | None = None  # ... or its pass at a queue delay
        self._woken: asyncio.Future | None = None  # what stop() waits on: a batch finished
        self._started = False
        self._closing = False
        # The runner threads (started with the first batch that needs them) take batches
        # from here; they stop when the batcher stops, or is dropped.
        self._jobs: SimpleQueue = SimpleQueue()
        self._runners = 0
        weakref.finalize(self, _stop_runners, self._jobs, instance_count)

    @property
    def queue_depth(self) -> int:
        """Requests waiting (not yet in a running batch)."""
        return self._depth

    def start(self) -> None:
        """Start taking requests on the running event loop."""
        # Kept: asyncio.get_running_loop() costs a getpid() system call on every use.
        self._loop = asyncio.get_running_loop()
        self._started = True

    async def stop(self, timeout: float | None = 30.0) -> None:
        """Refuse new requests, finish the queued and running ones, then stop.

        Args:
            timeout: seconds to wait for the work in hand; what is left then fails with
                ``ModelNotReady``.
        """
        self._closing = True
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._depth or self._idle < self.instance_count:
            if deadline is not None and time.monotonic() >= deadline:
                break
            self._pump()
            if not self._depth and self._idle == self.instance_count:
                break
            self._woken = self._loop.create_future()
            # (nothing could start: look again soon)
            remaining = 0.005 if self._depth and self._idle else None
            if deadline is not None:
                remaining = max(0.0, min(remaining or float("inf"), deadline - time.monotonic()))
            await asyncio.wait([self._woken], timeout=remaining)
        self._woken = None
        for request in [r for q in list(self._queues.values()) for r in q]:
            self._fail(request, ModelNotReady(f"model {self.name} was unloaded"))
        self._started = False
        for handle in (self._soon, self._timer):
            if handle is not None:
                handle.cancel()
        self._soon = self._timer = None
        # The runners finish the batches they hold (their requests are answered if the
        # event loop still runs), then end.
        _stop_runners(self._jobs, self._runners)
        self._runners = 0

    def enqueue(self, inputs: Tensors, rows: int, deadline: float | None = None,
                source=None, request_id: str | None = None,
                request_type: type[Request] = Request,
                fixed: tuple[Signature, int] | None = None) -> Request:
        """Queue one request without waiting: the returned future gets its outputs (await
        it, or chain callbacks on it: no coroutine and no task a request).

        Args:
            inputs: the request's tensors; for a batching model each has ``rows`` rows.
            rows: the request's first dimension (1 for a model without a batch axis).
            deadline: a ``time.monotonic()`` instant after which the request is abandoned
                with ``DeadlineExceeded``.
            source: hashable (the client's address): picks the request's sub-queue.
            request_id: the client's id of the request, named when the model fails on it.
            request_type: the :class:`Request` (sub)class to make the request of.
            fixed: what the caller found ``inputs`` to be, when it checked them against
                one fixed layout: their signature (``((name, dtype, shape[1:]),)``, the
                dtype one that equals theirs) and octets a row (else read from them).

        Cancelling the future drops the request from the queue.

        Raises (here, at once):
            QueueFull: ``max_queue_size`` requests are already waiting, or ``source`` has
                ``max_queued_per_source`` queued.
            DeadlineExceeded: the deadline has passed (a later one fails the future).
            InvalidInput: the request alone has more rows than ``max_batch_size``.
            ModelNotReady: the batcher is not started, or stopping.
        """
        if self._closing or not self._started:
            raise ModelNotReady(f"model {self.name} is not accepting requests")
        if rows > self.max_batch_size > 0:
            raise InvalidInput(f"request has {rows} rows; model {self.name} takes at most "
                               f"{self.max_batch_size} rows a batch")
        if self._depth >= self.max_queue_size:
            raise QueueFull(f"model {self.name} has {self._depth} requests queued "
                            f"(max_queue_size {self.max_queue_size})")
        queue = self._queues.get(source)
        if (queue is not None and source is not None
                and len(queue) >= self.max_queued_per_source):
            raise QueueFull(f"model {self.name} has {len(queue)} requests of this client "
                            f"queued (max_queued_per_source {self.max_queued_per_source})")
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            raise DeadlineExceeded(f"deadline passed before model {self.name} was reached")
        request = request_type(loop=self._loop)
        request.batcher = self
        request.inputs = inputs
        request.rows = rows
        request.enqueued = now
        request.queued = True
        request.source = source
        request.request_id = request_id
        if self.batching:  # requests batch together only when their tensors concatenate
            if fixed is not None:
                request.signature = fixed[0]
                request.nbytes = rows * fixed[1]
            elif len(inputs) == 1:
                ((name, a),) = inputs.items()
                request.nbytes = a.nbytes
                request.signature = ((name, a.dtype, a.shape[1:]),)
            else:
                request.nbytes = sum(a.nbytes for a in inputs.values())
                request.signature = tuple((name, a.dtype, a.shape[1:])
                                          for name, a in inputs.items())
        request.timer = None if deadline is None else self._loop.call_later(
            deadline - now, self._expire, request)
        if queue is None:
            queue = self._queues[source] = collections.deque()
            self._order.append(source)
        queue.append(request)
        self._depth += 1
        if self._soon is None:
            # One pass of the scheduler after this pass of the loop, so that the requests
            # read in the same pass can join one batch.
            self._soon = self._loop.call_soon(self._pump)
        return request

    def enqueue_split(self, inputs: Tensors, rows: int, deadline: float | None = None,
                      source=None, request_id: str | None = None,
                      request_type: type[Request] = Request) -> Request:
        """Queue a request of more rows than ``max_batch_size`` as parts of at most that
        many rows: the returned future gets every output, the parts' rows joined in order.

        The parts are views of ``inputs``; ``instance_count + 1`` of them are queued or
        running at a time (enough to keep every instance busy without filling the queue),
        each batched with other requests as any request is. If a part fails, the request
        fails with that part's error and its other parts leave the queue; cancelling the
        future drops them too. Errors found at once are raised here, as by :meth:`enqueue`.
        """
        return _Split(self, inputs, rows, deadline, source, request_id, request_type).future

    def _expire(self, request: Request) -> None:
        request.timer = None
        self._fail(request, DeadlineExceeded(
            f"deadline passed while waiting for model {self.name}"))

    def _unqueue(self, request: Request) -> None:
        request.queued = False
        queue = self._queues[request.source]
        queue.remove(request)
        self._depth -= 1
        if not queue:
            del self._queues[request.source]
            self._order.remove(request.source)

    def _dropped(self, request: Request) -> None:
        """``request`` failed or was cancelled: out of the queue, counted."""
        if request.queued:
            self._unqueue(request)
        if request.timer is not None:
            request.timer.cancel()
        if request.counted:
            self.failures += 1

    def _fail(self, request: Request, error: BaseException) -> None:
        if not request.done():
            self._dropped(request)
            request.refuse(error)

    def _candidates(self):
        """The queued requests in the order batches take them: the one source's queue, or
        round-robin across the sources (the first of each, then the second of each, ...)."""
        queues = self._queues
        if len(queues) == 1:
            yield from next(iter(queues.values()))
            return
        order = [queues[source] for source in self._order]
        depth = 0
        while order:
            for queue in order:
                yield queue[depth]
            depth += 1
            order = [queue for queue in order if len(queue) > depth]

    def _choose(self, now: float) -> tuple[int, float]:
        """Requests to take from the candidates now (0 = wait), and seconds to wait
        otherwise."""
        if not self.batching:
            return 1, 0.0
        queues = self._queues
        head = queues[self._order[0]][0]
        rows = count = preferred_count = nbytes = 0
        can_grow = True
        preferred = self._preferred
        signature = head.signature  # (often the very object: compared by identity first)
        candidates = queues[head.source] if len(queues) == 1 else self._candidates()
        for request in candidates:  # stops within max_batch_size rows
            if ((request.signature is not signature and request.signature != signature)
                    or rows + request.rows > self.max_batch_size
                    or (count and nbytes + request.nbytes > self.max_batch_bytes)):
                can_grow = False
                break
            rows += request.rows
            nbytes += request.nbytes
            count += 1
            if rows in preferred:
                preferred_count = count
        if rows >= self.max_batch_size or nbytes >= self.max_batch_bytes:
            can_grow = False
        if preferred_count:
            return preferred_count, 0.0
        oldest = head.enqueued if len(queues) == 1 else min(
            queue[0].enqueued for queue in queues.values())
        wait = oldest + self.max_queue_delay - now
        if not can_grow or wait <= 0 or self._closing:
            return count, 0.0
        return 0, wait

    def _pump(self) -> None:
        """Start every batch that can start now; arm the timer for the one that must wait."""
        self._soon = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._depth and self._idle and self._started:
            count, wait = self._choose(time.monotonic())
            if not count:
                self._timer = self._loop.call_later(wait, self._pump)
                return
            self._execute(self._take(count))

    def _take(self, count: int) -> _Batch:
        """Take the first `count` candidates off their queues; the next batch starts with
        the source after the last one served."""
        queues = self._queues
        if len(queues) == 1:
            source = self._order[0]
            queue = queues[source]
            popleft = queue.popleft
            requests = []
            rows = 0
            enqueued = 0.0
            for _ in range(count):
                request = popleft()
                request.queued = False
                rows += request.rows
                enqueued += request.enqueued
                requests.append(request)
            if not queue:
                del queues[source]
                self._order.clear()
        else:
            requests = list(itertools.islice(self._candidates(), count))
            last = requests[-1].source
            for request in requests:
                queues[request.source].popleft()
                request.queued = False
            order = self._order
            order.rotate(-order.index(last) - 1)
            for source in {r.source for r in requests}:
                if not queues[source]:
                    del queues[source]
                    order.remove(source)
            rows = sum(r.rows for r in requests)
            enqueued = sum(r.enqueued for r in requests)
        self._depth -= count
        return _Batch(self, requests, rows, enqueued)

    def _execute(self, batch: _Batch) -> None:
        """Run one batch: at once on this thread when it is expected to be quick, else in
        a runner thread, whose completion comes back to :meth:`_threaded` on the loop.
        (Queued requests are never done: a request leaves its queue as it finishes.)"""
        self._idle -= 1
        requests = batch.requests
        try:
            if len(requests) == 1:
                inputs = requests[0].inputs  # nothing to join: the request's own memory
            else:
                inputs = {}
                for name in requests[0].inputs:
                    joined = join(requests, name, batch.rows)  # (rows copied with memcpy)
                    inputs[name] = joined if joined is not None else np.concatenate(
                        [r.inputs[name] for r in requests])  # (axis 0)
            if self._inline(batch.rows):
                started = time.monotonic()
                batch.outputs = self._run(inputs)
                batch.seconds = time.monotonic() - started
                self._finish(batch)
                return
        except Exception as exc:
            batch.error = exc
            self._finish(batch)
            return
        batch.inputs = inputs
        if self._runners < self.instance_count:
            self._start_runner()
        self._jobs.put(batch)

    def _start_runner(self) -> None:
        self._runners += 1
        threading.Thread(target=_runner, args=(self._jobs, self._run, self._loop),
                         name=f"mip-{self.name}_{self._runners - 1}", daemon=True).start()

    def _threaded(self, batch: _Batch) -> None:
        """A batch back from a runner thread (on the event loop)."""
        batch.inputs = {}
        self._finish(batch)
        woken = self._woken
        if woken is not None and not woken.done():
            woken.set_result(None)
        self._pump()

    def _finish(self, batch: _Batch) -> None:
        """Hand a batch's outputs (or its error) to its requests; free its instance."""
        self._idle += 1
        requests, rows = batch.requests, batch.rows
        error = batch.error
        if error is None:
            try:
                self._learn(rows, batch.seconds)
                self._deliver(requests, rows, batch.outputs)
            except Exception as exc:
                error = exc
        if error is not None:
            if not isinstance(error, ServingError) or isinstance(error, InternalError):
                self._warn_failure(error, requests)
            if not isinstance(error, ServingError):
                error = InternalError(f"model {self.name} failed: "
                                      f"{type(error).__name__}: {error}")
            for request in requests:
                self._fail(request, error)
        if self._on_batch is not None:
            try:
                started = batch.started
                self._on_batch(BatchRecord(rows, len(requests), started - requests[0].enqueued,
                                           time.monotonic() - started, error is not None,
                                           started * len(requests) - batch.enqueued))
            except Exception:
                log.exception("batch callback of model %s failed", self.name)

    def _warn_failure(self, error: BaseException, requests: list[Request]) -> None:
        """Log a model's failure at WARNING, naming the request ids its clients gave (at
        most :data:`_IDS_NAMED`): at most one line every :data:`FAILURE_LOG_INTERVAL`
        seconds per model, with the count of those left out, so a flood of bad requests
        cannot flood the log."""
        now = time.monotonic()
        if now - self._warned_at < FAILURE_LOG_INTERVAL:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more failed batches not logged)" if self._unlogged else ""
        ids = [r.request_id for r in requests if r.request_id]
        named = ""
        if ids:
            named = " [request id(s) " + ", ".join(repr(i[:128]) for i in ids[:_IDS_NAMED])
            named += f" and {len(ids) - _IDS_NAMED} more]" if len(ids) > _IDS_NAMED else "]"
        log.warning("model %s failed on a batch of %d request(s)%s: %s: %s%s", self.name,
                    len(requests), named, type(error).__name__, error, more)
        self._warned_at, self._unlogged = now, 0

    def _inline(self, rows: int) -> bool:
        if not self.inline_below:
            return False
        return max(self._call_seconds, self._row_seconds * rows) < self.inline_below

    def _learn(self, rows: int, seconds: float) -> None:
        """Fold one batch's compute time (the model's own, not the hand-off to a thread)
        into the estimates."""
        per_row = seconds / max(rows, 1)
        if self._call_seconds == float("inf"):
            self._call_seconds, self._row_seconds = seconds, per_row
            return
        self._call_seconds += _EWMA * (seconds - self._call_seconds)
        self._row_seconds += _EWMA * (per_row - self._row_seconds)

    def _deliver(self, requests: list[Request], rows: int, outputs: Tensors) -> None:
        """Answer each request with its rows of the outputs (views: no copy per request)."""
        whole = len(requests) == 1  # the outputs are the request's own
        items = list(outputs.items())
        if not whole:
            for name, array in items:
                if np.ndim(array) == 0 or array.shape[0] != rows:
                    raise InternalError(f"model {self.name} returned {name} with shape "
                                        f"{np.shape(array)} for a batch of {rows} rows")
        only: np.ndarray | None = None  # the one output, if there is one
        name = ""
        if len(items) == 1:
            ((name, only),) = items
        # One row a request and one output: the rows' views made by numpy in one pass
        # (no slice a request).
        views = (iter(only[:, None]) if only is not None and not whole and rows == len(requests)
                 else None)
        answered = 0
        start = 0
        try:
            for request in requests:
                stop = start + request.rows
                if views is not None:
                    view = next(views)
                if not request.done():
                    if request.timer is not None:
                        request.timer.cancel()
                    if request.counted:
                        answered += 1
                    if whole:
                        request.answer(outputs)
                    elif views is not None:
                        request.answer({name: view})
                    elif only is not None:  # (no comprehension a request)
                        request.answer({name: only[start:stop]})
                    else:
                        request.answer({name: a[start:stop] for name, a in items})
                start = stop
        finally:
            self.successes += answered


class _Part(Request):
    """A part of a request queued with :meth:`Batcher.enqueue_split`: its outcome goes to
    the whole request at once."""

    __slots__ = ("split", "index")
    counted = False
    split: _Split
    index: int

    def answer(self, outputs: Tensors) -> None:
        self.set_result(outputs)
        self.split.part_answered(self, outputs)

    def refuse(self, error: BaseException) -> None:
        self.set_exception(error)
        self.exception()  # (seen: not logged as never retrieved)
        self.split.part_failed(self, error)


class _Split:
    """One request queued as parts of at most ``max_batch_size`` rows (see
    :meth:`Batcher.enqueue_split`)."""

    __slots__ = ("batcher", "inputs", "rows", "deadline", "source", "request_id", "future",
                 "outputs", "pending", "sent", "finished", "count")

    def __init__(self, batcher: Batcher, inputs: Tensors, rows: int, deadline: float | None,
                 source, request_id: str | None, request_type: type[Request]):
        self.batcher, self.inputs, self.rows = batcher, inputs, rows
        self.deadline, self.source, self.request_id = deadline, source, request_id
        self.count = -(-rows // batcher.max_batch_size)
        self.outputs: list[Tensors] = [{}] * self.count
        self.pending: set[_Part] = set()
        self.sent = self.finished = 0
        # The whole request's future: not queued itself (its parts are).
        future = self.future = request_type(loop=batcher._loop)
        future.batcher, future.queued, future.timer = batcher, False, None
        future.inputs, future.rows, future.request_id = inputs, rows, request_id
        try:
            for _ in range(min(batcher.instance_count + 1, self.count)):
                self._queue_next()
        except BaseException:
            # Nobody waits for it (the error is raised to the caller, who counts it).
            asyncio.Future.cancel(future)
            self._drop()
            raise
        future.add_done_callback(self._settled)

    def _queue_next(self) -> None:
        """Queue the next part: rows [start, stop) of every input, as views."""
        size = self.batcher.max_batch_size
        index = self.sent
        start = index * size
        stop = min(start + size, self.rows)
        part = {name: array[start:stop] for name, array in self.inputs.items()}
        queued = cast(_Part, self.batcher.enqueue(part, stop - start, self.deadline,
                                                  self.source, self.request_id, _Part))
        queued.split, queued.index = self, index
        self.sent += 1
        self.pending.add(queued)

    def part_answered(self, part: _Part, outputs: Tensors) -> None:
        self.pending.discard(part)
        future, batcher = self.future, self.batcher
        if future.done():
            return
        try:
            self.outputs[part.index] = outputs
            self.finished += 1
            if self.sent < self.count:
                self._queue_next()
            elif self.finished == self.count:
                joined = self._join()
                batcher.successes += 1
                future.answer(joined)
        except Exception as exc:  # the request fails as a whole, with this reason
            batcher._fail(future, exc)

    def part_failed(self, part: _Part, error: BaseException) -> None:
        """The request fails as a whole, with the part's reason."""
        self.pending.discard(part)
        self.batcher._fail(self.future, error)

    def _join(self) -> Tensors:
        """Every output with the parts' rows in order (one copy of the outputs)."""
        size, outputs = self.batcher.max_batch_size, self.outputs
        self.outputs = []
        joined: Tensors = {}
        for name in outputs[0]:
            arrays: list[np.ndarray] = []
            for index, part in enumerate(outputs):
                array = part.get(name)
                rows = min(size, self.rows - index * size)
                shape = () if array is None else np.shape(array)
                if array is None or not shape or shape[0] != rows:
                    raise InternalError(f"model {self.batcher.name} returned {name} with "
                                        f"shape {shape} for a batch of {rows} rows")
                arrays.append(array)
            joined[name] = np.concatenate(arrays, axis=0)
        return joined

    def _settled(self, future: asyncio.Future) -> None:
        if future.cancelled() or future.exception() is not None:
            self._drop()
        self.inputs = {}

    def _drop(self) -> None:
        """Take the parts still queued or running off the queue."""
        pending, self.pending = self.pending, set()
        for part in pending:
            part.cancel()
