# ruff: noqa: F811  (pytest fixtures imported from _miaas are arguments here)
"""The /v1 API over a real uvicorn server: jobs, registry, health, errors, OpenAPI, TLS,
push over MSIP, and a control-plane restart with queued SQLite jobs."""

from __future__ import annotations

import asyncio
import gzip
import json
import ssl

import httpx
import numpy as np
import pytest
from _miaas import (  # noqa: F401
    API_KEY,
    AUTH,
    engine,
    identity_job,
    repository,
    serve,
    sleepy_job,
    wait_job,
)

from mip.frontends.miaas import MiaasConfig, standalone_app
from mip.frontends.auth import hash_key
from mip.frontends.miaas.openapi import PATHS

pytestmark = pytest.mark.timeout(60)


def config(tmp_path, **kwargs) -> MiaasConfig:
    kwargs.setdefault("queue", str(tmp_path / "jobs.sqlite3"))
    return MiaasConfig(api_keys=[hash_key(API_KEY)], **kwargs)


async def test_health(engine, tmp_path):
    async with serve(standalone_app(engine, config(tmp_path))) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            r = await client.get("/v1/health", headers=AUTH)
            assert r.status_code == 200
            assert r.json()["status"] == "healthy"
            assert r.json()["timestamp"].endswith("Z")
            r = await client.get("/v1/health")
            assert r.status_code == 401
            assert r.json()["error"]["code"] == "unauthorized"
            assert r.headers["www-authenticate"].startswith("Bearer")


async def test_open_health_needs_the_flag(engine, tmp_path):
    async with serve(standalone_app(engine, config(tmp_path, open_health=True))) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/v1/health")).status_code == 200
            assert (await client.get("/v1/models")).status_code == 401


async def test_submit_poll_result(engine, tmp_path):
    async with serve(standalone_app(engine, config(tmp_path))) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            r = await client.post("/v1/inference", json=identity_job(), headers=AUTH)
            assert r.status_code == 202, r.text
            body = r.json()
            assert body["status"] == "queued" and len(body["request_id"]) == 32
            assert r.headers["location"] == f"/v1/inference/{body['request_id']}"
            job = await wait_job(client, body["request_id"])
            assert job["status"] == "completed", job
            assert job["request_id"] == body["request_id"]
            assert job["timestamp"].endswith("Z")
            (output,) = job["result"]["outputs"]
            assert output == {"name": "output", "datatype": "FP32", "shape": [1, 16],
                              "data": [float(i) for i in range(16)]}
            assert job["result"]["model_name"] == "identity"
            assert job["result"]["model_version"] == "1"


async def test_mlp_job_matches_direct_call(engine, tmp_path):
    x = np.random.default_rng(3).standard_normal((2, 784)).astype(np.float32)
    direct = (await engine.infer("mlp", {"input": x}))["logits"]
    body = {"model_id": "mlp:1", "input_data": {
        "inputs": [{"name": "input", "shape": [2, 784], "datatype": "FP32",
                    "data": x.tolist()}], "outputs": [{"name": "logits"}]}}
    async with serve(standalone_app(engine, config(tmp_path))) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            r = await client.post("/v1/inference", json=body, headers=AUTH)
            job = await wait_job(client, r.json()["request_id"])
    (output,) = job["result"]["outputs"]
    assert output["shape"] == [2, 10]
    np.testing.assert_allclose(np.array(output["data"]).reshape(2, 10), direct, rtol=1e-6)


async def test_versions_by_model_id(engine, tmp_path):
    async with serve(standalone_app(engine, config(tmp_path))) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            ids = {}
            for model_id in ("sleepy", "sleepy:1", "sleepy:2"):
                r = await client.post("/v1/inference", headers=AUTH,
                                      json=sleepy_job(0.0, model_id) | {"parameters": {
                                          "timeout": 5}})
                assert r.status_code == 202, r.text
                ids[model_id] = r.json()["request_id"]
            results = {m: (await wait_job(client, i))["result"] for m, i in ids.items()}
    assert results["sleepy"]["model_version"] == "2"
    assert results["sleepy:1"]["outputs"][0]["data"] == [0.0]
    assert results["sleepy:2"]["outputs"][0]["data"] == [1.0]


async def test_failed_job_reports_its_error(engine, tmp_path):
    async with serve(standalone_app(engine, config(tmp_path))) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            r = await client.post("/v1/inference", headers=AUTH,
                                  json=sleepy_job(1.0) | {"parameters": {"timeout": 0.2}})
            job = await wait_job(client, r.json()["request_id"])
    assert job["status"] == "failed"
    assert job["result"] is None
    assert job["error"]["code"] == "deadline_exceeded"


async def test_models_registry(engine, tmp_path):
    async with serve(standalone_app(engine, config(tmp_path))) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            r = await client.get("/v1/models", headers=AUTH)
            assert r.status_code == 200
            models = {m["id"]: m for m in r.json()["models"]}
            assert models["identity:1"] == {"id": "identity:1", "name": "identity",
                                            "version": "1", "status": "active",
                                            "state": "READY", "ready": True}
            assert models["sleepy:2"]["status"] == "active"
            assert models["sleepy:1"]["status"] == "deprecated"
            r = await client.get("/v1/models/mlp", headers=AUTH)
            assert r.status_code == 200
            details = r.json()
            assert details["id"] == "mlp:1" and details["framework"] == "onnxruntime_onnx"
            assert details["input_schema"] == {"inputs": [
                {"name": "input", "datatype": "FP32", "shape": [-1, 784]}]}
            assert details["output_schema"] == {"outputs": [
                {"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]}
            r = await client.get("/v1/models/sleepy:1", headers=AUTH)
            assert r.json()["status"] == "deprecated" and r.json()["framework"] == "python"
            for missing in ("nope", "mlp:9"):
                r = await client.get(f"/v1/models/{missing}", headers=AUTH)
                assert r.status_code == 404
                assert r.json()["error"]["code"] == "model_not_found"


MALFORMED = [
    (b"{not json", "invalid_json"),
    (b"[1, 2]", "invalid_request"),
    (json.dumps({"input_data": {}}).encode(), "invalid_request"),
    (json.dumps({"model_id": 3, "input_data": {}}).encode(), "invalid_request"),
    (json.dumps({"model_id": "identity"}).encode(), "invalid_request"),
    (json.dumps(identity_job() | {"extra": 1}).encode(), "invalid_request"),
    (json.dumps(identity_job() | {"parameters": []}).encode(), "invalid_request"),
    (json.dumps(identity_job() | {"parameters": {"timeout": -1}}).encode(), "invalid_request"),
    (json.dumps({"model_id": "identity", "input_data": []}).encode(), "invalid_input"),
    (json.dumps({"model_id": "identity", "input_data": {"inputs": []}}).encode(),
     "invalid_input"),
    (json.dumps(identity_job(list(range(15)))).encode(), "invalid_input"),
    (json.dumps(identity_job(["a"] * 16)).encode(), "invalid_input"),
    (json.dumps({"model_id": "identity", "input_data": {"inputs": [
        {"name": "input", "shape": [1, 16], "datatype": "FP99", "data": [0] * 16}]}}).encode(),
     "invalid_input"),
    (json.dumps({"model_id": "identity", "input_data": {"inputs": [
        {"name": "other", "shape": [1, 16], "datatype": "FP32", "data": [0] * 16}]}}).encode(),
     "invalid_input"),
    (json.dumps({"model_id": "identity", "input_data": {"inputs": [
        {"name": "input", "shape": [16], "datatype": "FP32", "data": [0] * 16}]}}).encode(),
     "invalid_input"),
    (json.dumps({"model_id": "identity", "input_data": {"inputs": [
        {"name": "input", "shape": [1, 16], "datatype": "INT32", "data": [0] * 16}]}}).encode(),
     "invalid_input"),
    (json.dumps(identity_job() | {"input_data": identity_job()["input_data"] | {
        "outputs": [{"name": "nope"}]}}).encode(), "invalid_input"),
    # data nested deeper than a tensor can have dimensions: refused as /v2 refuses it
    (json.dumps(identity_job(json.loads("[" * 40 + "0" + "]" * 40))).encode(),
     "invalid_input"),
]


async def test_malformed_bodies_get_400(engine, tmp_path):
    async with serve(standalone_app(engine, config(tmp_path, job_workers=0))) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            for body, code in MALFORMED:
                r = await client.post("/v1/inference", content=body,
                                      headers=AUTH | {"content-type": "application/json"})
                assert r.status_code == 400, (body, r.text)
                error = r.json()["error"]
                assert error["code"] == code, (body, error)
                assert error["message"]
            r = await client.post("/v1/inference", headers=AUTH,
                                  json=identity_job() | {"model_id": "nope"})
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
            r = await client.get("/v1/inference/0123", headers=AUTH)
            assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
            r = await client.delete("/v1/models", headers=AUTH)
            assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
            r = await client.get("/v1/nothing", headers=AUTH)
            assert r.status_code == 404 and "error" in r.json()


async def test_body_size_limit(engine, tmp_path):
    app = standalone_app(engine, config(tmp_path, job_workers=0, max_body=1024))
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
        r = await client.post("/v1/inference", headers=AUTH,
                              json=identity_job() | {"parameters": {"pad": "x" * 2000}})
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "payload_too_large"


async def test_compressed_body_within_the_limit(engine, tmp_path):
    app = standalone_app(engine, config(tmp_path, job_workers=0, max_body=1024))
    gzipped = {**AUTH, "Content-Encoding": "gzip", "Content-Type": "application/json"}
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
        r = await client.post("/v1/inference", headers=gzipped,
                              content=gzip.compress(json.dumps(identity_job()).encode()))
        assert r.status_code == 202
        padded = identity_job() | {"parameters": {"pad": " " * 4000}}  # 1024 once compressed
        r = await client.post("/v1/inference", headers=gzipped,
                              content=gzip.compress(json.dumps(padded).encode()))
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "payload_too_large"
        r = await client.post("/v1/inference", headers=gzipped, content=b"not gzip")
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_input"


async def test_queue_full_is_503(engine, tmp_path):
    async with serve(standalone_app(engine, config(tmp_path, job_workers=0,
                                                   max_jobs=2))) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            for _ in range(2):
                r = await client.post("/v1/inference", json=identity_job(), headers=AUTH)
                assert r.status_code == 202
            r = await client.post("/v1/inference", json=identity_job(), headers=AUTH)
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "queue_full"


async def test_queue_full_is_503_on_redis(engine, redis_url):  # noqa: F811
    cfg = MiaasConfig(api_keys=[hash_key(API_KEY)], queue=redis_url, job_workers=0, max_jobs=1)
    async with serve(standalone_app(engine, cfg)) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            assert (await client.post("/v1/inference", json=identity_job(),
                                      headers=AUTH)).status_code == 202
            r = await client.post("/v1/inference", json=identity_job(), headers=AUTH)
            assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"


async def test_openapi_matches_routes(engine, tmp_path):
    app = standalone_app(engine, config(tmp_path))
    mounted = app.routes[0]
    served = {("/v1" + route.path, method) for route in mounted.app.routes
              for method in route.methods - {"HEAD"}}
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
        r = await client.get("/v1/openapi.json", headers=AUTH)
        assert r.status_code == 200
        document = r.json()
        assert (await client.get("/v1/openapi.json")).status_code == 401
    assert document["openapi"].startswith("3.")
    documented = {(path, method.upper()) for path, item in document["paths"].items()
                  for method in item}
    assert documented == served
    assert set(document["paths"]) == set(PATHS)
    submit = document["paths"]["/v1/inference"]["post"]["responses"]
    assert {"202", "400", "401", "404", "429", "503"} <= set(submit)
    refs = json.dumps(document)
    for name in document["components"]["schemas"]:
        assert f"#/components/schemas/{name}" in refs or name == "Error"


async def test_tls_listener(engine, tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    app = standalone_app(engine, config(tmp_path))
    async with serve(app, ssl_certfile=str(cert_file), ssl_keyfile=str(key_file)) as url:
        assert url.startswith("https://")
        async with httpx.AsyncClient(base_url=url, verify=client_ctx) as client:
            r = await client.post("/v1/inference", json=identity_job(), headers=AUTH)
            assert r.status_code == 202
            assert (await wait_job(client, r.json()["request_id"]))["status"] == "completed"
        async with httpx.AsyncClient(base_url=url) as untrusting:
            with pytest.raises(httpx.ConnectError):
                await untrusting.get("/v1/health", headers=AUTH)


async def test_outcome_pushed_over_msip(engine, tmp_path):
    from mip.net.msip_broker import Broker
    from mip.net.msip_client import AsyncClient

    broker = Broker()
    address = await broker.start("tcp://127.0.0.1:0")
    broker_url = f"tcp://127.0.0.1:{address.port}" if hasattr(address, "port") else str(address)
    try:
        app = standalone_app(engine, config(tmp_path, job_workers=0, msip_push=broker_url))
        async with serve(app) as url, AsyncClient(broker_url) as subscriber:
            async with httpx.AsyncClient(base_url=url) as client:
                r = await client.post("/v1/inference", json=sleepy_job(0.0), headers=AUTH)
                request_id = r.json()["request_id"]
                subscription = await subscriber.subscribe(f"jobs.{request_id}")
                service = app.state.service
                from mip.frontends.miaas.runner import JobRunner
                from mip.jobs.worker import JobWorker
                worker = JobWorker(service.queue, JobRunner(engine), concurrency=1,
                                   publisher=service.publisher, poll=0.1)
                worker.start()
                try:
                    event = await subscription.get(timeout=10)
                finally:
                    await worker.stop()
                pushed = json.loads(bytes(event.data))
                polled = await wait_job(client, request_id)
        assert pushed == polled
        assert pushed["status"] == "completed"
    finally:
        await broker.stop()


async def test_restart_loses_no_queued_job(engine, tmp_path):
    """Jobs accepted by a control plane with no workers survive its shutdown and complete
    after a restart on the same SQLite file."""
    ids = []
    async with serve(standalone_app(engine, config(tmp_path, job_workers=0))) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            for i in range(20):
                r = await client.post("/v1/inference", json=identity_job([float(i)] * 16),
                                      headers=AUTH)
                assert r.status_code == 202
                ids.append(r.json()["request_id"])
    async with serve(standalone_app(engine, config(tmp_path, job_workers=4))) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            jobs = await asyncio.gather(*(wait_job(client, i) for i in ids))
    for i, job in enumerate(jobs):
        assert job["status"] == "completed", job
        assert job["result"]["outputs"][0]["data"] == [float(i)] * 16


async def test_mip_serve_end_to_end(repository, tmp_path):  # noqa: F811
    """``mip serve`` with an API key, TLS and a SQLite queue: submit, poll, complete."""
    import os
    import subprocess
    import sys

    from _miaas import MAIN
    from _serve_process import free_port, stop_process

    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    port = free_port()
    env = dict(os.environ, MIP_API_KEYS=API_KEY, PYTHONPATH=str(MAIN))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mip.cli", "--log-level", "WARNING", "serve",
         "--model-repository", str(repository), "--model", "identity", "--mip", "none",
         "--grpc", "none", "--http", f"127.0.0.1:{port}", "--queue",
         str(tmp_path / "jobs.sqlite3"), "--tls-cert", str(tmp_path / "cert.pem"),
         "--tls-key", str(tmp_path / "key.pem"), "--rate-limit", "100/min"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(MAIN))
    try:
        async with httpx.AsyncClient(base_url=f"https://127.0.0.1:{port}",
                                     verify=context) as client:
            for _ in range(300):  # up to 30 s for the process to listen
                try:
                    r = await client.post("/v1/inference", json=identity_job(), headers=AUTH)
                    break
                except httpx.ConnectError:
                    assert proc.poll() is None, proc.stderr.read().decode()
                    await asyncio.sleep(0.1)
            assert r.status_code == 202, r.text
            assert r.headers["x-ratelimit-limit"] == "100"
            job = await wait_job(client, r.json()["request_id"])
            assert job["status"] == "completed"
            assert job["result"]["outputs"][0]["data"] == [float(i) for i in range(16)]
            assert (await client.get("/v2/health/live")).status_code == 200
            assert (await client.get("/v1/health")).status_code == 401
    finally:
        stop_process(proc)
