"""Shared pieces of the /v1 tests: a uvicorn server on a free port, a model repository
with a Python model that sleeps, ``mip worker`` processes, and bounded polling (Redis:
the ``redis_url`` and ``tls_redis`` fixtures of tests/conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _serve_process import free_port

API_KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAIN = Path(__file__).resolve().parents[2]

# A tensor model: y = 2 * x, after sleeping max(x) seconds (so a test picks how long a job
# runs by what it sends). Version 2 adds 1 to tell the versions apart.
SLEEPY = """
import time
import numpy as np

class Sleepy:
    inputs = [("x", "FP32", [-1, 1])]
    outputs = [("y", "FP32", [-1, 1])]

    def infer(self, inputs):
        x = inputs["x"]
        time.sleep(float(min(max(x.max(), 0.0), 30.0)))
        return {"y": (x * 2 + OFFSET).astype(np.float32)}
"""


def build_repository(root: Path) -> Path:
    """``identity`` and ``mlp`` (the demo ONNX models) and ``sleepy`` versions 1 and 2."""
    from mip.serving.demo import build_demo_repository

    build_demo_repository(root)
    for version, offset in (("1", 0), ("2", 1)):
        folder = root / "sleepy" / version
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.py").write_text(SLEEPY.replace("OFFSET", str(offset)))
    (root / "sleepy" / "config.json").write_text(
        '{"max_batch_size": 8, "dynamic_batching": {}, "version_policy": {"all": {}}}')
    return root


def sleepy_job(seconds: float = 0.0, model: str = "sleepy") -> dict:
    """A submit body for ``sleepy``: one row whose value is the sleep in seconds."""
    return {"model_id": model, "input_data": {"inputs": [
        {"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [seconds]}]}}


def identity_job(values=None) -> dict:
    values = list(range(16)) if values is None else values
    return {"model_id": "identity", "input_data": {"inputs": [
        {"name": "input", "shape": [1, 16], "datatype": "FP32", "data": values}]}}


@contextlib.asynccontextmanager
async def serve(app, ssl_certfile=None, ssl_keyfile=None):
    """Run ``app`` with uvicorn on 127.0.0.1:free port in this event loop; yields the base
    URL (http or https). Start and stop are each bounded to 10 s."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            lifespan="on", ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # uvicorn < 0.29 compatibility
    task = asyncio.get_running_loop().create_task(server.serve())
    for _ in range(200):
        if server.started or task.done():
            break
        await asyncio.sleep(0.05)
    if not server.started:
        task.cancel()
        raise RuntimeError("uvicorn did not start")
    scheme = "https" if ssl_certfile else "http"
    try:
        yield f"{scheme}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def wait_job(client, request_id: str, *, timeout: float = 15.0,
                   until=("completed", "failed"), headers=AUTH) -> dict:
    """Poll ``GET /v1/inference/{id}`` (every 20 ms, at most ``timeout`` s) until the job's
    status is in ``until``; returns the last body."""
    end = time.monotonic() + timeout
    while True:
        response = await client.get(f"/v1/inference/{request_id}", headers=headers)
        assert response.status_code == 200, response.text
        body = response.json()
        if body["status"] in until or time.monotonic() > end:
            return body
        await asyncio.sleep(0.02)


@pytest.fixture(scope="session")
def repository(tmp_path_factory) -> Path:
    return build_repository(tmp_path_factory.mktemp("miaas-models"))


@pytest.fixture
async def engine(repository):
    from mip.serving.engine import Engine
    from mip.serving.repository import ModelRepository

    engine = Engine(ModelRepository(repository))
    await engine.start()
    yield engine
    await engine.stop()


def start_worker(queue: str, repository: Path, *, lease: float = 1.0,
                 concurrency: int = 1, extra=()) -> subprocess.Popen:
    """A ``mip worker`` process; its stdout says when it takes jobs."""
    env = dict(os.environ, PYTHONPATH=str(MAIN) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-m", "mip.cli", "--log-level", "WARNING", "worker", "--queue", queue,
         "--model-repository", str(repository), "--model", "sleepy", "--job-lease", str(lease),
         "--concurrency", str(concurrency), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(MAIN))


def wait_ready(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Block until a worker printed its start line (at most ``timeout`` s)."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if sel.select(timeout=0.2):
            line = proc.stdout.readline()
            if b"taking jobs" in line:
                return
            if not line:
                break
    raise RuntimeError(f"worker did not start: {proc.stderr.read1(4096) if proc.poll() else ''}")
