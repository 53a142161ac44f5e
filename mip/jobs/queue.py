"""The job queue behind ``POST /v1/inference``: at-least-once delivery with leases.

One small interface (:class:`JobQueue`), two backends:

* :class:`SQLiteQueue` (the default): one embedded database file in WAL mode. A job is
  committed (``synchronous=FULL``) before ``202`` is returned, so it survives a crash or
  restart of the control plane. Worker processes on the same machine may share the file.
* :class:`RedisQueue`: a Redis Stream with a consumer group, for many control planes and
  many workers on many machines (``XADD``, ``XREADGROUP``, ``XACK``, ``XAUTOCLAIM``).

Delivery: :meth:`JobQueue.take` leases a job to one consumer for ``lease`` seconds; a job
whose lease runs out (its worker died) is delivered again. :meth:`JobQueue.finish` stores
the outcome only if none is stored yet, so a job processed twice ends with one result. A
job delivered ``max_attempts`` times without an outcome fails (a poison job cannot kill
workers for ever). Finished jobs are kept ``retention`` seconds, then deleted; queued jobs
are never dropped. The number of unfinished jobs is bounded (``max_jobs``):
:meth:`JobQueue.submit` raises :class:`~mip.errors.QueueFull` (HTTP 503) beyond it.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import concurrent.futures
import contextlib
import json
import math
import os
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from mip.errors import QueueFull, QueueInUse
from mip.net.redis_client import open_redis
from mip.net.urls import tcp_address

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

__all__ = [
    "COMPLETED",
    "FAILED",
    "PROCESSING",
    "QUEUED",
    "JobQueue",
    "JobRecord",
    "Lease",
    "RedisQueue",
    "SQLiteQueue",
    "default_sqlite_path",
    "open_queue",
]

QUEUED, PROCESSING, COMPLETED, FAILED = "queued", "processing", "completed", "failed"
_DONE = (COMPLETED, FAILED)


@dataclass
class JobRecord:
    """A job as the API reports it. Times are seconds since the Unix epoch.

    Attributes:
        request_id: the job's id.
        model_id: ``name`` or ``name:version``.
        input_data: the OIP REST request body.
        parameters: the submitter's parameters (an object).
        status: ``queued``, ``processing``, ``completed`` or ``failed``.
        created / updated: when it was submitted / last changed.
        attempts: how many times it was delivered to a worker.
        result: the OIP REST response body once completed.
        error: ``{"code", "message"}`` once failed.
        worker: the consumer that stored the outcome (or holds the lease).
    """

    request_id: str
    model_id: str
    input_data: Any
    parameters: dict
    status: str
    created: float
    updated: float
    attempts: int = 0
    result: Any = None
    error: dict | None = None
    worker: str = ""


@dataclass
class Lease:
    """A job handed to one consumer until ``expires`` (``time.time()`` seconds).

    ``token`` identifies this delivery (a SQLite lease token or a Redis stream entry id).
    """

    job: JobRecord
    consumer: str
    token: str
    expires: float = 0.0
    extra: dict = field(default_factory=dict)


def new_request_id() -> str:
    """A fresh job id: 32 lowercase hex digits (a random UUID)."""
    return uuid.uuid4().hex


class JobQueue(abc.ABC):
    """The interface both backends implement. Times in seconds.

    Args:
        max_jobs: most unfinished (queued or processing) jobs; more -> ``QueueFull``.
        retention: seconds a finished job and its result are kept.
        lease: seconds a taken job stays with its consumer unless extended.
        max_attempts: deliveries before a job that never finishes is failed.
    """

    def __init__(self, *, max_jobs: int = 10_000, retention: float = 86_400.0,
                 lease: float = 30.0, max_attempts: int = 5):
        self.max_jobs = max_jobs
        self.retention = retention
        self.lease = lease
        self.max_attempts = max_attempts

    async def open(self) -> None:
        """Connect or create the store."""

    async def close(self) -> None:
        """Release connections and threads."""

    @abc.abstractmethod
    async def submit(self, model_id: str, input_data: Any, parameters: dict) -> JobRecord:
        """Store a new queued job durably and return it. Raises ``QueueFull``."""

    @abc.abstractmethod
    async def get(self, request_id: str) -> JobRecord | None:
        """The job, or ``None`` when unknown or past retention."""

    @abc.abstractmethod
    async def take(self, consumer: str, wait: float = 1.0) -> Lease | None:
        """Lease the oldest deliverable job to ``consumer``, waiting up to ``wait`` seconds
        for one; ``None`` when there is none."""

    @abc.abstractmethod
    async def extend(self, lease: Lease) -> bool:
        """Renew ``lease`` for another ``self.lease`` seconds; ``False`` if it was lost."""

    @abc.abstractmethod
    async def finish(self, lease: Lease, *, result: Any = None,
                     error: dict | None = None) -> bool:
        """Store the outcome (``error`` set -> failed, else completed) unless one is already
        stored; ``True`` when this call stored it. Ends the lease either way."""

    @abc.abstractmethod
    async def depth(self) -> int:
        """Unfinished jobs (queued or processing)."""

    @abc.abstractmethod
    async def counts(self) -> dict[str, int]:
        """Unfinished jobs by status: ``{"queued": N, "processing": M}`` (one cheap query,
        for the metrics)."""

    async def purge(self) -> int:
        """Delete finished jobs older than the retention; returns how many."""
        return 0

    async def __aenter__(self) -> JobQueue:
        await self.open()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _gave_up(attempts: int) -> dict:
    return {"code": "too_many_attempts",
            "message": f"the job was delivered {attempts} times without finishing "
                       f"(its workers stopped or crashed)"}


# -- SQLite -------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    model_id TEXT NOT NULL,
    input_data TEXT NOT NULL,
    parameters TEXT NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_until REAL NOT NULL DEFAULT 0,
    lease_token TEXT NOT NULL DEFAULT '',
    worker TEXT NOT NULL DEFAULT '',
    result TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_pending ON jobs (status, created);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (updated) WHERE status IN ('completed', 'failed');
"""

_COLUMNS = ("id, model_id, input_data, parameters, status, created, updated, attempts, "
            "worker, result, error")


def default_sqlite_path(address: str | None = None) -> Path:
    """``$MIP_STATE_DIR/jobs.sqlite3``, else ``$XDG_STATE_HOME/mip/...``, else
    ``~/.local/state/mip/jobs.sqlite3``.

    With ``address`` (the ``HOST:PORT`` of the server the queue belongs to) the file is
    ``jobs-HOST-PORT.sqlite3`` in the same folder, so that two servers on one host keep
    separate queues; on port 0 (a port chosen at start) the process id is added too.
    """
    base = os.environ.get("MIP_STATE_DIR")
    if base:
        folder = Path(base)
    else:
        state = os.environ.get("XDG_STATE_HOME") or os.path.join(
            os.path.expanduser("~"), ".local", "state")
        folder = Path(state) / "mip"
    if address is None:
        return folder / "jobs.sqlite3"
    tcp = tcp_address(address, "a queue's owner")
    host = "".join(c if c.isalnum() or c in ".-" else "_" for c in tcp.host)
    suffix = f"-{os.getpid()}" if tcp.port == 0 else ""
    return folder / f"jobs-{host}-{tcp.port}{suffix}.sqlite3"


def _record(row) -> JobRecord:
    return JobRecord(request_id=row[0], model_id=row[1], input_data=json.loads(row[2]),
                     parameters=json.loads(row[3]), status=row[4], created=row[5],
                     updated=row[6], attempts=row[7], worker=row[8],
                     result=None if row[9] is None else json.loads(row[9]),
                     error=None if row[10] is None else json.loads(row[10]))


class SQLiteQueue(JobQueue):
    """Jobs in one SQLite file (WAL, ``synchronous=FULL``), driven from one thread.

    Takers in this process wake as soon as a job is submitted here, and when the earliest
    lease held on the file runs out. An idle queue costs no query: only a file shared
    with other processes (not ``exclusive``) is looked at, every ``poll`` seconds, and
    then with one ``stat`` of the file and its write-ahead log; it is queried when they
    changed (a commit by any process), and at least every ``recheck`` seconds.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, poll: float = 0.1,
                 recheck: float = 2.0, exclusive: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.path = Path(path) if path is not None else default_sqlite_path()
        self.poll = poll
        #: a shared file is queried at least this often even when its stamp did not move
        #: (a stamp may not: a timestamp's granularity, a log rewound to the same size)
        self.recheck = recheck
        #: hold ``PATH.lock`` while open: a second process that asks for the same file
        #: exclusively is refused (QueueInUse) instead of taking this server's jobs
        self.exclusive = exclusive
        self._lock: int | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._submitted = 0  # jobs submitted through this object
        #: what the last query that found nothing deliverable saw: jobs submitted here by
        #: then, the file's stamp, when (monotonic), and when (wall clock) the earliest
        #: lease held then ends; None: query on the next take
        self._quiet: tuple[int, tuple, float, float] | None = None

    def __repr__(self) -> str:
        return f"<SQLiteQueue {self.path}>"

    async def _call(self, fn, *args):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    async def open(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mip-jobs")
        await self._call(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.exclusive:
            self._take_lock()
        db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # committed = on disk before the 202
        db.execute("PRAGMA busy_timeout=10000")
        db.executescript(_SCHEMA)
        self._db = db

    def _take_lock(self) -> None:
        import fcntl

        lock = Path(f"{self.path}.lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise QueueInUse(
                f"the job queue {self.path} belongs to another running server (pid {holder}): "
                "give this server its own --queue, or name the same --queue on both to share "
                "it on purpose") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock = fd

    async def close(self) -> None:
        if self._executor is None:
            return
        if self._db is not None:
            await self._call(self._db.close)
            self._db = None
        self._executor.shutdown(wait=True)
        self._executor = None
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None

    def _transaction(self, fn, *args):
        db = self._open_db
        db.execute("BEGIN IMMEDIATE")
        try:
            value = fn(db, *args)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return value

    async def submit(self, model_id: str, input_data: Any, parameters: dict) -> JobRecord:
        now = time.time()
        job = JobRecord(new_request_id(), model_id, input_data, parameters, QUEUED, now, now)
        await self._call(self._transaction, self._insert, job,
                         json.dumps(input_data), json.dumps(parameters))
        self._submitted += 1
        while self._waiters:  # wake one idle taker, not all of them
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break
        return job

    def _insert(self, db, job: JobRecord, input_data: str, parameters: str) -> None:
        (pending,) = db.execute(
            "SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'processing')").fetchone()
        if pending >= self.max_jobs:
            raise QueueFull(f"the job queue holds {pending} unfinished jobs, its limit")
        db.execute("INSERT INTO jobs (id, model_id, input_data, parameters, status, created, "
                   "updated) VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (job.request_id, job.model_id, input_data, parameters, QUEUED, job.created,
                    job.updated))

    async def get(self, request_id: str) -> JobRecord | None:
        row = await self._call(self._get, request_id)
        return None if row is None else _record(row)

    def _get(self, request_id: str):
        return self._open_db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?",
                                (request_id,)).fetchone()

    async def take(self, consumer: str, wait: float = 1.0) -> Lease | None:
        end = time.monotonic() + max(wait, 0.0)
        loop = asyncio.get_running_loop()
        while True:
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                if self._worth_a_query():
                    quiet = (self._submitted, self._stamp(), time.monotonic())
                    lease, due = await self._call(self._transaction, self._take, consumer)
                    if lease is not None:
                        self._quiet = None  # more may be waiting
                        return lease
                    self._quiet = (*quiet, due)
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return None
                pause = remaining
                if self._quiet is not None:  # the earliest lease ends, freeing its job
                    pause = min(pause, max(self._quiet[3] - time.time(), 0.0))
                if not self.exclusive:
                    pause = min(pause, self.poll)
                await asyncio.wait((waiter,), timeout=pause)
            finally:
                if not waiter.done():
                    waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    def _worth_a_query(self) -> bool:
        """Whether a job may have become deliverable since the last query found none."""
        if self._quiet is None:
            return True
        submitted, stamp, queried, due = self._quiet
        if submitted != self._submitted or time.time() >= due:
            return True
        return not self.exclusive and (time.monotonic() - queried >= self.recheck
                                       or self._stamp() != stamp)

    def _stamp(self) -> tuple:
        """What a commit to the file by any process changes: the write-ahead log's (and the
        file's, for a checkpoint) size and modification time."""
        stamp: list[tuple[int, int, int] | None] = []
        for path in (self.path, f"{self.path}-wal"):
            try:
                st = os.stat(path)
            except OSError:
                stamp.append(None)
            else:
                stamp.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(stamp)

    def _take(self, db, consumer: str) -> tuple[Lease | None, float]:
        """A lease, or none and when (wall clock) the earliest lease held now ends."""
        for _ in range(100):  # bounded: each pass either leases a job or fails one
            now = time.time()
            row = db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE status IN ('queued', 'processing') "
                f"AND lease_until <= ? ORDER BY created LIMIT 1", (now,)).fetchone()
            if row is None:
                (due,) = db.execute("SELECT MIN(lease_until) FROM jobs WHERE status IN "
                                    "('queued', 'processing')").fetchone()
                return None, math.inf if due is None else due
            job = _record(row)
            if job.attempts >= self.max_attempts:
                db.execute("UPDATE jobs SET status = 'failed', error = ?, updated = ?, "
                           "lease_until = 0 WHERE id = ?",
                           (json.dumps(_gave_up(job.attempts)), now, job.request_id))
                continue
            token = uuid.uuid4().hex
            expires = now + self.lease
            db.execute("UPDATE jobs SET status = 'processing', attempts = attempts + 1, "
                       "lease_until = ?, lease_token = ?, worker = ?, updated = ? WHERE id = ?",
                       (expires, token, consumer, now, job.request_id))
            job.status, job.attempts, job.worker, job.updated = (PROCESSING, job.attempts + 1,
                                                                 consumer, now)
            return Lease(job, consumer, token, expires), expires
        return None, 0.0  # failed 100 jobs: look again at once

    async def extend(self, lease: Lease) -> bool:
        expires = time.time() + self.lease
        changed = await self._call(self._execute_count,
                                   "UPDATE jobs SET lease_until = ? WHERE id = ? AND "
                                   "lease_token = ? AND status = 'processing'",
                                   (expires, lease.job.request_id, lease.token))
        if changed:
            lease.expires = expires
        return bool(changed)

    @property
    def _open_db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the job queue is not open")
        return self._db

    def _execute_count(self, sql: str, params: tuple) -> int:
        return self._open_db.execute(sql, params).rowcount

    async def finish(self, lease: Lease, *, result: Any = None,
                     error: dict | None = None) -> bool:
        status = FAILED if error is not None else COMPLETED
        changed = await self._call(
            self._execute_count,
            "UPDATE jobs SET status = ?, result = ?, error = ?, worker = ?, updated = ?, "
            "lease_until = 0, lease_token = '' WHERE id = ? "
            "AND status NOT IN ('completed', 'failed')",
            (status, None if result is None else json.dumps(result),
             None if error is None else json.dumps(error), lease.consumer, time.time(),
             lease.job.request_id))
        return bool(changed)

    async def depth(self) -> int:
        row = await self._call(lambda: self._open_db.execute(
            "SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'processing')").fetchone())
        return row[0]

    async def counts(self) -> dict[str, int]:
        rows = await self._call(lambda: self._open_db.execute(
            "SELECT status, COUNT(*) FROM jobs WHERE status IN ('queued', 'processing') "
            "GROUP BY status").fetchall())
        return {QUEUED: 0, PROCESSING: 0} | dict(rows)

    async def purge(self) -> int:
        return await self._call(self._execute_count,
                                "DELETE FROM jobs WHERE status IN ('completed', 'failed') "
                                "AND updated < ?", (time.time() - self.retention,))


# -- Redis Streams ------------------------------------------------------------------------

# KEYS: stream, job hash. ARGV: max_jobs, request id, model_id, input_data, parameters, now.
_SUBMIT = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[2], 'model_id', ARGV[3], 'input_data', ARGV[4], 'parameters', ARGV[5],
           'status', 'queued', 'created', ARGV[6], 'updated', ARGV[6], 'attempts', 0)
redis.call('XADD', KEYS[1], '*', 'id', ARGV[2])
return 1
"""

# KEYS: job hash, stream. ARGV: status, result, error, worker, now, retention s, group, entry.
_FINISH = """
local status = redis.call('HGET', KEYS[1], 'status')
local stored = 0
if status and status ~= 'completed' and status ~= 'failed' then
  redis.call('HSET', KEYS[1], 'status', ARGV[1], 'result', ARGV[2], 'error', ARGV[3],
             'worker', ARGV[4], 'updated', ARGV[5])
  redis.call('EXPIRE', KEYS[1], ARGV[6])
  stored = 1
end
redis.call('XACK', KEYS[2], ARGV[7], ARGV[8])
redis.call('XDEL', KEYS[2], ARGV[8])
return stored
"""


class _Scripts(NamedTuple):
    """The Lua scripts of a Redis queue, registered by ``open()``."""

    submit: AsyncScript
    finish: AsyncScript


class RedisQueue(JobQueue):
    """Jobs in a Redis Stream (``{prefix}:stream``, consumer group ``workers``); each job's
    fields and outcome in a hash ``{prefix}:job:{id}`` that expires ``retention`` seconds
    after the outcome is stored.

    A lease is the stream entry's idle time in the group's pending list: ``XAUTOCLAIM``
    hands entries idle for longer than ``lease`` seconds to another consumer, and
    :meth:`extend` resets the idle time with ``XCLAIM ... JUSTID``.
    """

    group = "workers"

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, prefix: str = "mip:{jobs}",
                 ssl_context=None, **kwargs):
        super().__init__(**kwargs)
        self.url = url
        self.prefix = prefix
        self.stream = f"{prefix}:stream"
        self.ssl_context = ssl_context
        self.redis: Redis | None = None
        self._scripts: _Scripts | None = None

    def __repr__(self) -> str:
        return f"<RedisQueue {self.url} {self.prefix}>"

    @property
    def _client(self) -> Redis:
        if self.redis is None:
            raise RuntimeError("the job queue is not open")
        return self.redis

    @property
    def _loaded(self) -> _Scripts:
        if self._scripts is None:
            raise RuntimeError("the job queue is not open")
        return self._scripts

    def _job_key(self, request_id: str) -> str:
        return f"{self.prefix}:job:{request_id}"

    async def open(self) -> None:
        from redis.exceptions import ResponseError

        self.redis = redis = open_redis(self.url, self.ssl_context)
        try:
            await redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._scripts = _Scripts(redis.register_script(_SUBMIT), redis.register_script(_FINISH))

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
            self.redis = None

    async def submit(self, model_id: str, input_data: Any, parameters: dict) -> JobRecord:
        now = time.time()
        job = JobRecord(new_request_id(), model_id, input_data, parameters, QUEUED, now, now)
        ok = await self._loaded.submit(keys=[self.stream, self._job_key(job.request_id)],
                                args=[self.max_jobs, job.request_id, model_id,
                                      json.dumps(input_data), json.dumps(parameters), repr(now)])
        if not ok:
            raise QueueFull(f"the job queue holds {self.max_jobs} unfinished jobs, its limit")
        return job

    @staticmethod
    def _record(request_id: str, h: dict) -> JobRecord:
        return JobRecord(request_id=request_id, model_id=h["model_id"],
                         input_data=json.loads(h["input_data"]),
                         parameters=json.loads(h["parameters"]), status=h["status"],
                         created=float(h["created"]), updated=float(h["updated"]),
                         attempts=int(h.get("attempts", 0)), worker=h.get("worker", ""),
                         result=json.loads(h["result"]) if h.get("result") else None,
                         error=json.loads(h["error"]) if h.get("error") else None)

    async def get(self, request_id: str) -> JobRecord | None:
        h = await self._client.hgetall(self._job_key(request_id))
        return self._record(request_id, h) if h else None

    async def take(self, consumer: str, wait: float = 1.0) -> Lease | None:
        end = time.monotonic() + max(wait, 0.0)
        lease_ms = max(int(self.lease * 1000), 1)
        while True:
            # expired leases first: entries idle in the pending list for longer than a lease
            claimed = await self._client.xautoclaim(self.stream, self.group, consumer, lease_ms,
                                                  start_id="0-0", count=1)
            entries = claimed[1] if claimed else []
            if not entries:
                block = int(max(0.0, min(end - time.monotonic(), 1.0)) * 1000)
                # RESP2's reply, [[stream, [(id, fields), ...]]] (redis-py's types allow RESP3's)
                read: Any = await self._client.xreadgroup(self.group, consumer, {self.stream: ">"},
                                                        count=1, block=block or None)
                entries = read[0][1] if read else []
            for entry_id, fields in entries:
                if fields is None:
                    continue
                lease = await self._lease(consumer, entry_id, fields.get("id", ""))
                if lease is not None:
                    return lease
            if time.monotonic() >= end:
                return None

    async def _lease(self, consumer: str, entry_id: str, request_id: str) -> Lease | None:
        key = self._job_key(request_id)
        h = await self._client.hgetall(key)
        if not h or h.get("status") in _DONE:  # purged, or finished before its ack
            await self._drop(entry_id)
            return None
        job = self._record(request_id, h)
        if job.attempts >= self.max_attempts:
            await self._loaded.finish(keys=[key, self.stream],
                               args=[FAILED, "", json.dumps(_gave_up(job.attempts)), consumer,
                                     repr(time.time()), int(self.retention), self.group,
                                     entry_id])
            return None
        now = time.time()
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hincrby(key, "attempts", 1)
            pipe.hset(key, mapping={"status": PROCESSING, "worker": consumer,
                                    "updated": repr(now)})
            attempts, _ = await pipe.execute()
        job.status, job.attempts, job.worker, job.updated = PROCESSING, attempts, consumer, now
        return Lease(job, consumer, entry_id, now + self.lease)

    async def _drop(self, entry_id: str) -> None:
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, self.group, entry_id)
            pipe.xdel(self.stream, entry_id)
            await pipe.execute()

    async def extend(self, lease: Lease) -> bool:
        claimed = await self._client.xclaim(self.stream, self.group, lease.consumer, 0,
                                          [lease.token], justid=True)
        if claimed:
            lease.expires = time.time() + self.lease
        return bool(claimed)

    async def finish(self, lease: Lease, *, result: Any = None,
                     error: dict | None = None) -> bool:
        status = FAILED if error is not None else COMPLETED
        stored = await self._loaded.finish(
            keys=[self._job_key(lease.job.request_id), self.stream],
            args=[status, "" if result is None else json.dumps(result),
                  "" if error is None else json.dumps(error), lease.consumer,
                  repr(time.time()), max(int(self.retention), 1), self.group, lease.token])
        return bool(stored)

    async def depth(self) -> int:
        return await self._client.xlen(self.stream)

    async def counts(self) -> dict[str, int]:
        # The stream holds the unfinished jobs; the group's pending list those delivered
        # to a worker and not yet finished.
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.xlen(self.stream)
            pipe.xpending(self.stream, self.group)
            length, pending = await pipe.execute()
        processing = int(pending["pending"]) if pending else 0
        return {QUEUED: max(int(length) - processing, 0), PROCESSING: processing}


def open_queue(spec: str | None, *, owner: str | None = None, **kwargs) -> JobQueue:
    """The queue a ``--queue`` value names: ``redis://…`` / ``rediss://…`` -> Redis Streams;
    ``sqlite:///PATH``, a file path, or ``None`` (the default state file) -> SQLite.

    With no ``spec`` and an ``owner`` (the ``HOST:PORT`` of the server it belongs to), the
    default file is that server's own (:func:`default_sqlite_path`) and held exclusively.
    Keyword arguments go to the backend (``max_jobs``, ``retention``, ``lease``, …)."""
    if spec and spec.startswith(("redis://", "rediss://", "unix://")):
        return RedisQueue(spec, **kwargs)
    kwargs.pop("ssl_context", None)
    if spec and spec.startswith("sqlite://"):
        spec = spec[len("sqlite://"):] or None
    if spec is None and owner is not None:
        return SQLiteQueue(default_sqlite_path(owner), exclusive=True, **kwargs)
    return SQLiteQueue(spec, **kwargs)
