"""KServe v2 over HTTP/REST, driven by the official tritonclient against a real engine."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import socket
import time

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from _oip_server import (
    DATATYPES,
    FASHION_MNIST,
    OipServer,
    build_repository,
    sample,
)
from _wait import wait_until
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from tritonclient.utils import InferenceServerException

from mip.frontends.oip.rest import build_app
from mip.net.http_server import HttpServer

LIMIT = 4 << 20  # octets: the server's body limit in these tests


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = build_repository(tmp_path_factory.mktemp("oip_rest"))
    with OipServer(repo, http_max_body_size=LIMIT) as served:
        yield served


@pytest.fixture
def client(server):
    c = httpclient.InferenceServerClient(server.http_url, connection_timeout=10,
                                         network_timeout=10)
    yield c
    c.close()


@pytest.fixture
def rng():
    return np.random.default_rng(5)


def _input(name, array, datatype, binary=True):
    tensor = httpclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def _request(server, method, path, body=None, headers=None):
    host, port = server.http_url.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_health_metadata_and_readiness_codes(server, client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata()["name"] == "mip"
    assert client.is_model_ready("mlp") and client.is_model_ready("versioned", "1")
    meta = client.get_model_metadata("mlp")
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 784]}]
    assert client.get_model_metadata("versioned", "1")["versions"] == ["1", "2"]
    assert _request(server, "GET", "/v2/health/live")[0] == 200
    assert _request(server, "GET", "/v2/models/mlp/versions/1/ready")[0] == 200
    status, _, body = _request(server, "GET", "/v2/models/nope/ready")
    assert status == 404 and "nope" in json.loads(body)["error"]
    status, _, body = _request(server, "GET", "/v2/models/nope")
    assert status == 404 and "nope" in json.loads(body)["error"]


@pytest.mark.parametrize("datatype, binary", [
    (datatype, binary) for datatype in sorted(DATATYPES) for binary in (True, False)
    if binary or datatype != "BF16"])  # tritonclient sends BF16 only as binary data
def test_every_datatype(client, datatype, binary):
    x = sample(datatype, (3, 4))
    result = client.infer(f"id_{datatype.lower()}", [_input("input", x, datatype, binary)],
                          outputs=[httpclient.InferRequestedOutput("output", binary_data=binary)],
                          request_id=f"r-{datatype}")
    response = result.get_response()
    assert response["id"] == f"r-{datatype}" and response["model_version"] == "1"
    (output,) = response["outputs"]
    assert output["datatype"] == datatype and output["shape"] == [3, 4]
    assert ("binary_data_size" in output.get("parameters", {})) == binary
    out = result.as_numpy("output")
    if datatype == "BYTES":
        # tritonclient gives JSON strings back as str, binary elements as bytes
        got = [e.encode() if isinstance(e, str) else bytes(e) for e in out.ravel()]
        assert got == list(x.ravel())
    else:
        np.testing.assert_array_equal(out, x)


def test_fp16_accepted_in_json(server):
    body = {"inputs": [{"name": "input", "datatype": "FP16", "shape": [1, 4],
                        "data": [0.5, -2.0, 65504.0, 0.1]}]}
    status, _, reply = _request(server, "POST", "/v2/models/id_fp16/infer", json.dumps(body))
    assert status == 200, reply
    (output,) = json.loads(reply)["outputs"]
    expected = np.array([0.5, -2.0, 65504.0, 0.1], dtype=np.float16)
    np.testing.assert_array_equal(np.array(output["data"], dtype=np.float16), expected)


def test_all_outputs_binary_by_default_and_requested_outputs(client, rng):
    a = rng.standard_normal((2, 4)).astype(np.float32)
    b = rng.standard_normal((2, 4)).astype(np.float32)
    inputs = [_input("a", a, "FP32"), _input("b", b, "FP32", binary=False)]
    result = client.infer("two", inputs)  # no outputs named: binary_data_output
    assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])
    np.testing.assert_array_equal(result.as_numpy("sum"), a + b)
    np.testing.assert_array_equal(result.as_numpy("product"), a * b)
    only = client.infer("two", inputs, outputs=[
        httpclient.InferRequestedOutput("product", binary_data=False)])
    assert [o["name"] for o in only.get_response()["outputs"]] == ["product"]
    np.testing.assert_allclose(only.as_numpy("product"), a * b)


def test_versions(client):
    x = np.ones((1, 2), dtype=np.float32)
    for version, factor in (("1", 1.0), ("2", 2.0), ("", 2.0)):
        result = client.infer("versioned", [_input("x", x, "FP32")], model_version=version)
        np.testing.assert_array_equal(result.as_numpy("y"), x * factor)
        assert result.get_response()["model_version"] == (version or "2")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_fashion_mnist_matches_onnxruntime(client, rng, binary):
    x = rng.random((4, 28, 28), dtype=np.float32)
    expected = ort.InferenceSession(str(FASHION_MNIST)).run(None, {"x": x})[0]
    result = client.infer("fashion_mnist", [_input("x", x, "FP32", binary)], outputs=[
        httpclient.InferRequestedOutput("12", binary_data=binary)])
    np.testing.assert_array_equal(result.as_numpy("12"), expected)


def test_compressed_request(client, rng):
    x = rng.standard_normal((2, 16)).astype(np.float32)
    for algorithm in ("gzip", "deflate"):
        result = client.infer("identity", [_input("input", x, "FP32")],
                              request_compression_algorithm=algorithm)
        np.testing.assert_array_equal(result.as_numpy("output"), x)


def test_errors_are_json_with_their_status(server, client):
    x = np.ones((1, 16), dtype=np.float32)
    cases = [
        ("nope", [_input("input", x, "FP32")], 404, "nope"),
        ("identity", [_input("input", x[:, :3], "FP32")], 400, "shape"),
        ("identity", [_input("input", x.astype(np.int32), "INT32")], 400, "datatype"),
    ]
    for model, inputs, status, word in cases:
        with pytest.raises(InferenceServerException) as excinfo:
            client.infer(model, inputs)
        assert excinfo.value.status() == str(status) or str(status) in str(excinfo.value)
        assert word in excinfo.value.message()
    raw = [
        (b"{not json", {}, 400),
        (json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 16],
                                 "data": [1.0] * 15}]}).encode(), {}, 400),
        (json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 16],
                                 "parameters": {"binary_data_size": 64}}]}).encode(),
         {"Inference-Header-Content-Length": "0"}, 400),
        (json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 16],
                                 "parameters": {"binary_data_size": 64}}]}).encode() + b"x" * 8,
         {}, 400),
    ]
    for body, headers, status in raw:
        code, reply_headers, reply = _request(server, "POST", "/v2/models/identity/infer",
                                              body, headers)
        assert code == status, reply
        assert reply_headers["content-type"] == "application/json"
        assert isinstance(json.loads(reply)["error"], str)
    code, _, reply = _request(server, "GET", "/v2/no/such/path")
    assert code == 404 and "error" in json.loads(reply)
    code, reply_headers, reply = _request(server, "GET", "/v2/models/identity/infer")
    assert code == 405 and reply_headers["allow"] == "POST" and "error" in json.loads(reply)


def _binary_body(header: dict, data: bytes) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    return head + data, {"Inference-Header-Content-Length": str(len(head)),
                         "Content-Type": "application/octet-stream"}


def _binary_output(reply: bytes, headers: dict) -> bytes:
    return reply[int(headers["inference-header-content-length"]):]


def test_a_binary_header_seen_before_is_read_as_the_first_time(server):
    """The JSON header of a binary-extension body is read once: a body with the same
    header is answered from what was found then, with its own data, and refused as the
    first was when its data does not fit."""
    header = {"id": "same", "inputs": [
        {"name": "input", "datatype": "FP32", "shape": [1, 16],
         "parameters": {"binary_data_size": 64}}],
        "outputs": [{"name": "output", "parameters": {"binary_data": True}}]}
    for seed in range(3):
        x = np.arange(16, dtype=np.float32) * (seed + 1)
        code, headers, reply = _request(server, "POST", "/v2/models/identity/infer",
                                        *_binary_body(header, x.tobytes()))
        assert code == 200, reply
        assert _binary_output(reply, headers) == x.tobytes()
        assert json.loads(reply[:int(headers["inference-header-content-length"])])["id"] == "same"
    for data in (b"x" * 60, b"x" * 72, b""):  # short, long, none: the same error each time
        replies = [_request(server, "POST", "/v2/models/identity/infer",
                            *_binary_body(header, data)) for _ in range(2)]
        assert replies[0][0] == replies[1][0] == 400
        assert json.loads(replies[0][2]) == json.loads(replies[1][2])
    # BYTES data is read again every time (its elements' lengths are in the data)
    header = {"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1, 4],
                          "parameters": {"binary_data_size": 24}}],
              "outputs": [{"name": "output", "parameters": {"binary_data": False}}]}
    for words in (["ab", "cd", "ef", "gh"], ["a", "bcd", "", "efgh"], ["abc", "d", "e", "x"]):
        data = b"".join(len(w).to_bytes(4, "little") + w.encode() for w in words)
        data += b"\0" * (24 - len(data))  # the last element's length does not fit
        status, _, reply = _request(server, "POST", "/v2/models/id_bytes/infer",
                                    *_binary_body(header, data))
        if len(data) == 24 and sum(map(len, words)) == 8:
            assert status == 200 and json.loads(reply)["outputs"][0]["data"] == words, reply
        else:
            assert status == 400, reply


def test_json_arrays_of_a_few_kib_read_as_python_numbers_would(server):
    """Numbers of JSON data arrays of a few KiB are read in C: the same FP32 values as
    through Python floats, nested or not, and the same errors."""
    x = np.random.default_rng(3).standard_normal((1, 2048)).astype(np.float32)
    values = x.astype(np.float64).tolist()[0]
    values[:3] = [1e-45, -0, 16777217]  # subnormal, integer zero, past FP32's integers
    for data in (values, [values]):
        body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32",
                                       "shape": [1, 2048], "data": data}],
                           "outputs": [{"name": "output",
                                        "parameters": {"binary_data": True}}]}).encode()
        code, headers, reply = _request(server, "POST", "/v2/models/wide_fp32/infer", body)
        assert code == 200, reply
        got = np.frombuffer(_binary_output(reply, headers), np.float32)
        assert got.view(np.uint32).tolist() == np.array(
            values, np.float32).view(np.uint32).tolist()
    for bad, word in ((values[:-1], "holds 2048 elements, 2047 were sent"),
                      (values[:-1] + ["x"], "data does not fit FP32"),
                      (values[:-1] + [1e39], None)):
        body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32",
                                       "shape": [1, 2048], "data": bad}]}).encode()
        code, _, reply = _request(server, "POST", "/v2/models/wide_fp32/infer", body)
        if word is None:  # too large for FP32: infinity, as numpy makes of it
            assert code == 200 and json.loads(reply)["outputs"][0]["data"][-1] is None, reply
        else:
            assert code == 400 and word in json.loads(reply)["error"], reply
    body = json.dumps({"inputs": [{"name": "input", "datatype": "INT32", "shape": [1, 2048],
                                   "data": list(range(2047)) + [1.5]}]}).encode()
    code, _, reply = _request(server, "POST", "/v2/models/wide_int32/infer", body)
    assert code == 400 and "non-integer" in json.loads(reply)["error"], reply


def test_one_output_replies_are_the_octets_of_the_general_path(server, monkeypatch):
    """A reply of one output is written around its data from a kept template: the same
    octets and headers as the general path writes."""
    from mip.frontends.oip import rest_infer

    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    cases = []
    for oip_id in ("r1", 7, None):
        for binary in (True, False):
            doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 16],
                               "data": x.ravel().tolist()}],
                   "outputs": [{"name": "output", "parameters": {"binary_data": binary}}]}
            if oip_id is not None:
                doc["id"] = oip_id
            cases.append(json.dumps(doc).encode())
    headers = {"X-Request-ID": "abc"}

    def replies():
        out = []
        for body in cases:
            for extra in ({}, headers):
                code, got, reply = _request(server, "POST", "/v2/models/identity/infer",
                                            body, extra)
                got.pop("date", None)
                out.append((code, got, reply))
        return out

    fast = replies()
    monkeypatch.setattr(rest_infer, "_TEMPLATE_BELOW", 0)  # every reply the general way
    assert replies() == fast
    assert all(code == 200 for code, _, _ in fast)
    assert fast[1][1]["x-request-id"] == "abc"


def test_malformed_request_documents_are_400_naming_the_fault(server):
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 16], "data": [1.0] * 16}
    cases = [
        ([1], "the request must be a JSON object"),
        ({"inputs": 5}, "the request needs an 'inputs' list"),
        ({"inputs": [tensor], "outputs": 5}, "an output must be a JSON object"),
        ({"inputs": [tensor], "outputs": {"name": "output"}}, "an output must be a JSON object"),
        ({"inputs": [tensor], "parameters": [1]}, "parameters must be a JSON object"),
        ({"inputs": [tensor], "parameters": "x"}, "parameters must be a JSON object"),
        ({"inputs": [{**tensor, "parameters": [1]}]}, "inputs parameters must be a JSON object"),
        ({"inputs": [tensor], "outputs": [{"name": "output", "parameters": 3}]},
         "outputs parameters must be a JSON object"),
        ({"inputs": [{**tensor, "parameters": []}]},
         "input 'input' parameters must be a JSON object"),
        ({"inputs": [tensor], "outputs": [{"name": "output", "parameters": {
            "classification": 0}}]}, "parameter 'classification' must be a positive"),
        ({"inputs": [tensor], "parameters": {"sequence_id": 7}},
         "request parameter 'sequence_id' is not supported"),
        # the extensions' parameters are checked before the inputs
        ({"inputs": [{"name": "input"}], "parameters": {"priority": 1}},
         "request parameter 'priority' is not supported"),
        ({"inputs": [{**tensor, "shape": [1, "x"]}]}, "shape that is not a list of integers"),
        ({"inputs": [{**tensor, "shape": [1, 16.0]}]}, None),  # as check_shape reads it
        ({"inputs": [{**tensor, "datatype": "FP33"}]}, "unknown datatype 'FP33'"),
        ({"inputs": [{**tensor, "datatype": "INT32", "data": [1] * 15 + [1.5]}]},
         "INT32 data holds a non-integer value"),
        ({"inputs": [tensor], "outputs": [{"name": "output"}, {"parameters": {}}]},
         "every requested output needs a name"),
    ]
    for doc, message in cases:
        status, _, reply = _request(server, "POST", "/v2/models/identity/infer",
                                    json.dumps(doc).encode())
        if message is None:
            assert status == 200, reply
        else:
            assert status == 400, (doc, reply)
            assert message in json.loads(reply)["error"], (doc, reply)


def test_body_size_limit_names_the_setting(server, client):
    x = np.zeros((LIMIT // 64 + 10, 16), dtype=np.float32)
    with pytest.raises(InferenceServerException) as excinfo:
        client.infer("identity", [_input("input", x, "FP32")])
    assert "--http-max-body-size" in excinfo.value.message()
    bomb = gzip.compress(b" " * (LIMIT + 1))
    status, _, reply = _request(server, "POST", "/v2/models/identity/infer", bomb,
                                {"Content-Encoding": "gzip"})
    assert status == 413 and "--http-max-body-size" in json.loads(reply)["error"]


def test_repository_api_while_requests_run(server, client):
    index = {(m["name"], m["version"]): m["state"] for m in client.get_model_repository_index()}
    assert index[("identity", "1")] == "READY"
    x = np.ones((1, 16), dtype=np.float32)

    async def load(stop: asyncio.Event, outcomes: list):
        async with aioclient.InferenceServerClient(server.http_url) as c:
            for _ in range(2000):  # bounded
                if stop.is_set():
                    return
                tensor = aioclient.InferInput("input", [1, 16], "FP32")
                tensor.set_data_from_numpy(x)
                try:
                    result = await c.infer("identity", [tensor])
                    np.testing.assert_array_equal(result.as_numpy("output"), x)
                    outcomes.append("ok")
                except InferenceServerException as exc:
                    outcomes.append(exc.status())

    async def scenario():
        stop, outcomes = asyncio.Event(), []
        runner = asyncio.ensure_future(load(stop, outcomes))
        async with aioclient.InferenceServerClient(server.http_url) as c:
            for _ in range(200):
                if len(outcomes) > 5:
                    break
                await asyncio.sleep(0.01)
            await c.load_model("identity")
            await c.unload_model("identity")
            assert not await c.is_model_ready("identity")
            # bounded in time, not in turns: a loaded machine runs fewer turns a second
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while outcomes[-1] == "ok" and loop.time() < deadline:
                await asyncio.sleep(0.01)
            await c.load_model("identity")
            deadline = loop.time() + 10
            while outcomes[-1] != "ok" and loop.time() < deadline:
                await asyncio.sleep(0.01)
            assert await c.is_model_ready("identity")
        stop.set()
        await asyncio.wait_for(runner, 10)
        return outcomes

    outcomes = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert "503" in outcomes and outcomes[-1] == "ok"
    assert set(outcomes) <= {"ok", "503"}
    status, _, _ = _request(server, "GET", "/v2/models/identity/ready")
    assert status == 200
    with pytest.raises(InferenceServerException) as excinfo:
        client.unload_model("no_such_model")
    assert "no_such_model" in excinfo.value.message()


def test_not_ready_model_answers_503(server, client):
    client.unload_model("versioned")
    try:
        status, _, _ = _request(server, "GET", "/v2/models/versioned/ready")
        assert status == 503
        assert not client.is_model_ready("versioned")
    finally:
        client.load_model("versioned")
    assert client.is_model_ready("versioned")


def test_disconnected_client_leaves_the_batch_queue(server):
    host, port = server.http_url.rsplit(":", 1)

    async def depth():
        return sum(s.queue_depth for (n, _), s in server.engine.stats().items()
                   if n == "sleepy")

    def post(value: float) -> socket.socket:
        body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1],
                                       "data": [value]}]}).encode()
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall(b"POST /v2/models/sleepy/infer HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        return sock

    slow = post(0.8)
    time.sleep(0.2)
    queued = post(0.0)
    assert wait_until(lambda: server.call(depth()) == 1)
    queued.close()  # the client goes away
    started = time.monotonic()
    assert wait_until(lambda: server.call(depth()) == 0)
    assert time.monotonic() - started < 0.5  # before the slow request finished
    reply = slow.recv(65536)
    slow.close()
    assert reply.startswith(b"HTTP/1.1 200")


def test_metrics_scraped(server, client):
    x = np.ones((2, 16), dtype=np.float32)
    client.infer("identity", [_input("input", x, "FP32")])
    with pytest.raises(InferenceServerException):
        client.infer("identity", [_input("input", x[:, :2], "FP32")])
    with grpcclient.InferenceServerClient(server.grpc_url) as g:
        tensor = grpcclient.InferInput("input", [2, 16], "FP32")
        tensor.set_data_from_numpy(x)
        g.infer("identity", [tensor])
    status, headers, body = _request(server, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    samples = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    http_labels = '{model="identity",protocol="http",version="1"}'
    grpc_labels = '{model="identity",protocol="grpc",version="1"}'
    assert samples["nv_inference_request_success" + http_labels] >= 1
    assert samples["nv_inference_request_failure" + http_labels] >= 1
    assert samples["nv_inference_request_success" + grpc_labels] >= 1
    assert samples["nv_inference_count" + grpc_labels] >= 2
    assert samples["nv_inference_request_duration_us" + http_labels] > 0
    assert samples['nv_inference_exec_count{model="identity",version="1"}'] >= 2
    assert samples['nv_inference_compute_infer_duration_us{model="identity",version="1"}'] > 0
    assert 'nv_inference_queue_duration_us{model="identity",version="1"}' in samples
    assert samples['nv_inference_request_histogram_us_count{model="identity",protocol="http",'
                   'version="1"}'] >= 2
    assert samples['mip_inference_batch_size_bucket{le="2.0",model="identity",version="1"}'] >= 1
    assert samples['nv_inference_pending_request_count{model="identity",version="1"}'] == 0
    assert samples["mip_models_loaded"] >= 10
    # a model nobody has heard of makes no series
    assert not any('model="nope"' in name for name in samples)


def test_extra_routes_share_the_listener(server):
    async def hello(request):
        return JSONResponse({"hello": request.path_params.get("who", "world")})

    from starlette.applications import Starlette

    other = Starlette(routes=[Route("/hello/{who}", hello)])

    async def start():
        app = build_app(server.engine, extra_routes=[Mount("/v1", app=other)])
        http = HttpServer(app)
        return http, await http.start("127.0.0.1:0")

    http, url = server.call(start())
    try:
        host, port = url.rsplit(":", 1)
        connection = http_get(host, int(port), "/v1/hello/you")
        assert connection == (200, {"hello": "you"})
        assert http_get(host, int(port), "/v2/health/ready")[0] == 200
    finally:
        server.call(http.stop())


def http_get(host: str, port: int, path: str):
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


@pytest.mark.parametrize("datatype", ["FP32", "FP64", "FP16", "INT32", "UINT8", "INT64"])
def test_large_json_tensors_round_trip_exactly(client, datatype):
    """Bodies over 64 KiB have their numeric arrays parsed straight into numpy."""
    x = sample(datatype, (8, 2048), seed=3)
    result = client.infer(f"wide_{datatype.lower()}", [_input("input", x, datatype, binary=False)],
                          outputs=[httpclient.InferRequestedOutput("output", binary_data=False)])
    np.testing.assert_array_equal(result.as_numpy("output"), x)


def test_large_json_tensor_errors_are_400(server):
    good = ",".join(["1.5"] * 16383)
    cases = {
        "[" + good + ",,1]": "value is missing",
        "[" + good + ",1e]": "not a JSON number",
        "[" + good.replace("1.5", "1", 1) + "]": "holds 4096 elements",
    }
    for data, message in cases.items():
        shape = [2, 2048] if "holds" in message else [8, 2048]
        body = ('{"inputs": [{"name": "input", "datatype": "FP32", "shape": %s, "data": %s}]}'
                % (shape, data)).encode()
        status, _, reply = _request(server, "POST", "/v2/models/wide_fp32/infer", body,
                                    {"Content-Type": "application/json"})
        assert status == 400, reply
        assert message in json.loads(reply)["error"], reply
    body = ('{"inputs": [{"name": "input", "datatype": "INT8", "shape": [8, 2048], "data": [%s]}]}'
            % ",".join(["300"] * 16384)).encode()
    status, _, reply = _request(server, "POST", "/v2/models/wide_int8/infer", body)
    assert status == 400 and "does not fit INT8" in json.loads(reply)["error"], reply
