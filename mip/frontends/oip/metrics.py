"""Prometheus metrics of the inference frontends, named after Triton's ``nv_inference_*``.

Served at ``GET /metrics`` of the HTTP listener, in the Prometheus text format.

Per request (labels ``model``, ``version``, ``protocol``: ``mip``, ``grpc``, ``http`` or
``jobs``):

* ``nv_inference_request_success`` / ``nv_inference_request_failure`` (counters, requests)
* ``nv_inference_count`` (counter, inferences: rows of the successful requests)
* ``nv_inference_request_duration_us`` (counter, microseconds summed over requests, from
  the request's arrival at the frontend to its answer)
* ``nv_inference_request_histogram_us`` (histogram of the same, microseconds)

Per executed batch (labels ``model``, ``version``; batches mix protocols):

* ``nv_inference_exec_count`` (counter, model executions)
* ``nv_inference_queue_duration_us`` (counter, microseconds: the wait of every request of
  the batches that succeeded, from its arrival in the model's queue to its batch's start, as
  Triton counts it; a MIP request run as several batches counts each part)
* ``nv_inference_compute_infer_duration_us`` (counter, microseconds of model time)
* ``nv_inference_queue_histogram_us`` / ``nv_inference_compute_infer_histogram_us``
  (histograms of the same per batch, microseconds)
* ``mip_inference_batch_size`` (histogram, rows per batch)

Gauges, read when scraped: ``nv_inference_pending_request_count`` (requests waiting in the
batch queue, per model and version) and ``mip_models_loaded`` (model versions ready); with
a ``/v1`` job queue, ``mip_job_queue_depth`` (unfinished jobs, label ``status``: ``queued``
or ``processing``; see :class:`JobQueueCollector`).

The process (where ``/proc`` is, as on Linux): ``process_cpu_seconds_total``,
``process_resident_memory_bytes``, ``process_virtual_memory_bytes``,
``process_open_fds``, ``process_max_fds`` and ``process_start_time_seconds``, from
``prometheus_client``'s ``ProcessCollector``.

docs/metrics.md lists every metric with its labels.

The same series answer Triton's statistics extension (:meth:`Metrics.statistics`: the
``ModelStatistics`` RPC and ``GET /v2/models/{m}/stats``), so both show the same numbers.

Counters keep Triton's names exactly (no ``_total`` suffix), so Triton dashboards work
with little change; histograms and gauges are rendered by ``prometheus_client``.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import Iterable

import numpy as np
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector,
                               generate_latest)
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

__all__ = ["CONTENT_TYPE", "PROTOCOLS", "JobQueueCollector", "Metrics"]

log = logging.getLogger("mip.frontends.oip.metrics")

#: seconds a scrape waits for a sampled collector (such as the job queue's) to answer.
SAMPLE_TIMEOUT = 2.0

#: the media type of :meth:`Metrics.render`.
CONTENT_TYPE = CONTENT_TYPE_LATEST
#: the ``protocol`` label of the per-request series: every frontend of the data plane
PROTOCOLS = ("mip", "grpc", "http", "jobs")

#: histogram bounds of durations, in microseconds (floats, as the durations observed are:
#: bisect compares float to float faster than float to int).
DURATION_BUCKETS_US = (50.0, 100.0, 250.0, 500.0, 1e3, 2.5e3, 5e3, 1e4, 2.5e4, 5e4, 1e5, 2.5e5,
                       5e5, 1e6, 2.5e6, 5e6, 1e7)
#: request durations a series holds before it folds them into its sums and histogram
_FOLD_AT = 1024
#: histogram bounds of batch sizes, in rows.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

_REQUEST_COUNTERS = (
    ("nv_inference_request_success", "Number of successful inference requests, all batch sizes"),
    ("nv_inference_request_failure", "Number of failed inference requests, all batch sizes"),
    ("nv_inference_count", "Number of inferences performed (rows of successful requests)"),
    ("nv_inference_request_duration_us",
     "Cumulative inference request duration in microseconds"),
)
_BATCH_COUNTERS = (
    ("nv_inference_exec_count", "Number of model executions performed (batches)"),
    ("nv_inference_queue_duration_us",
     "Cumulative queue duration in microseconds (every request, arrival to batch start)"),
    ("nv_inference_compute_infer_duration_us",
     "Cumulative compute inference duration in microseconds"),
)


class _Histogram:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def observe_many(self, values: np.ndarray) -> None:
        """:meth:`observe` of each value in turn, at once (the same counts, and the same
        total: the values added one after the other, as ``np.cumsum`` does)."""
        found = np.bincount(np.searchsorted(self.bounds, values, "left"),
                            minlength=len(self.counts))
        counts = self.counts
        for index in np.flatnonzero(found).tolist():
            counts[index] += int(found[index])
        self.total = _added(self.total, values)

    def buckets(self) -> list[tuple[str, int]]:
        result, running = [], 0
        for bound, count in zip(self.bounds, self.counts):
            running += count
            result.append((floatToGoString(bound), running))
        result.append(("+Inf", running + self.counts[-1]))
        return result


def _added(total: float, values: np.ndarray) -> float:
    """``total`` plus each of ``values`` in turn (no pairwise summation: the float sum of
    adding them one at a time)."""
    return float(np.cumsum(np.concatenate(([total], values)))[-1])


class _RequestSeries:
    """The counters of one (model, version, protocol). The durations of the latest
    requests wait in ``seconds`` (at most :data:`_FOLD_AT`) and are folded into
    ``duration_us`` and ``histogram`` together (:meth:`fold`), as if one at a time:
    read them after :meth:`fold`."""

    __slots__ = ("count", "duration_us", "fail_us", "failure", "histogram", "last", "seconds",
                 "success")

    def __init__(self):
        self.success = self.failure = self.count = 0
        self.duration_us = self.fail_us = 0.0
        self.last = 0.0  # time.time() of the latest request's answer
        self.histogram = _Histogram(DURATION_BUCKETS_US)
        self.seconds: list[float] = []  # durations not yet folded, in order

    def fold(self) -> None:
        seconds = self.seconds
        if seconds:
            self.seconds = []
            micros = np.array(seconds) * 1e6  # (each as ``seconds * 1e6`` gives it)
            self.duration_us = _added(self.duration_us, micros)
            self.histogram.observe_many(micros)


class _BatchSeries:
    __slots__ = (
        "batch_hist",
        "compute_hist",
        "compute_us",
        "executions",
        "queue_hist",
        "queued",
        "queue_us",
        "sizes",
    )

    def __init__(self):
        self.executions = 0
        self.queued = 0  # requests of the batches that succeeded (Triton's queue count)
        self.sizes: dict[int, list] = {}  # rows -> [batches, compute microseconds]
        self.queue_us = self.compute_us = 0.0
        self.queue_hist = _Histogram(DURATION_BUCKETS_US)
        self.compute_hist = _Histogram(DURATION_BUCKETS_US)
        self.batch_hist = _Histogram(BATCH_BUCKETS)


def _duration(count: int, micros: float) -> dict:
    return {"count": count, "ns": int(round(micros * 1000))}


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _number(value) -> str:
    return str(value) if isinstance(value, int) else floatToGoString(value)


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    return ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)


class Metrics:
    """The metrics of one engine, shared by its gRPC and HTTP frontends.

    Args:
        engine: the :class:`~mip.serving.engine.Engine`; its batch hook feeds the
            per-batch series, its stats and index the gauges.

    Updates are plain integer and float additions on the event loop (no locks): the
    frontends call :meth:`observe_request` once per request.
    """

    def __init__(self, engine):
        self.engine = engine
        self._requests: dict[tuple[str, str, str], _RequestSeries] = {}
        self._batches: dict[tuple[str, str], _BatchSeries] = {}
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self)
        ProcessCollector(registry=self._registry)  # process_cpu_seconds_total, memory, fds
        self._sampled: list = []
        engine.add_batch_hook(self._on_batch)

    def add_collector(self, collector) -> None:
        """Render ``collector``'s metric families (its ``collect()``) with these; one that
        also has a coroutine ``sample()`` has it awaited by :meth:`sample` before each
        scrape (for values read from elsewhere, such as a job queue's depth)."""
        self._registry.register(collector)
        if hasattr(collector, "sample"):
            self._sampled.append(collector)

    def remove_collector(self, collector) -> None:
        """Stop rendering a collector given to :meth:`add_collector`."""
        self._registry.unregister(collector)
        if collector in self._sampled:
            self._sampled.remove(collector)

    async def sample(self, timeout: float = SAMPLE_TIMEOUT) -> None:
        """Let every sampled collector read its values (each within ``timeout`` seconds;
        one that fails or is late shows no value in this scrape)."""
        for collector in list(self._sampled):
            try:
                await asyncio.wait_for(collector.sample(), timeout)
            except Exception as exc:
                log.debug("metrics: %r could not be sampled: %s", collector, exc)

    def observe_request(self, model: str, version: str, protocol: str, ok: bool,
                        seconds: float, rows: int = 1) -> None:
        """Count one request.

        Args:
            model / version: what served it (``version`` may be ``""`` when unknown).
            protocol: ``"mip"``, ``"grpc"``, ``"http"`` or ``"jobs"``.
            ok: whether it succeeded.
            seconds: from its arrival to its answer, in seconds.
            rows: inferences it carried (its batch dimension; 1 for unbatched models).
        """
        try:
            series = self._requests[(model, version, protocol)]
        except KeyError:
            series = self._requests[(model, version, protocol)] = _RequestSeries()
        if ok:
            series.success += 1
            series.count += rows
        else:
            series.failure += 1
            series.fail_us += seconds * 1e6
        series.last = time.time()
        # The duration's sum and histogram bucket: many requests at once.
        pending = series.seconds
        pending.append(seconds)
        if len(pending) >= _FOLD_AT:
            series.fold()

    def _folded(self) -> dict[tuple[str, str, str], _RequestSeries]:
        """The request series, every duration folded in (for reading them)."""
        for series in self._requests.values():
            series.fold()
        return self._requests

    def _on_batch(self, model: str, version: str, record) -> None:
        key = (model, version)
        series = self._batches.get(key)
        if series is None:
            series = self._batches[key] = _BatchSeries()
        compute_us = record.compute_seconds * 1e6
        series.executions += 1
        if not record.failed:  # as Triton: a request's queue time counts when it succeeds
            series.queued += record.requests
            series.queue_us += record.waited_seconds * 1e6
        series.compute_us += compute_us
        series.queue_hist.observe(record.queue_seconds * 1e6)
        series.compute_hist.observe(compute_us)
        series.batch_hist.observe(record.rows)
        size = series.sizes.get(record.rows)
        if size is None:
            size = series.sizes[record.rows] = [0, 0.0]
        size[0] += 1
        size[1] += compute_us

    # -- Triton's statistics extension --------------------------------------------------

    def statistics(self, model: str | None = None, version: str | None = None) -> list[dict]:
        """Triton's ``model_stats`` entries (JSON form) of every served version, or of
        ``model`` (and ``version``), from the series ``/metrics`` shows.

        Per version: ``inference_count`` (rows of successful requests, all protocols),
        ``execution_count`` (batches), ``last_inference`` (milliseconds since the epoch),
        ``inference_stats`` ``success``/``fail`` (requests, and their durations from
        arrival to answer), ``queue`` (per request of the batches that succeeded, as Triton
        counts it: the wait from its arrival in the model's queue to its batch's start),
        ``compute_infer`` (per batch: model time), ``compute_input``/``compute_output``
        (counted per batch; their time is inside ``compute_infer``), and ``batch_stats``
        per batch size.
        Durations in nanoseconds.
        """
        entries = []
        requests = self._folded()
        for name, ver in sorted(self.engine.stats()):  # the versions served now, as Triton
            if (model and name != model) or (version and ver != version):
                continue
            success = failure = count = 0
            success_us = fail_us = last = 0.0
            for protocol in PROTOCOLS:
                series = requests.get((name, ver, protocol))
                if series is not None:
                    success += series.success
                    failure += series.failure
                    count += series.count
                    success_us += series.duration_us - series.fail_us
                    fail_us += series.fail_us
                    last = max(last, series.last)
            batches = self._batches.get((name, ver)) or _BatchSeries()
            runs = batches.executions
            entries.append({
                "name": name, "version": ver, "last_inference": int(last * 1000),
                "inference_count": count, "execution_count": runs,
                "inference_stats": {
                    "success": _duration(success, success_us),
                    "fail": _duration(failure, fail_us),
                    "queue": _duration(batches.queued, batches.queue_us),
                    "compute_input": _duration(runs, 0.0),
                    "compute_infer": _duration(runs, batches.compute_us),
                    "compute_output": _duration(runs, 0.0),
                    "cache_hit": _duration(0, 0.0),
                    "cache_miss": _duration(0, 0.0),
                },
                "batch_stats": [
                    {"batch_size": rows, "compute_input": _duration(n, 0.0),
                     "compute_infer": _duration(n, micros), "compute_output": _duration(n, 0.0)}
                    for rows, (n, micros) in sorted(batches.sizes.items())],
                "memory_usage": [],
            })
        return entries

    # -- rendering ----------------------------------------------------------------------

    def _counters(self) -> str:
        lines = []
        request_values = (lambda s: s.success, lambda s: s.failure, lambda s: s.count,
                          lambda s: s.duration_us)
        for (name, doc), value in zip(_REQUEST_COUNTERS, request_values):
            lines.append(f"# HELP {name} {doc}\n# TYPE {name} counter\n")
            for (model, version, protocol), series in sorted(self._folded().items()):
                labels = _labels((("model", model), ("protocol", protocol),
                                  ("version", version)))
                lines.append(f"{name}{{{labels}}} {_number(value(series))}\n")
        batch_values = (lambda s: s.executions, lambda s: s.queue_us, lambda s: s.compute_us)
        for (name, doc), value in zip(_BATCH_COUNTERS, batch_values):
            lines.append(f"# HELP {name} {doc}\n# TYPE {name} counter\n")
            for (model, version), batches in sorted(self._batches.items()):
                labels = _labels((("model", model), ("version", version)))
                lines.append(f"{name}{{{labels}}} {_number(value(batches))}\n")
        return "".join(lines)

    def collect(self):
        """The histograms and gauges, for ``prometheus_client`` (counters are rendered
        by :meth:`render` with Triton's names)."""
        request_hist = HistogramMetricFamily(
            "nv_inference_request_histogram_us", "Inference request duration in microseconds",
            labels=("model", "version", "protocol"))
        for (model, version, protocol), series in sorted(self._folded().items()):
            request_hist.add_metric((model, version, protocol), series.histogram.buckets(),
                                    series.histogram.total)
        yield request_hist
        families = (
            ("nv_inference_queue_histogram_us",
             "Queue duration of each batch's oldest request in microseconds", "queue_hist"),
            ("nv_inference_compute_infer_histogram_us",
             "Compute inference duration of each batch in microseconds", "compute_hist"),
            ("mip_inference_batch_size", "Rows in each executed batch", "batch_hist"),
        )
        for name, doc, attribute in families:
            family = HistogramMetricFamily(name, doc, labels=("model", "version"))
            for (model, version), series in sorted(self._batches.items()):
                histogram = getattr(series, attribute)
                family.add_metric((model, version), histogram.buckets(), histogram.total)
            yield family
        pending = GaugeMetricFamily("nv_inference_pending_request_count",
                                    "Requests waiting in the batch queue",
                                    labels=("model", "version"))
        for (model, version), stats in sorted(self.engine.stats().items()):
            pending.add_metric((model, version), stats.queue_depth)
        yield pending
        loaded = GaugeMetricFamily("mip_models_loaded", "Model versions ready to serve")
        loaded.add_metric((), sum(1 for e in self.engine.index() if str(e.state) == "READY"))
        yield loaded

    def render(self) -> bytes:
        """Every metric in the Prometheus text format (media type :data:`CONTENT_TYPE`)."""
        return self._counters().encode() + generate_latest(self._registry)


class JobQueueCollector:
    """``mip_job_queue_depth`` of a ``/v1`` job queue (:class:`~mip.jobs.queue.JobQueue`):
    unfinished jobs by ``status`` (``queued``, ``processing``), read with one
    query when ``/metrics`` is scraped, never per request. A queue shared by several
    servers (Redis, or one SQLite file named on purpose) shows the same numbers on each.
    """

    def __init__(self, queue):
        self.queue = queue
        self._counts: dict[str, int] | None = None

    def __repr__(self) -> str:
        return f"<JobQueueCollector {self.queue!r}>"

    async def sample(self) -> None:
        """Read the queue's counts (kept for :meth:`collect`); none while it fails."""
        self._counts = None
        self._counts = await self.queue.counts()

    def collect(self):
        family = GaugeMetricFamily("mip_job_queue_depth",
                                   "Unfinished /v1 jobs in the job queue, by status",
                                   labels=("status",))
        for status, count in sorted((self._counts or {}).items()):
            family.add_metric((status,), count)
        yield family
