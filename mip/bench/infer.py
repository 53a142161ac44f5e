"""Inference load generator: closed loop (concurrency) and open loop (request rate).

One request body is built per run and sent unchanged for every request, so the generator's
CPU goes to the protocol client, not to making data.  Replies are received whole and checked
for success (MIP ERROR frame, gRPC status, HTTP status); their tensors are not converted.

Closed loop: ``concurrency`` workers each send a request, wait for its reply, and send the
next.  Open loop: requests are scheduled at fixed times ``start + i / rate`` whatever the
server does, and latency runs from the *scheduled* time, so a server that falls behind shows
its queueing delay instead of slowing the generator down (no coordinated omission).

Every step is bounded in time (warm-up + duration, then at most ``timeout`` seconds for the
replies still in flight) and in count (``max_requests``).  The protocol clients are in
:mod:`mip.bench.drivers`.
"""

from __future__ import annotations

import asyncio
import os
import platform
import time
from typing import Callable

import numpy as np

from mip.errors import MipError

from mip.bench.drivers import (PROTOCOLS, Driver, HttpStatusError, InferTarget,
                               fill_from_metadata, guess_protocol, make_driver,
                               resolve_inputs, _hostport)

__all__ = ["InferTarget", "Driver", "make_driver", "run_steps", "measure_step",
           "resolve_inputs", "guess_protocol", "error_kind", "machine_info", "SCHEMA"]

#: the ``schema`` field of every JSON document ``mip bench infer`` writes
SCHEMA = "mip-bench/infer/1"


# -- measurement ----------------------------------------------------------------------------

class TargetRefused(MipError):
    """The target refused the benchmark's first request (no such model, a wrong shape or
    datatype, ...): measuring would only count errors."""


def _reason(exc: BaseException) -> str:
    """What a server said when it refused a request, in one line."""
    if isinstance(exc, HttpStatusError):
        body = exc.body.decode(errors="replace").strip()
        return f"HTTP {exc.status}: {body}"
    details = getattr(exc, "details", None)
    if callable(details) and type(exc).__module__.startswith("grpc"):
        return f"{error_kind(exc)}: {details()}"
    return f"{error_kind(exc)}: {exc}" if str(exc) else error_kind(exc)


async def _probe(target: InferTarget, shapes, datatypes) -> None:
    """Read the model's metadata (gRPC, HTTP) and send one request before measuring."""
    what = f"model {target.model!r}" if target.model else "the default model"
    try:
        await fill_from_metadata(target, shapes, datatypes)
        driver = make_driver(target, 1)
        await driver.open()
        try:
            await driver.call()
        finally:
            await driver.close()
    except (OSError, asyncio.TimeoutError):
        raise
    except Exception as exc:
        raise TargetRefused(f"{target.url} refused a {target.protocol} request for {what}: "
                            f"{_reason(exc)}") from None


def error_kind(exc: BaseException) -> str:
    """A short, stable name for a failure, used to group errors in the report."""
    from mip.errors import RemoteError

    if isinstance(exc, RemoteError):
        code = getattr(exc, "error_code", None)
        name = getattr(code, "name", code)
        return f"mip error {name}"
    if isinstance(exc, HttpStatusError):
        return f"http {exc.status}"
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    code = getattr(exc, "code", None)
    if callable(code) and type(exc).__module__.startswith("grpc"):
        try:
            return f"grpc {code().name}"
        except Exception:  # pragma: no cover
            pass
    if isinstance(exc, (ConnectionError, OSError)):
        return f"connection ({type(exc).__name__})"
    return type(exc).__name__


class _Recorder:
    """Counts and latencies of the requests sent inside the measured window."""

    __slots__ = ("latencies", "requests", "errors", "error_kinds", "error_examples",
                 "sent_total", "last_done", "unsent")

    def __init__(self):
        self.latencies: list[float] = []
        self.requests = 0
        self.errors = 0
        self.error_kinds: dict[str, int] = {}
        self.error_examples: dict[str, str] = {}
        self.sent_total = 0  # warm-up included: the denominator of CPU per request
        self.last_done: float | None = None
        self.unsent = 0

    def fail(self, exc: BaseException, t_done: float) -> None:
        kind = error_kind(exc)
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1
        self.error_examples.setdefault(kind, str(exc)[:300])
        self.last_done = t_done

    def sent(self, measured: bool, budget: list) -> None:
        """Count a request sent; a measured one takes one from ``budget[0]``."""
        self.sent_total += 1
        if measured:
            budget[0] -= 1
            self.requests += 1

    async def run(self, call, t0: float, measured: bool) -> None:
        """Await ``call()``; a measured call's latency from ``t0``, or its failure, is kept."""
        try:
            await call()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if measured:
                self.fail(exc, time.perf_counter())
            return
        if measured:
            t1 = time.perf_counter()
            self.latencies.append(t1 - t0)
            self.last_done = t1


async def _closed_worker(call, rec: _Recorder, t_warm: float, t_end: float, budget: list) -> None:
    while budget[0] > 0:
        t0 = time.perf_counter()
        if t0 >= t_end:
            return
        measured = t0 >= t_warm
        rec.sent(measured, budget)
        await rec.run(call, t0, measured)


async def _open_loop(call, rec: _Recorder, rate: float, t_start: float, t_warm: float,
                     t_end: float, max_inflight: int, budget: list) -> set:
    pc = time.perf_counter
    sem = asyncio.Semaphore(max_inflight)
    tasks: set = set()

    async def one(t_sched: float, measured: bool) -> None:
        try:  # latency from the scheduled time: queueing delay included
            await rec.run(call, t_sched, measured)
        finally:
            sem.release()

    interval = 1.0 / rate
    i = 0
    loop = asyncio.get_running_loop()
    while budget[0] > 0:
        t_sched = t_start + i * interval
        if t_sched >= t_end:
            break
        now = pc()
        if t_sched > now:
            await asyncio.sleep(t_sched - now)
        if sem.locked():  # at the in-flight cap: wait, the clock keeps running
            try:
                await asyncio.wait_for(sem.acquire(), max(0.0, t_end - pc()))
            except asyncio.TimeoutError:
                break
        else:
            await sem.acquire()
        measured = t_sched >= t_warm
        rec.sent(measured, budget)
        task = loop.create_task(one(t_sched, measured))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
    # scheduled inside the window but never sent (the in-flight cap was reached)
    total = int(max(0.0, (t_end - max(t_warm, t_start))) * rate)
    rec.unsent = max(0, total - rec.requests) if budget[0] > 0 else 0
    return tasks


def _percentiles(latencies: list[float]) -> dict:
    if not latencies:
        return {k: None for k in ("min", "mean", "p50", "p90", "p99", "max")}
    a = np.asarray(latencies) * 1e3
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"min": float(a.min()), "mean": float(a.mean()), "p50": float(p50),
            "p90": float(p90), "p99": float(p99), "max": float(a.max())}


async def measure_step(driver_factory: Callable[[int], Driver], *, concurrency: int | None = None,
                       request_rate: float | None = None, duration: float = 3.0,
                       warmup: float = 1.0, max_requests: int = 10_000_000,
                       max_inflight: int = 1024, progress=None) -> dict:
    """Run one step and return its figures (the ``steps[]`` entry of the JSON document).

    Exactly one of ``concurrency`` (closed loop: requests in flight) and ``request_rate``
    (open loop: requests per second) is given.  ``duration`` and ``warmup`` are seconds;
    ``max_inflight`` caps requests in flight in the open loop (requests that could not be
    sent in time are reported as ``unsent``).
    """
    if (concurrency is None) == (request_rate is None):
        raise ValueError("give exactly one of concurrency and request_rate")
    if duration <= 0 or warmup < 0:
        raise ValueError("duration must be > 0 and warmup >= 0 seconds")
    driver = driver_factory(concurrency or max_inflight)
    await driver.open()
    rec = _Recorder()
    budget = [max_requests]
    ticker = None
    try:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        t_start = time.perf_counter()
        t_warm = t_start + warmup
        t_end = t_warm + duration
        if progress is not None:
            ticker = asyncio.get_running_loop().create_task(
                progress.follow(rec, t_start, t_warm, t_end))
        timeout = getattr(getattr(driver, "target", None), "timeout", 10.0)
        if concurrency is not None:
            workers = [asyncio.ensure_future(_closed_worker(driver.call, rec, t_warm, t_end, budget))
                       for _ in range(concurrency)]
            done, pending = await asyncio.wait(workers, timeout=(t_end - time.perf_counter())
                                               + timeout + 1.0)
        else:
            assert request_rate is not None  # exactly one of the two, checked above
            tasks = await _open_loop(driver.call, rec, request_rate, t_start, t_warm, t_end,
                                     max_inflight, budget)
            pending = set()
            if tasks:
                _, pending = await asyncio.wait(set(tasks), timeout=timeout + 1.0)
        for t in pending:  # stuck beyond every timeout: count them as timed out
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        cpu1, wall1 = time.process_time(), time.perf_counter()
    finally:
        if ticker is not None:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
        await driver.close()
    responses = len(rec.latencies)
    lost = rec.requests - responses - rec.errors
    if lost > 0:
        rec.errors += lost
        rec.error_kinds["timeout"] = rec.error_kinds.get("timeout", 0) + lost
    window = (rec.last_done - t_warm) if rec.last_done is not None else duration
    window = max(window, duration if responses == 0 else 1e-9)
    cpu = cpu1 - cpu0
    wall = wall1 - wall0
    return {
        "concurrency": concurrency,
        "request_rate": request_rate,
        "duration_s": float(window),
        "requests": rec.requests,
        "responses": responses,
        "errors": rec.errors,
        "error_kinds": dict(rec.error_kinds),
        "error_examples": dict(rec.error_examples),
        "unsent": rec.unsent,
        "throughput_rps": responses / window,
        "latency_ms": _percentiles(rec.latencies),
        "client_cpu_s": cpu,
        "client_cpu_percent": 100.0 * cpu / wall if wall > 0 else 0.0,
        "client_cpu_us_per_request": 1e6 * cpu / rec.sent_total if rec.sent_total else None,
        "request_bytes": driver.request_bytes,
    }


def machine_info() -> dict:
    """CPU model, logical CPUs, Python and OS of this machine."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "nproc": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "loop": _loop_name()}


def _loop_name() -> str:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return "none"
    return type(loop).__module__.split(".")[0]


async def run_steps(target: InferTarget, *, concurrencies: list[int] | None = None,
                    rates: list[float] | None = None, duration: float = 3.0, warmup: float = 1.0,
                    shapes=None, datatypes=None, max_requests: int = 10_000_000,
                    max_inflight: int = 1024, label: str | None = None,
                    progress_factory=None) -> dict:
    """Measure every step and return the JSON document (see :data:`SCHEMA`).

    ``concurrencies`` gives closed-loop steps, ``rates`` (requests/s) open-loop steps;
    ``duration``/``warmup`` are seconds per step.
    """
    import mip

    if not concurrencies and not rates:
        raise ValueError("give concurrency levels or request rates")
    if target.protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {target.protocol!r} (one of {', '.join(PROTOCOLS)})")
    await _probe(target, shapes, datatypes)
    started = time.time()
    steps = []
    plan = [("concurrency", c) for c in (concurrencies or [])] + \
           [("rate", r) for r in (rates or [])]
    for kind, level in plan:
        progress = progress_factory(kind, level, duration, warmup) if progress_factory else None
        kwargs = {"concurrency": int(level)} if kind == "concurrency" else {"request_rate": float(level)}
        try:
            step = await measure_step(lambda c: make_driver(target, c), duration=duration,
                                      warmup=warmup, max_requests=max_requests,
                                      max_inflight=max_inflight, progress=progress, **kwargs)
        finally:
            if progress is not None:
                progress.close()
        steps.append(step)
    return {
        "schema": SCHEMA,
        "tool": "mip bench infer",
        "mip_version": mip.__version__,
        "label": label or f"{target.protocol} {_hostport(target.url)}",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "target": {"url": target.url, "protocol": target.protocol, "model": target.model,
                   "version": target.version,
                   "inputs": [{"name": n, "datatype": d, "shape": list(s)}
                              for n, d, s in target.inputs],
                   "outputs": list(target.outputs)},
        "config": {"mode": "rate" if rates and not concurrencies else
                   ("concurrency" if not rates else "mixed"),
                   "duration_s": duration, "warmup_s": warmup,
                   "connections": target.connections, "timeout_s": target.timeout,
                   "client": target.client,
                   "max_requests": max_requests, "max_inflight": max_inflight},
        "machine": machine_info(),
        "steps": steps,
    }
