# ruff: noqa: F811  (pytest fixtures imported from _miaas are arguments here)
"""The job queues (SQLite and Redis Streams) and ``mip worker`` processes: leases,
redelivery after a SIGKILL, idempotent results, bounds, retention, two workers sharing
one Redis queue, a worker reaching Redis over mutual TLS."""

from __future__ import annotations

import asyncio
import re
import signal
import ssl
import time

import httpx
import pytest
from _miaas import (  # noqa: F401
    API_KEY,
    AUTH,
    engine,
    repository,
    serve,
    sleepy_job,
    start_worker,
    wait_job,
    wait_ready,
)
from _serve_process import stop_process

from mip.errors import QueueFull
from mip.frontends.miaas import MiaasConfig, standalone_app
from mip.frontends.auth import hash_key
from mip.jobs.queue import SQLiteQueue, open_queue
from mip.net.redis_client import open_redis

pytestmark = pytest.mark.timeout(90)

BODY = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [0.0]}]}


@pytest.fixture(params=["sqlite", "redis"])
async def make_queue(request, tmp_path):
    """Opens queues of one backend on one store (the same file or Redis database)."""
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
    else:
        url = str(tmp_path / "jobs.sqlite3")
    opened = []

    async def make(**kwargs):
        queue = open_queue(url, **kwargs)
        await queue.open()
        opened.append(queue)
        return queue

    yield make
    for queue in opened:
        await queue.close()


async def test_submit_take_finish(make_queue):
    queue = await make_queue(lease=5.0)
    job = await queue.submit("sleepy:1", BODY, {"timeout": 2})
    assert (await queue.get(job.request_id)).status == "queued"
    assert await queue.depth() == 1
    lease = await queue.take("w1", wait=1.0)
    assert lease.job.request_id == job.request_id and lease.job.input_data == BODY
    assert lease.job.parameters == {"timeout": 2} and lease.job.attempts == 1
    assert (await queue.get(job.request_id)).status == "processing"
    assert await queue.take("w2", wait=0.1) is None  # leased: nobody else gets it
    assert await queue.extend(lease)
    assert await queue.finish(lease, result={"outputs": []})
    record = await queue.get(job.request_id)
    assert record.status == "completed" and record.result == {"outputs": []}
    assert record.worker == "w1"
    assert await queue.depth() == 0
    assert await queue.get("unknown") is None


async def test_expired_lease_is_redelivered_and_one_result_stands(make_queue):
    queue = await make_queue(lease=0.3)
    job = await queue.submit("sleepy", BODY, {})
    first = await queue.take("w1", wait=1.0)
    assert await queue.take("w2", wait=0.05) is None
    await asyncio.sleep(0.4)
    second = await queue.take("w2", wait=1.0)
    assert second is not None and second.job.request_id == job.request_id
    assert second.job.attempts == 2
    assert await queue.finish(second, result={"by": "w2"})
    assert not await queue.finish(first, result={"by": "w1"})  # the slow one loses
    assert not await queue.finish(second, error={"code": "x", "message": "late"})
    record = await queue.get(job.request_id)
    assert record.status == "completed" and record.result == {"by": "w2"}
    assert await queue.take("w3", wait=0.4) is None  # never delivered again


async def test_poison_job_fails_after_max_attempts(make_queue):
    queue = await make_queue(lease=0.1, max_attempts=2)
    job = await queue.submit("sleepy", BODY, {})
    for _ in range(2):
        assert await queue.take("w", wait=1.0) is not None
        await asyncio.sleep(0.15)
    assert await queue.take("w", wait=0.3) is None
    record = await queue.get(job.request_id)
    assert record.status == "failed" and record.error["code"] == "too_many_attempts"


async def test_bounded_length(make_queue):
    queue = await make_queue(max_jobs=3)
    for _ in range(3):
        await queue.submit("m", BODY, {})
    with pytest.raises(QueueFull):
        await queue.submit("m", BODY, {})
    lease = await queue.take("w", wait=1.0)
    await queue.finish(lease, result={})
    await queue.submit("m", BODY, {})  # a finished job frees its place


async def test_counts_by_status(make_queue):
    """What /metrics shows as mip_job_queue_depth: unfinished jobs, queued or processing."""
    queue = await make_queue()
    assert await queue.counts() == {"queued": 0, "processing": 0}
    for _ in range(3):
        await queue.submit("m", BODY, {})
    lease = await queue.take("w", wait=1.0)
    assert await queue.counts() == {"queued": 2, "processing": 1}
    await queue.finish(lease, result={})
    assert await queue.counts() == {"queued": 2, "processing": 0}
    assert await queue.depth() == 2


async def test_retention(make_queue, request):
    queue = await make_queue(retention=1.0)
    done = await queue.submit("m", BODY, {})
    waiting = await queue.submit("m", BODY, {})
    lease = await queue.take("w", wait=1.0)
    assert lease.job.request_id == done.request_id
    await queue.finish(lease, result={})
    await asyncio.sleep(1.2 if isinstance(queue, SQLiteQueue) else 2.1)
    await queue.purge()
    assert await queue.get(done.request_id) is None
    assert (await queue.get(waiting.request_id)).status == "queued"  # queued jobs stay


async def test_two_queues_share_one_store(make_queue):
    a, b = await make_queue(), await make_queue()
    ids = {(await a.submit("m", BODY, {})).request_id for _ in range(10)}
    taken = []
    for _ in range(10):
        lease = await b.take("w", wait=1.0)
        taken.append(lease.job.request_id)
        await b.finish(lease, result={})
    assert set(taken) == ids and len(taken) == 10
    assert [(await a.get(i)).status for i in ids] == ["completed"] * 10



async def _statements(queue: SQLiteQueue) -> list[str]:
    """Every SQL statement the queue's connection runs from now on (SQLite's own trace)."""
    seen: list[str] = []
    await queue._call(queue._open_db.set_trace_callback, seen.append)
    return seen


async def test_an_idle_queue_costs_no_query(tmp_path):
    """Takers waiting on an empty queue of this server's own file query it once, then only
    when a job is submitted or a lease they saw ends."""
    queue = SQLiteQueue(tmp_path / "jobs.sqlite3", exclusive=True, lease=0.4)
    await queue.open()
    try:
        assert await queue.take("w", wait=0.05) is None
        seen = await _statements(queue)
        for _ in range(4):
            assert await queue.take("w", wait=0.1) is None
        assert seen == []
        taker = asyncio.ensure_future(queue.take("w", wait=30.0))
        await asyncio.sleep(0.1)
        job = await queue.submit("m", BODY, {})
        first = await asyncio.wait_for(taker, 10)
        assert first.job.request_id == job.request_id
        # nobody finishes it: the next taker queries once, finds it leased, and queries
        # again when that lease ends
        seen.clear()
        second = await queue.take("w2", wait=30.0)
        assert second.job.request_id == job.request_id and second.job.attempts == 2
        assert seen.count("BEGIN IMMEDIATE") == 2
    finally:
        await queue.close()


async def test_shared_file_sees_other_writers(tmp_path):
    """On a file shared with other processes (each with its own connection and no way to
    wake this one's takers), a waiting taker sees a job another writer commits."""
    path = tmp_path / "jobs.sqlite3"
    a, b = SQLiteQueue(path, poll=0.05), SQLiteQueue(path, poll=0.05)
    await a.open()
    await b.open()
    try:
        assert await b.take("w", wait=0.05) is None
        taker = asyncio.ensure_future(b.take("w", wait=30.0))
        await asyncio.sleep(0.2)
        job = await a.submit("m", BODY, {})
        lease = await asyncio.wait_for(taker, 10)
        assert lease.job.request_id == job.request_id
        # an idle shared file is looked at with a stat, and queried only when it changed
        assert await b.take("w", wait=0.05) is None
        seen = await _statements(b)
        assert await b.take("w", wait=0.3) is None
        assert seen == []
    finally:
        await a.close()
        await b.close()


# -- worker processes ----------------------------------------------------------------------

def _cfg(queue: str, **kwargs) -> MiaasConfig:
    return MiaasConfig(api_keys=[hash_key(API_KEY)], queue=queue, job_workers=0, **kwargs)


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_worker_killed_mid_job(engine, repository, tmp_path, request, backend):
    """A worker SIGKILLed while running a job: another worker takes it after the lease, and
    the job completes once."""
    queue = request.getfixturevalue("redis_url") if backend == "redis" else str(
        tmp_path / "jobs.sqlite3")
    async with serve(standalone_app(engine, _cfg(queue, lease=1.0))) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            victim = start_worker(queue, repository, lease=1.0)
            try:
                await asyncio.to_thread(wait_ready, victim)
                r = await client.post("/v1/inference", json=sleepy_job(2.0), headers=AUTH)
                request_id = r.json()["request_id"]
                job = await wait_job(client, request_id, until=("processing",), timeout=10)
                assert job["status"] == "processing" and job["attempts"] == 1
                await asyncio.sleep(0.3)  # inside the model's 2 s sleep
                victim.send_signal(signal.SIGKILL)
                victim.wait(5)
            finally:
                stop_process(victim)
            rescuer = start_worker(queue, repository, lease=1.0)
            try:
                await asyncio.to_thread(wait_ready, rescuer)
                started = time.monotonic()
                job = await wait_job(client, request_id, timeout=20)
            finally:
                stop_process(rescuer)
    assert job["status"] == "completed", job
    assert job["attempts"] == 2
    assert job["result"]["outputs"][0]["data"] == [5.0]  # 2 * 2 + 1 (version 2)
    assert time.monotonic() - started < 15


async def test_worker_writes_an_access_line_a_job(engine, repository, tmp_path):
    """``mip worker --access-log FILE``: each job it runs is one line, named by the job's id."""
    queue, log_file = str(tmp_path / "jobs.sqlite3"), tmp_path / "access.log"
    async with serve(standalone_app(engine, _cfg(queue))) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            worker = start_worker(queue, repository, extra=("--access-log", str(log_file)))
            try:
                await asyncio.to_thread(wait_ready, worker)
                r = await client.post("/v1/inference", json=sleepy_job(0.0), headers=AUTH)
                request_id = r.json()["request_id"]
                job = await wait_job(client, request_id)
            finally:
                stop_process(worker)
    assert job["status"] == "completed", job
    (line,) = log_file.read_text().splitlines()
    assert re.fullmatch(rf"\S+Z jobs - sleepy 2 completed \d+\.\d{{3}}ms {request_id}", line), line


async def test_two_worker_processes_share_one_redis_queue(engine, repository, redis_url):
    async with serve(standalone_app(engine, _cfg(redis_url, lease=5.0))) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            workers = [start_worker(redis_url, repository, lease=5.0) for _ in range(2)]
            try:
                for w in workers:
                    await asyncio.to_thread(wait_ready, w)
                ids = []
                for i in range(8):
                    r = await client.post("/v1/inference", json=sleepy_job(0.25 + i / 1000),
                                          headers=AUTH)
                    ids.append(r.json()["request_id"])
                jobs = await asyncio.gather(*(wait_job(client, i, timeout=20) for i in ids))
            finally:
                for w in workers:
                    stop_process(w)
    assert [j["status"] for j in jobs] == ["completed"] * 8
    # which process ran each job: the store keeps the consumer (host:pid:random)
    queue = open_queue(redis_url)
    await queue.open()
    try:
        consumers = {(await queue.get(i)).worker.split(":")[1] for i in ids}
    finally:
        await queue.close()
    assert consumers == {str(w.pid) for w in workers}
    for i, job in enumerate(jobs):
        assert job["result"]["outputs"][0]["data"] == [pytest.approx(2 * (0.25 + i / 1000) + 1)]


# -- Redis over TLS --------------------------------------------------------------------------

def _client_tls(files: dict, *, certificate: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=files["ca"])
    if certificate:
        context.load_cert_chain(files["cert"], files["key"])
    return context


async def test_redis_tls_settings(tls_redis):
    """A context, or the URL's ssl_* options, set up TLS; without the CA or without a client
    certificate the server is refused or refuses."""
    url, files = tls_redis
    query = f"?ssl_ca_certs={files['ca']}&ssl_certfile={files['cert']}&ssl_keyfile={files['key']}"
    for client in (open_redis(url, _client_tls(files)), open_redis(url + query)):
        try:
            assert await client.set("mip:test:tls", "1") and await client.get("mip:test:tls") == "1"
        finally:
            await client.aclose()
    from redis.exceptions import ConnectionError as RedisConnectionError

    for client, error in ((open_redis(url), "CERTIFICATE_VERIFY_FAILED"),
                          (open_redis(url, _client_tls(files, certificate=False)), None)):
        try:
            with pytest.raises(RedisConnectionError, match=error):
                await client.ping()
        finally:
            await client.aclose()


async def test_worker_over_tls_redis(engine, repository, tls_redis):
    """``mip worker --queue rediss://… --tls-ca --tls-cert --tls-key`` runs a job submitted
    to a control plane that reaches the same Redis over TLS."""
    url, files = tls_redis
    cfg = _cfg(url, lease=5.0, client_ssl=_client_tls(files))
    async with serve(standalone_app(engine, cfg)) as base:
        async with httpx.AsyncClient(base_url=base) as client:
            worker = start_worker(url, repository, lease=5.0, extra=(
                "--tls-ca", files["ca"], "--tls-cert", files["cert"], "--tls-key", files["key"]))
            try:
                await asyncio.to_thread(wait_ready, worker)
                r = await client.post("/v1/inference", json=sleepy_job(0.5), headers=AUTH)
                assert r.status_code == 202, r.text
                job = await wait_job(client, r.json()["request_id"], timeout=20)
            finally:
                stop_process(worker)
    assert job["status"] == "completed", job
    assert job["result"]["outputs"][0]["data"] == [2.0]  # 2 * 0.5 + 1 (version 2)
    assert job["attempts"] == 1


async def test_default_queue_belongs_to_its_server(tmp_path, monkeypatch):
    """With no --queue, a server's SQLite file is named after its listener and held
    exclusively: a second server asking for the same one is refused, saying why."""
    from mip.errors import QueueInUse
    from mip.jobs.queue import default_sqlite_path

    monkeypatch.setenv("MIP_STATE_DIR", str(tmp_path))
    a = open_queue(None, owner="127.0.0.1:8000")
    b = open_queue(None, owner="127.0.0.1:8001")
    assert a.path == tmp_path / "jobs-127.0.0.1-8000.sqlite3" != b.path
    assert default_sqlite_path("[::1]:8000").name == "jobs-__1-8000.sqlite3"
    await a.open()
    await b.open()
    same = open_queue(None, owner="127.0.0.1:8000")
    with pytest.raises(QueueInUse, match=r"belongs to another running server \(pid \d+\)"):
        await same.open()
    await same.close()
    shared = open_queue(str(a.path))  # named on purpose: shared, not refused
    await shared.open()
    await shared.close()
    await a.close()
    again = open_queue(None, owner="127.0.0.1:8000")  # free once its server closed it
    await again.open()
    await again.close()
    await b.close()


async def test_two_servers_on_one_host_keep_their_own_jobs(repository, tmp_path):
    """Two `mip serve` processes with different models and no --queue: every job sent to one
    is run by that one (they used to share one file and take each other's jobs)."""
    import os
    import subprocess
    import sys

    from _miaas import MAIN, identity_job
    from _serve_process import free_port

    env = dict(os.environ, MIP_API_KEYS=API_KEY, PYTHONPATH=str(MAIN),
               MIP_STATE_DIR=str(tmp_path / "state"))
    ports, procs = [free_port(), free_port()], []
    try:
        for port, model in zip(ports, ("identity", "sleepy")):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "mip.cli", "--log-level", "WARNING", "serve",
                 "--model-repository", str(repository), "--model", model, "--mip", "none",
                 "--grpc", "none", "--http", f"127.0.0.1:{port}", "--rate-limit", "1000/s"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=str(MAIN)))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports[0]}") as client:
            for _ in range(300):  # up to 30 s for both processes to listen
                try:
                    for port in ports:
                        (await client.get(f"http://127.0.0.1:{port}/v2/health/live")).raise_for_status()
                    break
                except httpx.HTTPError:
                    assert all(p.poll() is None for p in procs), procs[0].stderr.read().decode()
                    await asyncio.sleep(0.1)
            ids = []
            for _ in range(30):
                r = await client.post("/v1/inference", json=identity_job(), headers=AUTH)
                assert r.status_code == 202, r.text
                ids.append(r.json()["request_id"])
            for request_id in ids:
                job = await wait_job(client, request_id)
                assert job["status"] == "completed", job
        assert sorted(p.name for p in (tmp_path / "state").glob("jobs-*.sqlite3")) == sorted(
            f"jobs-127.0.0.1-{port}.sqlite3" for port in ports)
    finally:
        for proc in procs:
            stop_process(proc)
