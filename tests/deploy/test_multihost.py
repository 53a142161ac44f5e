"""Several hosts without a cluster: network namespaces joined by a bridge (tests/deploy/
_netns.py; as root, as CI runs), each process on a host of its own.

* Two ``mip serve`` replicas behind one name that resolves to both addresses: a client on a
  third host, balancing across them with ``mip.Client("tcp://replicas:7070")``, gets every
  answer while one replica is killed (SIGKILL) and started again, and uses it again after.
* The /v1 jobs API across hosts: Redis on one host, ``mip serve`` (the control plane, no
  job run in-process) on another, ``mip worker``s on a third, jobs submitted from a fourth.
  The Redis queue delivers a job at least once (again after the lease of a worker that went
  silent) and keeps the first outcome stored; a worker killed in the middle of a job never
  finishes it, so the job is run to its end exactly once, by the next worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _netns import Network, require
from _redis import redis_server
from _serve_process import start, stop

from frontends._miaas import API_KEY, AUTH

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
ENV = {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


@pytest.fixture(autouse=True)
def _root_and_ip():
    require()


def _until(predicate, timeout: float, what: str, every: float = 0.1):
    """Call `predicate` until it returns something true (at most `timeout` s); returns it."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


# -- replicas behind one name ----------------------------------------------------------------

def _replica(net: Network, host: str, repo: Path, log: Path) -> subprocess.Popen:
    process, _ = start(["--model-repository", str(repo), "--model", "identity",
                        "--mip", "tcp://0.0.0.0:7070", "--http", "none", "--grpc", "none",
                        "--access-log", str(log)], 1, timeout=60,
                       prefix=net.command(host, []))
    net.processes.append(process)
    return process


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


class _Client:
    """tests/deploy/_balance_client.py on a host: its counts on demand."""

    def __init__(self, net: Network, host: str, url: str):
        self.process = net.popen(host, [sys.executable, str(HERE / "_balance_client.py"), url],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env=dict(os.environ, **ENV))
        assert self.process.stdout.readline().strip() == "ready"

    def ask(self, command: str = "count") -> tuple[int, int, str]:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        _, ok, _, failed, first = self.process.stdout.readline().split(" ", 4)
        return int(ok), int(failed), first.strip()


def test_a_client_balancing_across_replicas_keeps_answering_while_one_restarts(tmp_path):
    from mip.serving.demo import build_demo_repository

    repo = build_demo_repository(tmp_path / "models")
    with Network("one", "two", "client") as net:
        net.names("client", {"replicas": [net.addresses["one"], net.addresses["two"]]})
        logs = {"one": tmp_path / "one.log", "two": tmp_path / "two.log",
                "one again": tmp_path / "one-again.log"}
        one = _replica(net, "one", repo, logs["one"])
        _replica(net, "two", repo, logs["two"])
        client = _Client(net, "client", "tcp://replicas:7070")
        _until(lambda: client.ask()[0] >= 50, 30, "answers from the replicas")
        # both take requests (access lines reach the file within half a second)
        _until(lambda: _lines(logs["one"]) > 0 and _lines(logs["two"]) > 0, 10,
               "access lines of both replicas")

        one.send_signal(signal.SIGKILL)
        one.wait(10)
        served = client.ask()[0]
        _until(lambda: client.ask()[0] >= served + 100, 30, "answers while one replica is down")

        _replica(net, "one", repo, logs["one again"])
        _until(lambda: _lines(logs["one again"]) >= 20, 30, "the restarted replica's answers")
        ok, failed, first_error = client.ask("stop")
        assert client.process.wait(30) == 0
    assert failed == 0, first_error
    assert ok >= served + 100


# -- jobs across hosts -------------------------------------------------------------------------

#: y = 2x after sleeping max(x) seconds; each finished run appends "PID VALUE" to RUNS
RECORDED = '''
import os
import time

import numpy as np


class Recorded:
    inputs = [("x", "FP32", [-1, 1])]
    outputs = [("y", "FP32", [-1, 1])]

    def infer(self, inputs):
        x = inputs["x"]
        time.sleep(float(min(max(x.max(), 0.0), 30.0)))
        with open(RUNS, "a") as runs:
            runs.writelines(f"{os.getpid()} {value}\\n" for value in x.ravel())
        return {"y": (x * 2).astype(np.float32)}
'''


def _job(value: float) -> dict:
    return {"model_id": "recorded", "input_data": {"inputs": [
        {"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [value]}]}}


def _http(method: str, url: str, body: dict | None = None) -> dict:
    """One request of the /v1 API (with the API key): the JSON it answers."""
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={**AUTH, "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


async def _consumers(queue_url: str, ids: list[str]) -> list[str]:
    """The consumer (worker) whose outcome the queue stored, of each job."""
    from mip.jobs.queue import open_queue

    queue = open_queue(queue_url)
    await queue.open()
    try:
        return [(await queue.get(i)).worker for i in ids]
    finally:
        await queue.close()


def _worker(net: Network, host: str, queue: str, repo: Path) -> subprocess.Popen:
    process, _ = start(["--queue", queue, "--model-repository", str(repo), "--model",
                        "recorded", "--job-lease", "1", "--concurrency", "1"], 1, timeout=60,
                       command="worker", pattern="mip: worker taking jobs",
                       prefix=net.command(host, []))
    net.processes.append(process)
    return process


def test_jobs_submitted_on_one_host_run_once_on_a_worker_of_another_across_a_kill(tmp_path):
    repo, runs = tmp_path / "models", tmp_path / "runs.txt"
    (repo / "recorded" / "1").mkdir(parents=True)
    (repo / "recorded" / "1" / "model.py").write_text(RECORDED.replace("RUNS", repr(str(runs))))
    (repo / "recorded" / "config.json").write_text('{"max_batch_size": 8}')

    with Network("redis", "api", "workers", "client") as net:
        def reachable(host, port):
            net.call("redis", lambda: socket.create_connection((host, port), 0.2).close())

        with redis_server(bind=net.addresses["redis"], prefix=net.command("redis", []),
                          reachable=reachable) as redis_port:
            queue = f"redis://{net.addresses['redis']}:{redis_port}/0"
            api, _ = start(["--model-repository", str(repo), "--model", "recorded",
                            "--mip", "none", "--grpc", "none", "--http", "0.0.0.0:8000",
                            "--queue", queue, "--job-workers", "0", "--job-lease", "1"], 1,
                           timeout=60, prefix=net.command("api", []),
                           env={"MIP_API_KEYS": API_KEY})
            net.processes.append(api)
            base = f"http://{net.addresses['api']}:8000/v1/inference"

            def submit(value: float) -> str:
                return net.call("client", _http, "POST", base, _job(value))["request_id"]

            def status(request_id: str) -> dict:
                return net.call("client", _http, "GET", f"{base}/{request_id}")

            victim = _worker(net, "workers", queue, repo)
            doomed = submit(2.0)  # the model runs 2 s: the worker is killed in the middle
            _until(lambda: status(doomed)["status"] == "processing", 30, "the job taken")
            assert status(doomed)["attempts"] == 1
            time.sleep(0.3)
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            others = [submit(0.01 * (i + 1)) for i in range(6)]
            rescuer = _worker(net, "workers", queue, repo)
            ids = [doomed, *others]
            done = _until(lambda: (lambda jobs: jobs if all(
                j["status"] in ("completed", "failed") for j in jobs) else None)(
                [status(i) for i in ids]), 60, "every job finished", every=0.2)
            consumers = net.call("client", asyncio.run, _consumers(queue, ids))
            stop(rescuer)
            stop(api)

    assert [job["status"] for job in done] == ["completed"] * 7, done
    assert done[0]["attempts"] == 2  # delivered again once the killed worker's lease ran out
    assert done[0]["result"]["outputs"][0]["data"] == [4.0]
    # every job's model run finished once, on the second worker (the killed one finished none)
    finished = [line.split() for line in runs.read_text().splitlines()]
    assert sorted(float(value) for _, value in finished) == pytest.approx(
        sorted([2.0] + [0.01 * (i + 1) for i in range(6)]))
    assert {pid for pid, _ in finished} == {str(rescuer.pid)}
    # and the stored outcome of each is the second worker's (the store names its consumer:
    # host:pid:random)
    assert [consumer.split(":")[1] for consumer in consumers] == [str(rescuer.pid)] * 7
