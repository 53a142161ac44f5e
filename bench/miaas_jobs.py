"""MIaaS jobs per second, submit -> completed, against a direct KServe v2 REST call.

For each queue backend (SQLite, and Redis when ``redis-server`` is installed) and each
demo model (``identity`` 1x16 FP32, ``mlp`` 1x784 FP32), ``--concurrency`` clients run for
``--seconds`` each:

* **v2**: ``POST /v2/models/{m}/infer`` with a JSON body; one answer per request.
* **jobs**: ``POST /v1/inference`` (202), then ``GET /v1/inference/{id}`` after
  ``--poll`` seconds, doubling up to 50 ms, until ``completed``. A job counts when its
  completion is seen, so its latency includes up to one polling interval.

Both APIs are served by one uvicorn server on 127.0.0.1 and one engine, with the load
generator (httpx) in the same process: the numbers compare the two paths under the same
conditions, not the server's ceiling. Prints jobs/s, mean latency and the ratio to /v2.

    python bench/miaas_jobs.py                     # about 4 x 2 x 3 s
    python bench/miaas_jobs.py --seconds 1 --json /tmp/miaas.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

API_KEY = "bench-key"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
SHAPES = {"identity": 16, "mlp": 784}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _redis_server():
    """A private redis-server on a free port, or ``None`` when not installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    port = _free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 10
        while time.monotonic() < end:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def _body(model: str) -> dict:
    data = np.random.default_rng(0).standard_normal(SHAPES[model]).astype(np.float32)
    return {"inputs": [{"name": "input", "shape": [1, SHAPES[model]], "datatype": "FP32",
                        "data": data.tolist()}]}


async def _load(worker, concurrency: int, seconds: float) -> tuple[int, float]:
    """Run ``worker()`` in ``concurrency`` loops for ``seconds``; (count, mean latency s)."""
    end = time.monotonic() + seconds
    latencies: list[float] = []

    async def loop():
        while time.monotonic() < end:
            start = time.monotonic()
            await worker()
            latencies.append(time.monotonic() - start)

    started = time.monotonic()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    return len(latencies) / elapsed, (sum(latencies) / len(latencies) if latencies else 0.0)


async def _cell(client, model: str, concurrency: int, seconds: float, poll: float):
    body = _body(model)

    async def direct():
        r = await client.post(f"/v2/models/{model}/infer", json=body)
        r.raise_for_status()

    async def job():
        r = await client.post("/v1/inference", headers=HEADERS,
                              json={"model_id": model, "input_data": body})
        r.raise_for_status()
        request_id = r.json()["request_id"]
        delay, end = poll, time.monotonic() + 30  # bounded: 30 s a job at most
        while time.monotonic() < end:
            await asyncio.sleep(delay)
            r = await client.get(f"/v1/inference/{request_id}", headers=HEADERS)
            status = r.json()["status"]
            if status == "completed":
                return
            if status == "failed":
                raise RuntimeError(r.text)
            delay = min(delay * 2, 0.05)
        raise TimeoutError(request_id)

    await _load(direct, concurrency, min(seconds, 0.5))  # warm-up
    v2 = await _load(direct, concurrency, seconds)
    jobs = await _load(job, concurrency, seconds)
    return v2, jobs


async def _run(args) -> list[dict]:
    import httpx
    import uvicorn

    from mip.frontends.miaas import MiaasConfig, build_miaas_app
    from mip.frontends.auth import hash_key
    from mip.frontends.oip.rest import build_app
    from mip.serving.demo import build_demo_repository
    from mip.serving.engine import Engine
    from mip.serving.repository import ModelRepository
    from starlette.routing import Mount

    engine = Engine(ModelRepository(build_demo_repository()))
    await engine.start()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, _redis_server() as redis_url:
        backends = [("sqlite", str(Path(tmp) / "jobs.sqlite3"))]
        if redis_url:
            backends.append(("redis", redis_url))
        else:
            print("redis-server not installed: Redis rows skipped", file=sys.stderr)
        for backend, queue in backends:
            config = MiaasConfig(api_keys=[hash_key(API_KEY)], queue=queue,
                                 rate_limit="10000000/min", job_workers=args.workers,
                                 max_jobs=1_000_000)
            miaas = build_miaas_app(engine, config)
            service = miaas.state.service
            app = build_app(engine, extra_routes=[Mount("/v1", app=miaas)])
            await service.start()
            port = _free_port()
            server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                                   log_level="warning", lifespan="off"))
            task = asyncio.get_running_loop().create_task(server.serve())
            try:
                for _ in range(200):
                    if server.started:
                        break
                    await asyncio.sleep(0.05)
                limits = httpx.Limits(max_connections=args.concurrency * 2)
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                             limits=limits, timeout=30) as client:
                    for model in ("identity", "mlp"):
                        (v2_rate, v2_lat), (job_rate, job_lat) = await _cell(
                            client, model, args.concurrency, args.seconds, args.poll)
                        row = {"backend": backend, "model": model, "v2_per_s": v2_rate,
                               "v2_latency_ms": v2_lat * 1e3, "jobs_per_s": job_rate,
                               "job_latency_ms": job_lat * 1e3,
                               "jobs_vs_v2": job_rate / v2_rate if v2_rate else 0.0}
                        rows.append(row)
                        print(f"{backend:6} {model:8}  v2 {v2_rate:8.0f}/s {v2_lat * 1e3:7.2f} ms"
                              f"   jobs {job_rate:7.0f}/s {job_lat * 1e3:7.2f} ms"
                              f"   jobs/v2 {row['jobs_vs_v2']:.2f}", flush=True)
            finally:
                server.should_exit = True
                await asyncio.wait_for(task, 10)
                await service.stop()
    await engine.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="measured seconds per cell and path (default 3)")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="client loops at once (default 16)")
    parser.add_argument("--poll", type=float, default=0.002,
                        help="first wait before polling a job, doubled up to 0.05 (default 0.002)")
    parser.add_argument("--workers", type=int, default=16,
                        help="in-process job workers (default 16)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    rows = asyncio.run(_run(args))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
