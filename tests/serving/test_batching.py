"""Dynamic batching: rows, preferred sizes, delays, bounds, deadlines and cancellation.

The model is a plain function run by the batcher's worker thread; a ``threading.Event``
holds the first batch in the model so that later requests queue up deterministically.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from mip.errors import DeadlineExceeded, InternalError, InvalidInput, ModelNotReady, QueueFull
from mip.serving.batching import Batcher, Request
from mip.serving.config import DynamicBatching

from ._models import run


class GatedModel:
    """Doubles ``x``; the first call waits for ``release()``. Records each batch's rows."""

    def __init__(self, hold_first: bool = True):
        self.batches: list[np.ndarray] = []
        self.started = threading.Event()
        self.gate = threading.Event()
        if not hold_first:
            self.gate.set()

    def __call__(self, inputs):
        self.batches.append(inputs["x"].copy())
        self.started.set()
        assert self.gate.wait(10)
        return {"y": inputs["x"] * 2}

    def release(self):
        self.gate.set()

    @property
    def rows(self) -> list[int]:
        return [len(b) for b in self.batches]


def rows_of(n: int, value: float, width: int = 3) -> np.ndarray:
    return np.full((n, width), value, dtype=np.float32)


async def start_held(model: GatedModel, batcher: Batcher) -> asyncio.Future:
    """Submit one request that occupies the model until ``model.release()``."""
    batcher.start()
    first = batcher.enqueue({"x": rows_of(1, -1)}, 1)
    assert await asyncio.to_thread(model.started.wait, 5)
    return first


def run_held(model: GatedModel, batcher: Batcher, body):
    """Run ``await body()`` while one request (:func:`start_held`) occupies the model (the
    body may release it); then release the model, wait for that request and stop the
    batcher. Returns what the body returned."""
    async def scenario():
        first = await start_held(model, batcher)
        result = await body()
        model.release()
        await first
        await batcher.stop()
        return result

    return run(scenario())


def make(model, max_batch_size=64, **policy) -> Batcher:
    batching = DynamicBatching(**policy)
    records = []
    batcher = Batcher(model, max_batch_size=max_batch_size, dynamic_batching=batching,
                      on_batch=records.append, name="test")
    batcher.records = records
    return batcher


def test_concurrent_requests_batch_and_split_in_order():
    model = GatedModel()
    batcher = make(model)

    async def held():
        sizes = [1, 2, 1, 3, 1]
        tasks = [batcher.enqueue({"x": rows_of(n, i)}, n)
                 for i, n in enumerate(sizes)]
        await asyncio.sleep(0.01)
        assert batcher.queue_depth == 5
        model.release()
        results = await asyncio.gather(*tasks)
        return sizes, results

    sizes, results = run_held(model, batcher, held)
    assert model.rows == [1, 8]
    for i, (n, result) in enumerate(zip(sizes, results)):
        assert result["y"].shape == (n, 3)
        np.testing.assert_array_equal(result["y"], rows_of(n, 2 * i))
    # Each request's outputs are views of the one batch output, not copies.
    assert results[0]["y"].base is not None and results[0]["y"].base is results[1]["y"].base
    assert [r.rows for r in batcher.records] == [1, 8]
    assert [r.requests for r in batcher.records] == [1, 5]


def test_max_batch_size_counts_rows_not_requests():
    model = GatedModel()
    batcher = make(model, max_batch_size=4)

    async def scenario():
        first = await start_held(model, batcher)
        tasks = [batcher.enqueue({"x": rows_of(n, n)}, n)
                 for n in (2, 2, 1, 3)]
        await asyncio.sleep(0.01)
        model.release()
        await asyncio.gather(first, *tasks)
        with pytest.raises(InvalidInput, match="at most 4 rows"):
            await batcher.enqueue({"x": rows_of(5, 0)}, 5)
        await batcher.stop()

    run(scenario())
    assert model.rows == [1, 4, 4]


def test_max_batch_bytes_stops_a_batch_but_never_splits_a_request():
    model = GatedModel()
    row = rows_of(1, 0).nbytes  # 12 octets a row
    batcher = make(model, max_batch_bytes=4 * row)

    async def scenario():
        first = await start_held(model, batcher)
        # 2+2 rows reach the limit; 5 rows exceed it alone and run alone; then 1+1.
        tasks = [batcher.enqueue({"x": rows_of(n, n)}, n)
                 for n in (2, 2, 5, 1, 1)]
        await asyncio.sleep(0.01)
        model.release()
        results = await asyncio.gather(first, *tasks)
        await batcher.stop()
        return results

    results = run(scenario())
    assert model.rows == [1, 4, 5, 2]
    assert [r["y"].shape[0] for r in results] == [1, 2, 2, 5, 1, 1]


def test_max_batch_bytes_zero_is_no_limit():
    model = GatedModel()
    batcher = make(model, max_batch_bytes=0)

    async def scenario():
        first = await start_held(model, batcher)
        tasks = [batcher.enqueue({"x": rows_of(8, n)}, 8) for n in range(4)]
        await asyncio.sleep(0.01)
        model.release()
        await asyncio.gather(first, *tasks)
        await batcher.stop()

    run(scenario())
    assert model.rows == [1, 32]


def test_preferred_batch_size_is_sent_at_once():
    model = GatedModel(hold_first=False)
    batcher = make(model, max_batch_size=8, preferred_batch_sizes=(2,),
                   max_queue_delay_us=10_000_000)

    async def scenario():
        batcher.start()
        began = time.monotonic()
        await asyncio.gather(*(batcher.enqueue({"x": rows_of(1, i)}, 1) for i in range(2)))
        elapsed = time.monotonic() - began
        await batcher.stop()
        return elapsed

    # Two rows reach the preferred size: no waiting for the 10 s delay.
    assert run(scenario()) < 5
    assert model.rows == [2]


def test_largest_preferred_size_then_the_rest_after_the_delay():
    model = GatedModel()
    batcher = make(model, max_batch_size=8, preferred_batch_sizes=(2, 4),
                   max_queue_delay_us=50_000)

    async def held():
        tasks = [batcher.enqueue({"x": rows_of(1, i)}, 1)
                 for i in range(5)]
        await asyncio.sleep(0.01)
        model.release()
        results = await asyncio.gather(*tasks)
        return results

    results = run_held(model, batcher, held)
    assert model.rows == [1, 4, 1]
    assert [float(r["y"][0, 0]) for r in results] == [0, 2, 4, 6, 8]


def test_delay_counts_from_the_oldest_request():
    model = GatedModel(hold_first=False)
    batcher = make(model, max_batch_size=8, max_queue_delay_us=300_000)

    async def scenario():
        batcher.start()
        began = time.monotonic()
        oldest = batcher.enqueue({"x": rows_of(1, 0)}, 1)
        await asyncio.sleep(0.2)
        newest = batcher.enqueue({"x": rows_of(2, 1)}, 2)
        await asyncio.gather(oldest, newest)
        elapsed = time.monotonic() - began
        await batcher.stop()
        return elapsed

    elapsed = run(scenario())
    # Sent when the oldest request's 0.3 s ran out (0.5 s if timed from the newest).
    assert 0.29 <= elapsed < 0.45
    assert model.rows == [3]


def test_full_batch_is_sent_without_waiting_for_the_delay():
    model = GatedModel(hold_first=False)
    batcher = make(model, max_batch_size=4, max_queue_delay_us=10_000_000)

    async def scenario():
        batcher.start()
        await asyncio.gather(*(batcher.enqueue({"x": rows_of(2, i)}, 2) for i in range(2)))
        await batcher.stop()

    run(scenario(), timeout=5)
    assert model.rows == [4]


def test_queue_full_is_rejected():
    model = GatedModel()
    batcher = make(model, max_queue_size=2)

    async def scenario():
        first = await start_held(model, batcher)
        queued = [batcher.enqueue({"x": rows_of(1, i)}, 1)
                  for i in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull) as info:
            await batcher.enqueue({"x": rows_of(1, 9)}, 1)
        assert info.value.http_status == 503
        model.release()
        await asyncio.gather(first, *queued)
        await batcher.stop()

    run(scenario())
    assert model.rows == [1, 2]


def test_sources_share_the_queue_round_robin_and_each_has_a_cap():
    model = GatedModel()
    batcher = make(model, max_batch_size=4, max_queue_size=16)  # a source may queue 4

    async def scenario():
        first = await start_held(model, batcher)
        hog = [batcher.enqueue({"x": rows_of(1, 100 + i)}, 1,
                                                     source="10.0.0.1") for i in range(4)]
        with pytest.raises(QueueFull, match="max_queued_per_source 4"):
            batcher.enqueue({"x": rows_of(1, 0)}, 1, source="10.0.0.1")
        others = [batcher.enqueue({"x": rows_of(1, v)}, 1, source=peer)
                  for v, peer in ((1, "10.0.0.2"), (2, "10.0.0.2"), (3, "10.0.0.3"))]
        unnamed = [batcher.enqueue({"x": rows_of(1, 50 + i)}, 1)
                   for i in range(5)]  # no source: no cap of its own
        assert batcher.queue_depth == 12
        # a cancelled request leaves its sub-queue
        others[1].cancel()
        await asyncio.sleep(0)
        assert batcher.queue_depth == 11
        model.release()
        results = await asyncio.gather(first, *hog, others[0], others[2], *unnamed)
        await batcher.stop()
        return results

    results = run(scenario())
    assert batcher.queue_depth == 0
    # the first of each source, then the second of each, ...: the queued sources are
    # 10.0.0.1, 10.0.0.2, 10.0.0.3 and the unnamed one, in the order they came
    assert [list(b[:, 0]) for b in model.batches[1:]] == [
        [100, 1, 3, 50], [101, 51, 102, 52], [103, 53, 54]]
    assert [float(r["y"][0, 0]) for r in results[1:5]] == [200, 202, 204, 206]


def test_deadline_drops_the_request_from_the_queue():
    model = GatedModel()
    batcher = make(model)

    async def held():
        with pytest.raises(DeadlineExceeded):
            await batcher.enqueue({"x": rows_of(1, 42)}, 1, deadline=time.monotonic() + 0.05)
        assert batcher.queue_depth == 0
        with pytest.raises(DeadlineExceeded):
            await batcher.enqueue({"x": rows_of(1, 43)}, 1, deadline=time.monotonic() - 1)

    run_held(model, batcher, held)
    assert model.rows == [1]


def test_cancelled_request_is_dropped_from_the_queue():
    model = GatedModel()
    batcher = make(model)

    async def held():
        gone = batcher.enqueue({"x": rows_of(1, 42)}, 1)
        kept = batcher.enqueue({"x": rows_of(1, 7)}, 1)
        await asyncio.sleep(0.01)
        assert batcher.queue_depth == 2
        gone.cancel()
        await asyncio.sleep(0)
        assert batcher.queue_depth == 1
        model.release()
        result = await kept
        return result

    result = run_held(model, batcher, held)
    assert model.rows == [1, 1]
    assert float(model.batches[1][0, 0]) == 7  # the cancelled request never reached the model
    assert float(result["y"][0, 0]) == 14


def test_event_loop_runs_while_the_model_computes():
    model = GatedModel()
    batcher = make(model)

    async def scenario():
        first = await start_held(model, batcher)
        ticks = 0
        for _ in range(5):  # the loop is free while the model thread holds the batch
            await asyncio.sleep(0.001)
            ticks += 1
        model.release()
        await first
        await batcher.stop()
        return ticks

    assert run(scenario()) == 5


def test_requests_with_different_trailing_shapes_batch_separately():
    model = GatedModel()
    batcher = make(model)

    async def held():
        a = batcher.enqueue({"x": rows_of(1, 1, width=3)}, 1)
        b = batcher.enqueue({"x": rows_of(1, 2, width=5)}, 1)
        c = batcher.enqueue({"x": rows_of(1, 3, width=3)}, 1)
        await asyncio.sleep(0.01)
        model.release()
        results = await asyncio.gather(a, b, c)
        return results

    results = run_held(model, batcher, held)
    assert model.rows == [1, 1, 1, 1]  # FIFO: a, then b, then c
    assert [r["y"].shape[1] for r in results] == [3, 5, 3]


def test_without_dynamic_batching_each_request_runs_alone():
    model = GatedModel()
    batcher = Batcher(model, max_batch_size=64, dynamic_batching=None, name="plain")

    async def scenario():
        first = await start_held(model, batcher)
        tasks = [batcher.enqueue({"x": rows_of(2, i)}, 2)
                 for i in range(3)]
        await asyncio.sleep(0.01)
        model.release()
        await asyncio.gather(first, *tasks)
        await batcher.stop()

    run(scenario())
    assert model.rows == [1, 2, 2, 2]


def test_model_errors_reach_every_request_of_the_batch():
    def broken(inputs):
        raise RuntimeError("boom")

    def wrong_rows(inputs):
        return {"y": inputs["x"][:1]}

    async def scenario(model):
        batcher = make(model, max_queue_delay_us=50_000)
        batcher.start()
        results = await asyncio.gather(
            *(batcher.enqueue({"x": rows_of(1, i)}, 1) for i in range(2)),
            return_exceptions=True)
        await batcher.stop()
        return results

    for model, message in ((broken, "boom"), (wrong_rows, "shape")):
        results = run(scenario(model))
        assert all(isinstance(r, InternalError) and message in str(r) for r in results)


def test_stop_drains_then_refuses():
    model = GatedModel()
    batcher = make(model)

    async def scenario():
        first = await start_held(model, batcher)
        queued = batcher.enqueue({"x": rows_of(1, 5)}, 1)
        await asyncio.sleep(0.01)
        stopping = asyncio.ensure_future(batcher.stop())
        await asyncio.sleep(0.01)
        with pytest.raises(ModelNotReady):
            await batcher.enqueue({"x": rows_of(1, 6)}, 1)
        model.release()
        await stopping
        return await first, await queued

    _, queued = run(scenario())
    assert float(queued["y"][0, 0]) == 10


class ThreadRecorder:
    """Doubles ``x`` after ``seconds`` of sleep; records the thread of every call."""

    def __init__(self, seconds: float = 0.0):
        self.seconds = seconds
        self.threads: list[str] = []

    def __call__(self, inputs):
        self.threads.append(threading.current_thread().name)
        if self.seconds:
            time.sleep(self.seconds)
        return {"y": inputs["x"] * 2}


def one_at_a_time(batcher: Batcher, n: int) -> str:
    """Submit ``n`` one-row requests, each after the previous one's answer (one batch
    each), checking every answer; returns the event loop thread's name."""
    async def scenario():
        batcher.start()
        for i in range(n):
            out = await batcher.enqueue({"x": rows_of(1, i)}, 1)
            np.testing.assert_array_equal(out["y"], rows_of(1, 2 * i))
        await batcher.stop()
        return threading.current_thread().name

    return run(scenario())


def test_a_fast_model_runs_on_the_event_loop_after_its_first_batch():
    model = ThreadRecorder()
    loop_thread = one_at_a_time(make(model, max_queue_delay_us=0), 5)
    assert model.threads[0].startswith("mip-test")  # measured in the worker thread first
    assert model.threads[1:] == [loop_thread] * 4


def test_a_slow_model_stays_in_its_worker_thread():
    model = ThreadRecorder(seconds=0.002)  # 2 ms: far over the inline limit
    one_at_a_time(make(model, max_queue_delay_us=0), 4)
    assert all(name.startswith("mip-test") for name in model.threads)
    assert len(model.threads) == 4


def test_inline_below_zero_keeps_every_batch_in_a_thread():
    model = ThreadRecorder()
    one_at_a_time(Batcher(model, max_batch_size=8, dynamic_batching=DynamicBatching(),
                          name="test", inline_below=0), 4)
    assert all(name.startswith("mip-test") for name in model.threads)
    assert len(model.threads) == 4


def test_model_failures_are_logged_at_warning_rate_limited(caplog):
    """A model that raises is logged at WARNING with its name and the error, once per
    interval however many requests fail; the next line counts those left out."""
    import logging

    from mip.serving import batching

    def broken(inputs):
        raise ValueError("weights are missing")

    async def scenario():
        batcher = Batcher(broken, max_batch_size=4, name="broken/1")
        batcher.start()
        try:
            for _ in range(20):
                with pytest.raises(InternalError, match="weights are missing"):
                    await batcher.enqueue({"x": np.ones((1, 2), np.float32)}, 1)
            batcher._warned_at -= batching.FAILURE_LOG_INTERVAL  # the interval has passed
            with pytest.raises(InternalError):
                await batcher.enqueue({"x": np.ones((1, 2), np.float32)}, 1)
        finally:
            await batcher.stop(1.0)

    with caplog.at_level(logging.WARNING, logger="mip.serving.batching"):
        asyncio.run(scenario())
    lines = [r.getMessage() for r in caplog.records if r.name == "mip.serving.batching"]
    assert len(lines) == 2, lines
    assert "model broken/1 failed" in lines[0] and "ValueError: weights are missing" in lines[0]
    assert "(19 more failed batches not logged)" in lines[1]


# -- requests larger than max_batch_size (MIP's rule) ------------------------------------


def test_a_request_over_max_batch_size_is_refused_with_or_without_dynamic_batching():
    async def scenario(batching):
        batcher = Batcher(GatedModel(hold_first=False), max_batch_size=4,
                          dynamic_batching=batching, name="plain")
        batcher.start()
        with pytest.raises(InvalidInput, match="5 rows; model plain takes at most 4"):
            batcher.enqueue({"x": rows_of(5, 0)}, 5)
        await batcher.stop()

    run(scenario(None))
    run(scenario(DynamicBatching()))


def test_a_split_request_runs_as_parts_and_is_answered_in_row_order():
    model = GatedModel()
    batcher = make(model, max_batch_size=4)

    async def held():
        x = np.arange(30, dtype=np.float32).reshape(10, 3)
        whole = batcher.enqueue_split({"x": x}, 10)
        other = batcher.enqueue({"x": rows_of(1, 100)}, 1)
        await asyncio.sleep(0.01)
        # instance_count + 1 parts queued at a time, not all of them
        assert batcher.queue_depth == 3
        model.release()
        y = (await whole)["y"]
        np.testing.assert_array_equal(y, x * 2)
        assert (await other)["y"][0, 0] == 200
        return x

    x = run_held(model, batcher, held)
    # parts of at most 4 rows, in order; the other request joined one of the batches
    assert max(model.rows) <= 4 and sum(model.rows) == 1 + 10 + 1
    rows = np.concatenate(model.batches[1:])
    np.testing.assert_array_equal(rows[rows[:, 0] != 100], x)
    assert len(model.batches) == 1 + 3  # the held one, then 4 + 4 + (2 and the other)


def test_a_split_request_fails_whole_when_a_part_fails():
    calls = []

    def fails_on_the_second_part(inputs):
        calls.append(len(inputs["x"]))
        if len(calls) == 2:
            raise RuntimeError("part two broke")
        return {"y": inputs["x"]}

    async def scenario():
        batcher = Batcher(fails_on_the_second_part, max_batch_size=2, dynamic_batching=None,
                          name="test")
        batcher.start()
        with pytest.raises(InternalError, match="part two broke"):
            await batcher.enqueue_split({"x": rows_of(7, 1)}, 7)
        await asyncio.sleep(0.01)
        assert batcher.queue_depth == 0  # the parts not run left the queue
        await batcher.stop()

    run(scenario())
    assert len(calls) <= 3  # the failure stopped the request: no part after it was queued


def test_a_split_request_checks_every_part_of_the_outputs():
    def drops_a_row(inputs):
        return {"y": inputs["x"][1:]}

    async def scenario():
        batcher = Batcher(drops_a_row, max_batch_size=2, dynamic_batching=None, name="test")
        batcher.start()
        with pytest.raises(InternalError, match="for a batch of 2 rows"):
            await batcher.enqueue_split({"x": rows_of(3, 1)}, 3)
        await batcher.stop()

    run(scenario())


def test_a_cancelled_split_request_leaves_the_queue():
    model = GatedModel()
    batcher = make(model, max_batch_size=2)

    async def held():
        whole = batcher.enqueue_split({"x": rows_of(9, 5)}, 9)
        await asyncio.sleep(0.01)
        assert batcher.queue_depth == 2
        whole.cancel()
        for _ in range(3):  # the cancellation reaches the parts in callbacks
            await asyncio.sleep(0)
        assert batcher.queue_depth == 0

    run_held(model, batcher, held)
    assert model.rows == [1]


def test_a_split_request_refused_at_once_leaves_nothing_queued():
    model = GatedModel()
    batcher = make(model, max_batch_size=2, max_queue_size=1)

    async def scenario():
        first = await start_held(model, batcher)
        with pytest.raises(QueueFull):
            batcher.enqueue_split({"x": rows_of(6, 5)}, 6)  # its second part does not fit
        await asyncio.sleep(0)  # the first part, cancelled, leaves in its callback
        assert batcher.queue_depth == 0
        model.release()
        await first
        await batcher.stop()

    run(scenario())
    assert model.rows == [1]


def test_batch_records_carry_every_requests_wait():
    model = GatedModel()
    batcher = make(model)

    async def scenario():
        first = await start_held(model, batcher)
        tasks = [batcher.enqueue({"x": rows_of(1, i)}, 1)
                 for i in range(3)]
        await asyncio.sleep(0.05)
        model.release()
        await asyncio.gather(first, *tasks)
        await batcher.stop()

    run(scenario())
    held, batch = batcher.records
    assert (held.requests, batch.requests) == (1, 3)
    assert held.waited_seconds == held.queue_seconds
    # the oldest waited longest: the sum of three waits is within [oldest, 3 x oldest]
    assert 0 < batch.queue_seconds <= batch.waited_seconds <= 3 * batch.queue_seconds


def test_model_failure_warning_names_the_request_ids(caplog):
    """The warning names the ids the clients gave the requests of the failed batch."""
    import logging

    def broken(inputs):
        raise ValueError("weights are missing")

    async def scenario():
        batcher = Batcher(broken, max_batch_size=4, dynamic_batching=DynamicBatching(),
                          name="broken/1")
        batcher.start()
        try:
            futures = [batcher.enqueue({"x": np.ones((1, 2), np.float32)}, 1,
                                       request_id=request_id)
                       for request_id in ("req-1", None, "req\n3")]
            results = await asyncio.gather(*futures, return_exceptions=True)
            assert all(isinstance(r, InternalError) for r in results)
        finally:
            await batcher.stop(1.0)

    with caplog.at_level(logging.WARNING, logger="mip.serving.batching"):
        asyncio.run(scenario())
    (line,) = [r.getMessage() for r in caplog.records if r.name == "mip.serving.batching"]
    assert ("model broken/1 failed on a batch of 3 request(s) [request id(s) 'req-1', "
            "'req\\n3']: ValueError: weights are missing") in line, line


# -- outcomes, request subclasses, runner threads -------------------------------------


def test_each_request_is_counted_once_as_a_success_or_a_failure():
    model = GatedModel()
    batcher = make(model, max_batch_size=2)

    async def held():
        answered = batcher.enqueue({"x": rows_of(1, 1)}, 1)
        cancelled = batcher.enqueue({"x": rows_of(1, 2)}, 1)
        expired = batcher.enqueue({"x": rows_of(1, 3)}, 1, deadline=time.monotonic() + 0.01)
        whole = batcher.enqueue_split({"x": rows_of(5, 4)}, 5)  # three parts, one request
        cancelled.cancel()
        cancelled.cancel()  # (a second cancel changes nothing)
        with pytest.raises(DeadlineExceeded):
            await expired
        model.release()
        await answered
        await whole

    run_held(model, batcher, held)
    assert (batcher.successes, batcher.failures) == (3, 2)  # with the held request


class Recorded(Request):
    """A request whose outcome is recorded by the batcher's calls, not its callbacks."""

    __slots__ = ("calls",)

    def answer(self, outputs):
        self.calls = [("answer", float(outputs["y"][0, 0]))]
        super().answer(outputs)

    def refuse(self, error):
        self.calls = [("refuse", type(error).__name__)]
        super().refuse(error)


def test_a_request_subclass_is_answered_and_refused_by_the_batcher():
    model = GatedModel()
    batcher = make(model)

    async def held():
        good = batcher.enqueue({"x": rows_of(1, 3)}, 1, request_type=Recorded)
        late = batcher.enqueue({"x": rows_of(1, 4)}, 1, deadline=time.monotonic() + 0.01,
                               request_type=Recorded)
        with pytest.raises(DeadlineExceeded):
            await late
        model.release()
        await good
        return good, late

    good, late = run_held(model, batcher, held)
    assert isinstance(good, Recorded) and good.calls == [("answer", 6.0)]
    assert late.calls == [("refuse", "DeadlineExceeded")]


def _runners(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"mip-{name}_")]


def test_runner_threads_end_when_the_batcher_stops():
    batcher = Batcher(ThreadRecorder(), max_batch_size=4, instance_count=2, name="ending",
                      inline_below=0)

    async def scenario():
        batcher.start()
        outputs = await asyncio.gather(*(batcher.enqueue({"x": rows_of(1, i)}, 1)
                                         for i in range(6)))
        assert [float(o["y"][0, 0]) for o in outputs] == [0, 2, 4, 6, 8, 10]
        runners = _runners("ending")
        await batcher.stop()
        return runners

    runners = run(scenario())
    assert 1 <= len(runners) <= 2
    for thread in runners:
        thread.join(10)
        assert not thread.is_alive()


def test_runner_threads_end_when_a_batcher_is_dropped_unstopped():
    import gc

    async def scenario():
        batcher = Batcher(ThreadRecorder(), max_batch_size=4, name="dropped", inline_below=0)
        batcher.start()
        await batcher.enqueue({"x": rows_of(1, 1)}, 1)
        return _runners("dropped")

    runners = run(scenario())
    gc.collect()
    assert len(runners) == 1
    runners[0].join(10)
    assert not runners[0].is_alive()


class _Queued:
    """What ``join`` reads of a queued request: its inputs."""

    def __init__(self, **inputs):
        self.inputs = inputs


def test_join_copies_contiguous_rows_and_leaves_the_rest_to_concatenate():
    from mip.protocol._batch import join

    frame = np.arange(24, dtype=np.float32).reshape(6, 4)
    requests = [_Queued(x=frame[0:1]), _Queued(x=frame[1:3]), _Queued(x=frame[5:6])]
    joined = join(requests, "x", 4)
    np.testing.assert_array_equal(joined, frame[[0, 1, 2, 5]])
    assert joined.flags.owndata and joined.dtype == np.float32
    # Rows that are not C-contiguous, datatypes or trailing shapes that differ, objects,
    # a row count that is not the requests': left to np.concatenate (or refused by it).
    strided = frame[:, ::2]
    objects = np.array([["a"]], dtype=object)
    for inputs, rows in [([frame[0:1], strided[1:2]], 2), ([frame[0:1], frame[1:2].astype(int)], 2),
                         ([frame[0:1], frame[1:2, :2]], 2), ([objects, objects], 2),
                         ([frame[0:1], frame[1:2]], 3), ([frame[0:1], frame[1:2]], 1),
                         ([np.float32(1.0), frame[1:2]], 2), ([frame[0], frame[1]], 2)]:
        assert join([_Queued(x=a) for a in inputs], "x", rows) is None
    assert join([], "x", 0) is None


def test_a_batch_of_one_row_requests_answers_each_with_its_row():
    batcher = Batcher(lambda inputs: {"y": inputs["x"] + 1}, max_batch_size=8,
                      dynamic_batching=DynamicBatching(), name="test")

    async def scenario():
        batcher.start()
        futures = [batcher.enqueue({"x": rows_of(1, i)}, 1) for i in range(5)]
        results = await asyncio.gather(*futures)
        await batcher.stop()
        return results

    results = run(scenario())
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result["y"], rows_of(1, i + 1))
    assert results[0]["y"].base is results[4]["y"].base  # views of the batch's output
