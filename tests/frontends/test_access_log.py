"""`mip serve --access-log`: one line a request on every protocol, with the client's request
id; `--log-format json`; request ids returned to REST and gRPC clients; the job queue's
depth and the process's CPU and memory in /metrics."""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import time

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from mip.frontends.oip import inference_pb2 as pb
from mip.net.mip_client import Client
from mip.serving.demo import build_demo_repository

from _oip_server import OipServer, add_python_model, grpc_implementations
from _serve_process import start as _start, stop as _stop

API_KEY = "access-log-test-key-0123456789"
BROKEN = '''
class Broken:
    """Fails on every batch."""
    inputs = [("x", "FP32", [-1, 1])]
    outputs = [("y", "FP32", [-1, 1])]

    def infer(self, inputs):
        raise RuntimeError("weights are missing")
'''
X = np.arange(16, dtype=np.float32).reshape(1, 16)
# time protocol peer model version status latency request-id
LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (\S+) (\S+) (\S+) (\S+) (\S+) "
                  r"(\d+\.\d{3})ms (\S+)$")


def _repository(tmp_path):
    repo = build_demo_repository(tmp_path / "repo")
    add_python_model(repo, "broken", BROKEN, {"max_batch_size": 4})
    return repo


def _serve(tmp_path, *options):
    os.environ["MIP_API_KEYS"] = API_KEY
    try:
        process, out = _start(["--model-repository", str(_repository(tmp_path)),
                               "--mip", "tcp://127.0.0.1:0", "--http", "127.0.0.1:0",
                               "--grpc", "127.0.0.1:0", "--queue", str(tmp_path / "jobs.sqlite"),
                               *options], 3)
    finally:
        del os.environ["MIP_API_KEYS"]
    urls = {name: re.search(pattern, out).group(1) for name, pattern in (
        ("mip", r"serving MIP on (\S+)"), ("grpc", r"KServe v2 gRPC on (\S+)"),
        ("http", r"REST and /metrics on http://(\S+)"))}
    return process, urls


def _grpc_input(name="input", data=X):
    tensor = grpcclient.InferInput(name, list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    return tensor


def _http_input(name="input", data=X):
    tensor = httpclient.InferInput(name, list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    return tensor


def _job(http_url: str) -> str:
    body = {"model_id": "identity", "input_data": {"inputs": [
        {"name": "input", "shape": [1, 16], "datatype": "FP32", "data": X.ravel().tolist()}]}}
    response = httpx.post(f"http://{http_url}/v1/inference", json=body,
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 202, response.text
    return response.json()["request_id"]


def _lines(path, count: int, timeout: float = 10.0) -> list[str]:
    """The file's first `count` lines, waiting for them at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_every_protocol_writes_one_access_line_a_request(tmp_path):
    """MIP, gRPC, REST and /v1 jobs, answered or refused: each request is one line with the
    time, protocol, peer, model, version, status in the protocol's terms, latency and the
    client's request id; the model's failure warning names the id too."""
    log_file = tmp_path / "access.log"
    process, urls = _serve(tmp_path, "--access-log", str(log_file))
    try:
        with Client(urls["mip"]) as client:
            client.infer([[X]], model="identity")
            with pytest.raises(Exception, match="no model named 'nosuch'"):
                client.infer([[X]], model="nosuch")
        with grpcclient.InferenceServerClient(urls["grpc"]) as g:
            g.infer("identity", [_grpc_input()], headers={"x-request-id": "grpc-1"})
            g.infer("identity", [_grpc_input()], request_id="grpc-oip-2")
            with pytest.raises(grpcclient.InferenceServerException, match="nosuch"):
                g.infer("nosuch", [_grpc_input()], headers={"x-request-id": "grpc-3"})
        rest = httpclient.InferenceServerClient(urls["http"])
        try:
            rest.infer("identity", [_http_input()], headers={"X-Request-ID": "http-1"})
            rest.infer("identity", [_http_input()], request_id="http-oip-2")
            with pytest.raises(httpclient.InferenceServerException, match="weights are missing"):
                rest.infer("broken", [_http_input("x", np.ones((1, 1), np.float32))],
                           headers={"X-Request-ID": "http-boom"})
        finally:
            rest.close()
        bad = httpx.post(f"http://{urls['http']}/v2/models/identity/infer", content=b"{nope",
                         headers={"X-Request-ID": "http-bad"})
        assert bad.status_code == 400 and bad.headers["x-request-id"] == "http-bad"
        forged = httpx.post(f"http://{urls['http']}/v2/models/identity/versions/1/infer", json={
            "id": "a\n2026-01-01T00:00:00.000Z http forged", "inputs": [
                {"name": "input", "shape": [1, 16], "datatype": "FP32",
                 "data": X.ravel().tolist()}]})
        assert forged.status_code == 200 and forged.json()["id"].startswith("a\n")
        job_id = _job(urls["http"])
        lines = _lines(log_file, 11)
    finally:
        assert _stop(process) == 0
    output = process.stdout.read()
    assert len(lines) == 11, lines
    fields = [LINE.match(line) for line in lines]
    assert all(fields), lines
    records = {(m.group(2), m.group(8)): m for m in fields}  # (protocol, request id)
    now = datetime.datetime.now(datetime.timezone.utc)
    for m in fields:  # UTC, to the millisecond
        logged = datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%fZ")
        assert abs(now - logged.replace(tzinfo=datetime.timezone.utc)).total_seconds() < 300
    expected = {
        ("grpc", "grpc-1"): ("identity", "1", "OK"),
        ("grpc", "grpc-oip-2"): ("identity", "1", "OK"),
        ("grpc", "grpc-3"): ("nosuch", "-", "NOT_FOUND"),
        ("http", "http-1"): ("identity", "1", "200"),
        ("http", "http-oip-2"): ("identity", "1", "200"),
        ("http", "http-boom"): ("broken", "1", "500"),
        ("http", "http-bad"): ("identity", "-", "400"),
        ("http", r"a\n2026-01-01T00:00:00.000Z\x20http\x20forged"): ("identity", "1", "200"),
        ("jobs", job_id): ("identity", "1", "completed"),
    }
    for key, (model, version, status) in expected.items():
        record = records[key]
        assert (record.group(4), record.group(5), record.group(6)) == (model, version, status)
    mip_lines = [m for m in fields if m.group(2) == "mip"]
    assert sorted((m.group(4), m.group(6), m.group(8)) for m in mip_lines) == [
        ("identity", "OK", "-"), ("nosuch", "METHOD", "-")]  # MIP carries no request id
    for m in fields:
        peer = m.group(3)
        if m.group(2) in ("grpc", "http"):
            assert re.fullmatch(r"127\.0\.0\.1:\d+", peer), m.group(0)
        else:
            assert peer == ("127.0.0.1" if m.group(2) == "mip" else "-"), m.group(0)
    warning = [line for line in output.splitlines() if "model broken/1 failed" in line]
    assert len(warning) == 1 and "'http-boom'" in warning[0], output


def test_json_logs_metrics_and_the_job_queue_depth(tmp_path):
    """``--log-format json --access-log -``: every log line on standard error is one JSON
    object, access lines with their fields; /metrics shows the unfinished jobs by status
    and the process's CPU and memory."""
    process, urls = _serve(tmp_path, "--log-format", "json", "--access-log", "-",
                           "--job-workers", "0")
    try:
        with grpcclient.InferenceServerClient(urls["grpc"]) as g:
            g.infer("identity", [_grpc_input()], headers={"x-request-id": "json-1"})
            with pytest.raises(grpcclient.InferenceServerException, match="weights are missing"):
                g.infer("broken", [_grpc_input("x", np.ones((1, 1), np.float32))],
                        request_id="json-boom")
        jobs = [_job(urls["http"]) for _ in range(2)]
        metrics = httpx.get(f"http://{urls['http']}/metrics").text
    finally:
        assert _stop(process) == 0
        output = process.stdout.read()
    assert re.search(r'^mip_job_queue_depth\{status="queued"\} 2\.0$', metrics, re.M), metrics
    assert re.search(r'^mip_job_queue_depth\{status="processing"\} 0\.0$', metrics, re.M)
    cpu = float(re.search(r"^process_cpu_seconds_total (\S+)$", metrics, re.M).group(1))
    memory = float(re.search(r"^process_resident_memory_bytes (\S+)$", metrics, re.M).group(1))
    assert cpu > 0 and memory > 10 << 20
    assert len(jobs) == 2
    logged = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    plain = [line for line in output.splitlines()
             if line and not line.startswith(("{", "mip: "))]
    assert not plain, plain  # nothing else but the announcements on stdout
    access = {entry["request_id"]: entry for entry in logged if entry["logger"] == "mip.access"}
    assert set(access) == {"json-1", "json-boom"}, logged
    ok = access["json-1"]
    assert ok["protocol"] == "grpc" and ok["model"] == "identity" and ok["version"] == "1"
    assert ok["status"] == "OK" and ok["level"] == "INFO" and ok["latency_ms"] > 0
    assert re.fullmatch(r"127\.0\.0\.1:\d+", ok["peer"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ok["time"])
    assert access["json-boom"]["status"] == "INTERNAL"
    warnings = [e for e in logged if e["level"] == "WARNING" and "broken/1" in e["message"]]
    assert len(warnings) == 1 and "'json-boom'" in warnings[0]["message"], logged


@pytest.mark.parametrize("implementation", grpc_implementations())
def test_request_ids_come_back_to_grpc_and_rest_clients(tmp_path, implementation):
    """``x-request-id`` metadata comes back in the trailing metadata (answered or failed),
    ``X-Request-ID`` as a response header; the KServe v2 ``id`` as the reply's ``id``; a
    client that sends none gets none."""
    repo = build_demo_repository(tmp_path / "repo")
    with OipServer(repo, grpc_implementation=implementation) as server:
        channel = grpc.insecure_channel(server.grpc_url)
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                    request_serializer=pb.ModelInferRequest.SerializeToString,
                                    response_deserializer=pb.ModelInferResponse.FromString)
        request = pb.ModelInferRequest(model_name="identity", id="oip-7")
        tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, 16])
        tensor.contents.fp32_contents.extend(X.ravel().tolist())
        reply, call = infer.with_call(request, metadata=(("x-request-id", "grpc-42"),))
        assert reply.id == "oip-7"
        assert ("x-request-id", "grpc-42") in [tuple(m) for m in call.trailing_metadata()]
        _, call = infer.with_call(request)
        assert "x-request-id" not in [m[0] for m in call.trailing_metadata() or ()]
        with pytest.raises(grpc.RpcError) as failed:
            infer(pb.ModelInferRequest(model_name="nosuch"),
                  metadata=(("x-request-id", "grpc-43"),))
        assert failed.value.code() == grpc.StatusCode.NOT_FOUND
        assert ("x-request-id", "grpc-43") in [tuple(m) for m in failed.value.trailing_metadata()]
        channel.close()
        body = {"id": "oip-8", "inputs": [{"name": "input", "shape": [1, 16],
                                           "datatype": "FP32", "data": X.ravel().tolist()}]}
        url = f"http://{server.http_url}/v2/models/identity/infer"
        answered = httpx.post(url, json=body, headers={"X-Request-ID": "rest-42"})
        assert answered.headers["x-request-id"] == "rest-42" and answered.json()["id"] == "oip-8"
        binary = httpx.post(url, json={**body, "parameters": {"binary_data_output": True}},
                            headers={"X-Request-ID": "rest-43"})
        assert binary.status_code == 200 and binary.headers["x-request-id"] == "rest-43"
        refused = httpx.post(url.replace("identity", "nosuch"), json=body,
                             headers={"X-Request-ID": "rest-44"})
        assert refused.status_code == 404 and refused.headers["x-request-id"] == "rest-44"
        anonymous = httpx.post(url, json={"inputs": body["inputs"]})
        assert "x-request-id" not in anonymous.headers and "id" not in anonymous.json()


def test_access_lines_leave_together_and_follow_a_moved_file(tmp_path, monkeypatch):
    """The handler holds the lines logged on the event loop for FLUSH_INTERVAL and writes
    them together, and opens its file again once logrotate has moved it away."""
    import asyncio

    from mip import logs

    monkeypatch.setattr(logs, "_REOPEN_CHECK", 0.0)
    monkeypatch.setattr(logs, "FLUSH_INTERVAL", 0.05)
    path = tmp_path / "access.log"
    handler = logs.LineHandler(str(path))
    handler.setFormatter(logs.TextAccessFormatter())
    logger = logging.getLogger("mip.access.test")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    args = ("http", "127.0.0.1:1", "identity", "1", 200, 0.5, "id")
    try:
        async def burst() -> list[str]:
            logger.info(logs.ACCESS_MESSAGE, *args)
            await asyncio.sleep(0)
            for _ in range(2):
                logger.info(logs.ACCESS_MESSAGE, *args)
            held = path.read_text()  # nothing written yet
            await asyncio.sleep(0.2)
            return [held, path.read_text()]

        held, written = asyncio.run(burst())
        assert held == "" and written.count("\n") == 3
        assert written.splitlines()[0].endswith(" http 127.0.0.1:1 identity 1 200 0.500ms id")
        path.rename(tmp_path / "access.log.1")
        logger.info(logs.ACCESS_MESSAGE, *args)  # no loop: written at once, to a new file
        assert path.read_text().count("\n") == 1
        assert (tmp_path / "access.log.1").read_text().count("\n") == 3
    finally:
        logger.removeHandler(handler)
        handler.close()


@pytest.mark.parametrize("formatter", ["text", "json"])
def test_a_line_is_the_same_through_logging_or_straight_to_the_handler(tmp_path, formatter):
    """AccessLog hands a line straight to mip serve's handler; through logging (a logger
    with other handlers or filters) the same record gives the same line."""
    from mip import logs
    from mip.frontends.access import AccessLog

    lines = {}
    for route in ("direct", "logging"):
        path = tmp_path / f"{route}.log"
        handler = logs.LineHandler(str(path))
        handler.setFormatter(logs.JsonFormatter() if formatter == "json"
                             else logs.TextAccessFormatter())
        logger = logging.getLogger(f"mip.access.{route}.{formatter}")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = route == "logging"  # not as mip serve sets it: the record path
        try:
            access = AccessLog(logger)
            assert (access._direct is not None) == (route == "direct")
            access.request("grpc", "ipv6:[::1]:5000", "m\n", "2", KeyError("x"), 0.0012, "r 1")
        finally:
            logger.removeHandler(handler)
            handler.close()
        lines[route] = path.read_text()
    direct, through = lines["direct"], lines["logging"]
    assert direct.count("\n") == 1 and through.count("\n") == 1
    if formatter == "json":
        direct, through = json.loads(direct), json.loads(through)
        assert direct.pop("time")[:4] == through.pop("time")[:4]
        assert through.pop("logger").startswith("mip.access") and direct.pop("logger")
        assert direct == through == {"level": "INFO", "protocol": "grpc", "peer": "[::1]:5000",
                                     "model": "m\\n", "version": "2", "status": "INTERNAL",
                                     "latency_ms": 1.2, "request_id": "r\\x201"}
    else:
        assert direct.split(" ", 1)[1] == through.split(" ", 1)[1] == (
            "grpc [::1]:5000 m\\n 2 INTERNAL 1.200ms r\\x201\n")
