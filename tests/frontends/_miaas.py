"""Shared pieces of the /v1 tests: a real redis-server, a uvicorn server on a free port,
a model repository with a Python model that sleeps, and bounded polling."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _reachable(host: str, port: int) -> None:
    """Returns once a TCP connection to host:port opens (raises OSError otherwise)."""
    socket.create_connection((host, port), 0.2).close()


@contextlib.contextmanager
def redis_server(*options: str, bind: str = "127.0.0.1", prefix=(), reachable=_reachable):
    """A private redis-server on 127.0.0.1 (skipped when the binary is missing); yields the
    port it listens on: a free port, plain TCP by default, or TLS with ``"tls"`` as the
    first option followed by the ``--tls-*`` options. Elsewhere: `bind` (the address),
    `prefix` (the command that runs it, such as ``ip netns exec NS``) and `reachable`
    (``reachable(bind, port)`` raises OSError until the server accepts connections)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    ports = (["--port", "0", "--tls-port", str(port), *options[1:]] if options[:1] == ("tls",)
             else ["--port", str(port), *options])
    proc = subprocess.Popen([*prefix, binary, *ports, "--bind", bind, "--save", "",
                             "--appendonly", "no", "--protected-mode", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 10
        while time.monotonic() < end:
            with contextlib.suppress(OSError):
                reachable(bind, port)
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("redis-server did not start")
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def redis_url():
    """A private redis-server on a free port."""
    with redis_server() as port:
        yield f"redis://127.0.0.1:{port}/0"


@pytest.fixture(scope="session")
def tls_redis(tmp_path_factory):
    """A private redis-server that speaks only TLS and requires client certificates, with
    certificates made by trustme: ``(url, files)``, ``files`` holding the PEM paths ``ca``,
    ``cert`` and ``key`` of a client certificate the server accepts."""
    import trustme

    folder = tmp_path_factory.mktemp("redis-tls")
    ca = trustme.CA()
    server, client = ca.issue_cert("127.0.0.1"), ca.issue_cert("mip-worker")
    files = {name: str(folder / f"{name}.pem") for name in
             ("ca", "server-cert", "server-key", "cert", "key")}
    ca.cert_pem.write_to_path(files["ca"])
    server.cert_chain_pems[0].write_to_path(files["server-cert"])
    server.private_key_pem.write_to_path(files["server-key"])
    client.cert_chain_pems[0].write_to_path(files["cert"])
    client.private_key_pem.write_to_path(files["key"])
    with redis_server("tls", "--tls-cert-file", files["server-cert"], "--tls-key-file",
                      files["server-key"], "--tls-ca-cert-file", files["ca"],
                      "--tls-auth-clients", "yes") as port:
        yield f"rediss://127.0.0.1:{port}/0", files


@pytest.fixture
def fresh_redis(redis_url):
    """``redis_url`` with its database emptied first."""
    import redis

    with redis.Redis.from_url(redis_url) as client:
        client.flushdb()
    return redis_url


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


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
