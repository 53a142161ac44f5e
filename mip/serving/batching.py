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
removed from the queue at once. A batch runs in a worker thread, so the event loop keeps
doing I/O while the model computes; ``instance_count`` batches may run at the same time.

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
import concurrent.futures
import functools
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from mip.errors import (DeadlineExceeded, InternalError, InvalidInput, ModelNotReady, QueueFull,
                        ServingError)
from mip.serving.config import DEFAULT_MAX_QUEUE_SIZE, DynamicBatching

__all__ = ["DEFAULT_INLINE_BELOW", "Batcher", "BatchRecord"]

#: batches expected to compute in less than this many seconds (250 µs) run on the event loop.
DEFAULT_INLINE_BELOW = 250e-6
_EWMA = 0.1  # weight of the newest batch in the compute-time estimates
#: seconds between two WARNING lines about one model's failures
FAILURE_LOG_INTERVAL = 10.0
_IDS_NAMED = 8  # request ids a failure warning names, at most

Tensors = dict[str, np.ndarray]

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


class _Request:
    __slots__ = ("inputs", "rows", "nbytes", "signature", "future", "enqueued", "queued",
                 "source", "request_id")

    def __init__(self, inputs: Tensors, rows: int, future: asyncio.Future, enqueued: float,
                 source, request_id: str | None = None):
        self.source = source
        self.request_id = request_id
        self.inputs = inputs
        self.rows = rows
        # Requests batch together only when their tensors concatenate on axis 0.
        if len(inputs) == 1:
            ((name, a),) = inputs.items()
            self.nbytes = a.nbytes
            self.signature = ((name, a.dtype, a.shape[1:]),)
        else:
            self.nbytes = sum(a.nbytes for a in inputs.values())
            self.signature = tuple((name, a.dtype, a.shape[1:]) for name, a in inputs.items())
        self.future = future
        self.enqueued = enqueued
        self.queued = True


class Batcher:
    """The queue and batch scheduler of one model version.

    Args:
        run: the model, ``run(inputs) -> outputs``; called in a worker thread with the
            batch's concatenated tensors; every output must have one row per input row.
        max_batch_size: rows per batch; 0 = the model has no batch axis (one request a run).
        dynamic_batching: settings; ``None`` = one request per run (still queued, bounded).
        instance_count: batches that may run at the same time (worker threads).
        on_batch: called on the event loop with a :class:`BatchRecord` after every batch.
        name: used in thread names and error messages.
        inline_below: seconds; batches the model is expected to finish sooner run on the
            event loop's thread (0 = always in a worker thread).
        max_queued_per_source: requests one source (other than ``None``) may have queued;
            ``None`` = a quarter of ``max_queue_size`` (at least 1).
    """

    def __init__(self, run: Callable[[Tensors], Tensors], *, max_batch_size: int = 0,
                 dynamic_batching: DynamicBatching | None = None, instance_count: int = 1,
                 on_batch: Callable[[BatchRecord], None] | None = None, name: str = "model",
                 inline_below: float = DEFAULT_INLINE_BELOW,
                 max_queued_per_source: int | None = None):
        self._run = run
        self.inline_below = inline_below
        # Compute-time estimates from batches run so far (None until one ran in a thread).
        self._call_seconds: float | None = None
        self._row_seconds: float | None = None
        self.name = name
        self.max_batch_size = max_batch_size
        self.batching = max_batch_size > 0 and dynamic_batching is not None
        policy = dynamic_batching or DynamicBatching()
        self.max_queue_delay = policy.max_queue_delay_us / 1e6  # seconds
        self.preferred = tuple(p for p in policy.preferred_batch_sizes if p <= max_batch_size)
        self.max_queue_size = policy.max_queue_size if dynamic_batching else DEFAULT_MAX_QUEUE_SIZE
        self.max_batch_bytes = policy.max_batch_bytes or float("inf")  # None, 0: no limit
        self.instance_count = instance_count
        self._on_batch = on_batch
        self.max_queued_per_source = max(1, max_queued_per_source or self.max_queue_size // 4)
        # One FIFO sub-queue per source, and the sources with queued requests in the
        # round-robin order of the next batch.
        self._queues: dict[object, collections.deque[_Request]] = {}
        self._order: collections.deque = collections.deque()
        self._depth = 0  # requests queued, all sources
        self._idle = instance_count
        self._warned_at = float("-inf")  # when a failure of this model was last logged
        self._unlogged = 0  # failed batches since, not logged
        self._running: set[asyncio.Future] = set()  # batches in worker threads
        self._soon: asyncio.Handle | None = None  # the scheduler's next pass, when due
        self._timer: asyncio.TimerHandle | None = None  # ... or its pass at a queue delay
        self._started = False
        self._closing = False
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=instance_count, thread_name_prefix=f"mip-{name}")

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
        while self._depth or self._running:
            if deadline is not None and time.monotonic() >= deadline:
                break
            self._pump()
            waiters = list(self._running) or [asyncio.ensure_future(asyncio.sleep(0.005))]
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            await asyncio.wait(waiters, timeout=remaining)
        for request in [r for q in list(self._queues.values()) for r in q]:
            self._fail(request, ModelNotReady(f"model {self.name} was unloaded"))
        self._started = False
        for handle in (self._soon, self._timer):
            if handle is not None:
                handle.cancel()
        self._soon = self._timer = None
        self._executor.shutdown(wait=False)

    def enqueue(self, inputs: Tensors, rows: int, deadline: float | None = None,
                source=None, request_id: str | None = None) -> asyncio.Future:
        """Queue one request without waiting: the returned future gets its outputs (await
        it, or chain callbacks on it: no coroutine and no task a request).

        Args:
            inputs: the request's tensors; for a batching model each has ``rows`` rows.
            rows: the request's first dimension (1 for a model without a batch axis).
            deadline: a ``time.monotonic()`` instant after which the request is abandoned
                with ``DeadlineExceeded``.
            source: hashable (the client's address): picks the request's sub-queue.
            request_id: the client's id of the request, named when the model fails on it.

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
        future = self._loop.create_future()
        request = _Request(inputs, rows, future, now, source, request_id)
        if queue is None:
            queue = self._queues[source] = collections.deque()
            self._order.append(source)
        queue.append(request)
        self._depth += 1
        future.add_done_callback(functools.partial(self._forget, request))
        if self._soon is None:
            # One pass of the scheduler after this pass of the loop, so that the requests
            # read in the same pass can join one batch.
            self._soon = self._loop.call_soon(self._pump)
        if deadline is not None:
            timer = self._loop.call_later(deadline - now, self._expire, future)
            future.add_done_callback(lambda _: timer.cancel())
        return future

    def enqueue_split(self, inputs: Tensors, rows: int, deadline: float | None = None,
                      source=None, request_id: str | None = None) -> asyncio.Future:
        """Queue a request of more rows than ``max_batch_size`` as parts of at most that
        many rows: the returned future gets every output, the parts' rows joined in order.

        The parts are views of ``inputs``; ``instance_count + 1`` of them are queued or
        running at a time (enough to keep every instance busy without filling the queue),
        each batched with other requests as any request is. If a part fails, the request
        fails with that part's error and its other parts leave the queue; cancelling the
        future drops them too. Errors found at once are raised here, as by :meth:`enqueue`.
        """
        return _Split(self, inputs, rows, deadline, source, request_id).future

    def _expire(self, future: asyncio.Future) -> None:
        if not future.done():
            # Failing the future also drops the request from the queue (_forget).
            future.set_exception(DeadlineExceeded(
                f"deadline passed while waiting for model {self.name}"))

    def _forget(self, request: _Request, future: asyncio.Future) -> None:
        if request.queued:
            request.queued = False
            queue = self._queues[request.source]
            queue.remove(request)
            self._depth -= 1
            if not queue:
                del self._queues[request.source]
                self._order.remove(request.source)

    def _fail(self, request: _Request, error: Exception) -> None:
        if not request.future.done():
            request.future.set_exception(error)

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
        candidates = queues[head.source] if len(queues) == 1 else self._candidates()
        for request in candidates:  # stops within max_batch_size rows
            if (request.signature != head.signature or rows + request.rows > self.max_batch_size
                    or (count and nbytes + request.nbytes > self.max_batch_bytes)):
                can_grow = False
                break
            rows += request.rows
            nbytes += request.nbytes
            count += 1
            if rows in self.preferred:
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

    def _take(self, count: int) -> list[_Request]:
        """Take the first `count` candidates off their queues; the next batch starts with
        the source after the last one served."""
        queues = self._queues
        if len(queues) == 1:
            source = self._order[0]
            queue = queues[source]
            batch = [queue.popleft() for _ in range(count)]
            if not queue:
                del queues[source]
                self._order.clear()
        else:
            batch = list(itertools.islice(self._candidates(), count))
            last = batch[-1].source
            for request in batch:
                queues[request.source].popleft()
            order = self._order
            order.rotate(-order.index(last) - 1)
            for source in {r.source for r in batch}:
                if not queues[source]:
                    del queues[source]
                    order.remove(source)
        for request in batch:
            request.queued = False
        self._depth -= count
        return batch

    def _execute(self, batch: list[_Request]) -> None:
        """Run one batch: at once on this thread when it is expected to be quick, else in
        a worker thread, whose completion comes back to :meth:`_finish` on the loop."""
        live = [r for r in batch if not r.future.done()]
        if not live:
            return
        self._idle -= 1
        rows = sum(r.rows for r in live)
        started = time.monotonic()
        try:
            if len(live) == 1:
                inputs = live[0].inputs  # nothing to join: the request's own memory
            else:
                inputs = {name: np.concatenate([r.inputs[name] for r in live], axis=0)
                          for name in live[0].inputs}
            if self._inline(rows):
                self._finish(live, rows, started, self._timed(inputs), None)
                return
            future = self._loop.run_in_executor(self._executor, self._timed, inputs)
        except Exception as exc:
            self._finish(live, rows, started, None, exc)
            return
        self._running.add(future)
        future.add_done_callback(functools.partial(self._threaded, live, rows, started))

    def _threaded(self, live: list[_Request], rows: int, started: float,
                  future: asyncio.Future) -> None:
        self._running.discard(future)
        if future.cancelled():
            self._finish(live, rows, started, None,
                         ModelNotReady(f"model {self.name} was unloaded"))
        elif (error := future.exception()) is not None:
            self._finish(live, rows, started, None, error)
        else:
            self._finish(live, rows, started, future.result(), None)
        self._pump()

    def _finish(self, live: list[_Request], rows: int, started: float,
                result: tuple[Tensors, float] | None, error: Exception | None) -> None:
        """Hand a batch's outputs (or its error) to its requests; free its instance."""
        self._idle += 1
        if error is None:
            outputs, seconds = result
            try:
                self._learn(rows, seconds)
                self._deliver(live, rows, outputs)
            except Exception as exc:
                error = exc
        if error is not None:
            if not isinstance(error, ServingError) or isinstance(error, InternalError):
                self._warn_failure(error, live)
            if not isinstance(error, ServingError):
                error = InternalError(f"model {self.name} failed: "
                                      f"{type(error).__name__}: {error}")
            for request in live:
                self._fail(request, error)
        if self._on_batch is not None:
            try:
                waited = started * len(live) - sum(r.enqueued for r in live)
                self._on_batch(BatchRecord(rows, len(live), started - live[0].enqueued,
                                           time.monotonic() - started, error is not None,
                                           waited))
            except Exception:
                log.exception("batch callback of model %s failed", self.name)

    def _warn_failure(self, error: BaseException, live: list[_Request]) -> None:
        """Log a model's failure at WARNING, naming the request ids its clients gave (at
        most :data:`_IDS_NAMED`): at most one line every :data:`FAILURE_LOG_INTERVAL`
        seconds per model, with the count of those left out, so a flood of bad requests
        cannot flood the log."""
        now = time.monotonic()
        if now - self._warned_at < FAILURE_LOG_INTERVAL:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more failed batches not logged)" if self._unlogged else ""
        ids = [r.request_id for r in live if r.request_id]
        named = ""
        if ids:
            named = " [request id(s) " + ", ".join(repr(i[:128]) for i in ids[:_IDS_NAMED])
            named += f" and {len(ids) - _IDS_NAMED} more]" if len(ids) > _IDS_NAMED else "]"
        log.warning("model %s failed on a batch of %d request(s)%s: %s: %s%s", self.name,
                    len(live), named, type(error).__name__, error, more)
        self._warned_at, self._unlogged = now, 0

    def _timed(self, inputs: Tensors) -> tuple[Tensors, float]:
        started = time.monotonic()
        outputs = self._run(inputs)
        return outputs, time.monotonic() - started

    def _inline(self, rows: int) -> bool:
        call, row = self._call_seconds, self._row_seconds
        if call is None or not self.inline_below:
            return False
        return max(call, row * rows) < self.inline_below

    def _learn(self, rows: int, seconds: float) -> None:
        """Fold one batch's compute time (the model's own, not the hand-off to a thread)
        into the estimates."""
        per_row = seconds / max(rows, 1)
        if self._call_seconds is None:
            self._call_seconds, self._row_seconds = seconds, per_row
            return
        self._call_seconds += _EWMA * (seconds - self._call_seconds)
        self._row_seconds += _EWMA * (per_row - self._row_seconds)

    def _deliver(self, live: list[_Request], rows: int, outputs: Tensors) -> None:
        if len(live) == 1:
            if not live[0].future.done():
                live[0].future.set_result(outputs)
            return
        for name, array in outputs.items():
            if np.ndim(array) == 0 or array.shape[0] != rows:
                raise InternalError(f"model {self.name} returned {name} with shape "
                                    f"{np.shape(array)} for a batch of {rows} rows")
        start = 0
        for request in live:
            stop = start + request.rows
            # Slices are views of the batch's outputs: no copy per request.
            result = {name: array[start:stop] for name, array in outputs.items()}
            start = stop
            if not request.future.done():
                request.future.set_result(result)


class _Split:
    """One request queued as parts of at most ``max_batch_size`` rows (see
    :meth:`Batcher.enqueue_split`)."""

    __slots__ = ("batcher", "inputs", "rows", "deadline", "source", "request_id", "future",
                 "outputs", "pending", "sent", "finished", "count")

    def __init__(self, batcher: Batcher, inputs: Tensors, rows: int, deadline: float | None,
                 source, request_id: str | None = None):
        self.batcher, self.inputs, self.rows = batcher, inputs, rows
        self.deadline, self.source, self.request_id = deadline, source, request_id
        self.count = -(-rows // batcher.max_batch_size)
        self.outputs: list[Tensors | None] = [None] * self.count
        self.pending: set[asyncio.Future] = set()
        self.sent = self.finished = 0
        self.future = batcher._loop.create_future()
        try:
            for _ in range(min(batcher.instance_count + 1, self.count)):
                self._queue_next()
        except BaseException:
            self.future.cancel()  # nobody waits for it: the error is raised to the caller
            self._drop()
            raise
        self.future.add_done_callback(self._settled)

    def _queue_next(self) -> None:
        """Queue the next part: rows [start, stop) of every input, as views."""
        size = self.batcher.max_batch_size
        index = self.sent
        start = index * size
        stop = min(start + size, self.rows)
        part = {name: array[start:stop] for name, array in self.inputs.items()}
        future = self.batcher.enqueue(part, stop - start, self.deadline, self.source,
                                      self.request_id)
        self.sent += 1
        self.pending.add(future)
        future.add_done_callback(functools.partial(self._part_done, index))

    def _part_done(self, index: int, part: asyncio.Future) -> None:
        self.pending.discard(part)
        future = self.future
        if future.done():
            return
        try:
            if part.cancelled():
                raise ModelNotReady(f"model {self.batcher.name} dropped part of the request")
            error = part.exception()
            if error is not None:
                raise error
            self.outputs[index] = part.result()
            self.finished += 1
            if self.sent < self.count:
                self._queue_next()
            elif self.finished == self.count:
                future.set_result(self._join())
        except Exception as exc:  # the request fails as a whole, with the part's reason
            if not future.done():
                future.set_exception(exc)

    def _join(self) -> Tensors:
        """Every output with the parts' rows in order (one copy of the outputs)."""
        size, outputs = self.batcher.max_batch_size, self.outputs
        self.outputs = []
        joined = {}
        for name in outputs[0]:
            arrays = []
            for index, part in enumerate(outputs):
                array = part.get(name) if index else part[name]
                rows = min(size, self.rows - index * size)
                if array is None or np.ndim(array) == 0 or array.shape[0] != rows:
                    raise InternalError(f"model {self.batcher.name} returned {name} with "
                                        f"shape {np.shape(array)} for a batch of {rows} rows")
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
