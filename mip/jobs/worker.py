"""Workers: take jobs from the queue, run them, store the outcome.

:class:`JobWorker` runs ``concurrency`` asyncio tasks in the process that owns the
engine (``mip serve`` starts one; ``mip worker`` runs one against a shared queue with
its own engine). What running a job means is the caller's: a coroutine function that
turns a :class:`~mip.jobs.queue.JobRecord` into its result document (the ``/v1``
frontend's :class:`~mip.frontends.miaas.runner.JobRunner` decodes the inputs and calls
the engine). While a job runs its lease is renewed every third of the lease, so only a
worker that died (or hung its event loop) loses its jobs to others.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import re
import secrets
import socket
from collections.abc import Awaitable, Callable

from mip.errors import ModelNotReady, QueueFull, ServingError
from mip.jobs.queue import JobQueue, JobRecord, Lease

__all__ = ["JobWorker", "RunJob", "error_code", "isotime", "job_document", "run_worker"]

log = logging.getLogger("mip.miaas")

#: runs one job: its record in, its result document out (raises to fail it)
RunJob = Callable[[JobRecord], Awaitable[dict]]

#: errors that say "not now" rather than "never": the job is left to be delivered again.
_TRANSIENT = (ModelNotReady, QueueFull)


def isotime(seconds: float) -> str:
    """ISO-8601 UTC time with milliseconds, e.g. ``2024-01-01T00:00:00.000Z``."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def error_code(exc: BaseException) -> str:
    """The ``error.code`` string of an exception: its class name in snake_case
    (``ModelNotFound`` -> ``model_not_found``)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()


def job_document(job: JobRecord) -> dict:
    """The JSON body of ``GET /v1/inference/{request_id}`` for ``job``."""
    document = {"request_id": job.request_id, "status": job.status, "model_id": job.model_id,
                "result": job.result, "timestamp": isotime(job.updated),
                "created": isotime(job.created), "attempts": job.attempts}
    if job.error is not None:
        document["error"] = job.error
    return document


def default_consumer_name() -> str:
    """``host:pid:random``: unique per worker process, readable in logs and job records."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class JobWorker:
    """Runs queued jobs with ``run_job`` and stores their outcomes.

    Args:
        queue: an open :class:`JobQueue`.
        run_job: a :data:`RunJob`: the job's result document, or an exception. A
            :class:`~mip.errors.ModelNotReady` or :class:`~mip.errors.QueueFull` leaves
            the job to be delivered again; another :class:`~mip.errors.ServingError`
            fails it with its code; any other exception fails it as ``internal_error``.
        concurrency: jobs run at once (each a task; the engine batches them together).
        publisher: an :class:`~mip.jobs.push.OutcomePublisher` to push outcomes to, or
            ``None``.
        consumer: this worker's name in the queue (default: host, pid and a random part).
        poll: seconds a task waits in one :meth:`JobQueue.take` before looking again.
        purge_interval: seconds between deletions of finished jobs past retention.
    """

    def __init__(self, queue: JobQueue, run_job: RunJob, *, concurrency: int = 4,
                 publisher=None, consumer: str | None = None, poll: float = 1.0,
                 purge_interval: float = 60.0):
        self.queue = queue
        self.run_job = run_job
        self.concurrency = concurrency
        self.publisher = publisher
        self.consumer = consumer or default_consumer_name()
        self.poll = poll
        self.purge_interval = purge_interval
        self._tasks: list[asyncio.Task] = []
        self._purger: asyncio.Task | None = None
        self._running = False
        self._busy = 0
        self.completed = 0  #: outcomes this worker stored
        self.duplicates = 0  #: outcomes another delivery had already stored

    def start(self) -> None:
        """Start the tasks (on the running event loop)."""
        if self._running:
            return
        self._running = True
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._loop(i), name=f"mip-job-worker-{i}")
                       for i in range(self.concurrency)]
        self._purger = loop.create_task(self._purge_loop(), name="mip-job-purge")

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking jobs; jobs running get up to ``grace`` seconds to finish, the others
        are cancelled and delivered again after their lease."""
        self._running = False
        if self._purger is not None:  # holds nothing: stops at once
            self._purger.cancel()
            await asyncio.gather(self._purger, return_exceptions=True)
            self._purger = None
        tasks, self._tasks = self._tasks, []
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _loop(self, number: int) -> None:
        while self._running:
            try:
                lease = await self.queue.take(self.consumer, wait=self.poll)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store is down: wait and retry, do not spin
                log.error("job queue %r: %s", self.queue, exc)
                await asyncio.sleep(min(self.poll, 1.0))
                continue
            if lease is not None:
                self._busy += 1
                try:
                    await self.run(lease)
                finally:
                    self._busy -= 1

    async def _purge_loop(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                removed = await self.queue.purge()
                if removed:
                    log.info("deleted %d finished jobs past retention", removed)
            await asyncio.sleep(self.purge_interval)

    async def _keep_lease(self, lease: Lease) -> None:
        interval = max(self.queue.lease / 3, 0.05)
        while True:
            await asyncio.sleep(interval)
            if not await self.queue.extend(lease):
                log.warning("job %s: lease lost (another worker may run it too)",
                            lease.job.request_id)
                return

    async def run(self, lease: Lease) -> None:
        """Run one leased job and store its outcome (and publish it when configured)."""
        job = lease.job
        keeper = asyncio.get_running_loop().create_task(self._keep_lease(lease))
        result = error = None
        try:
            result = await self.run_job(job)
        except _TRANSIENT as exc:
            log.warning("job %s: %s; it will be delivered again", job.request_id, exc)
            return
        except ServingError as exc:
            error = {"code": error_code(exc), "message": str(exc)}
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or a model crash: the job fails, the worker lives
            log.exception("job %s failed", job.request_id)
            error = {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"}
        finally:
            keeper.cancel()
        stored = await self.queue.finish(lease, result=result, error=error)
        if not stored:
            self.duplicates += 1
            return
        self.completed += 1
        if self.publisher is not None:
            done = await self.queue.get(job.request_id)
            if done is not None:
                await self.publisher.publish(job.request_id, job_document(done))


async def run_worker(queue: JobQueue, run_job: RunJob, *, concurrency: int = 4,
                     publisher=None, stop: asyncio.Event | None = None,
                     grace: float = 10.0) -> JobWorker:
    """Run a :class:`JobWorker` until ``stop`` is set (``mip worker``). The queue must be
    open (and whatever ``run_job`` needs started); it is left so. Returns the stopped
    worker."""
    worker = JobWorker(queue, run_job, concurrency=concurrency, publisher=publisher)
    worker.start()
    log.info("worker %s taking jobs from %r (%d at once)", worker.consumer, queue, concurrency)
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        await worker.stop(grace)
    return worker
