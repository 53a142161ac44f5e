"""Triton's tools against mip: a Triton-style repository (config.pbtxt), tritonclient's
model configuration, statistics and classification calls over gRPC (both transports) and
HTTP, statistics against /metrics, and parameters mip does not implement refused."""

from __future__ import annotations

import json
import re
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from _oip_server import OipServer, add_model, grpc_implementations, identity
from onnx import TensorProto
from tritonclient.utils import InferenceServerException

CLASSIFIER = """
name: "classifier"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "input" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "output" data_type: TYPE_FP32 dims: [ 4 ] label_filename: "labels.txt" } ]
dynamic_batching { max_queue_delay_microseconds: 0 }
instance_group [ { count: 1 kind: KIND_CPU } ]
"""
PLAIN = """
max_batch_size: 0
input [ { name: "input" data_type: TYPE_FP32 dims: [ 2, 4 ] } ]
output [ { name: "output" data_type: TYPE_FP32 dims: [ 2, 4 ] } ]
version_policy { all { } }
"""
X = np.array([[0.1, 0.7, 0.2, 0.0], [3.0, 1.0, 2.0, 4.0]], np.float32)


@pytest.fixture(scope="module", params=grpc_implementations())
def server(request, tmp_path_factory):
    repo = tmp_path_factory.mktemp("triton")
    add_model(repo, "classifier", identity(TensorProto.FLOAT))
    (repo / "classifier" / "config.pbtxt").write_text(CLASSIFIER)
    (repo / "classifier" / "labels.txt").write_text("ant\nbee\ncat\ndog\n")
    for version in ("1", "2"):
        add_model(repo, "plain", identity(TensorProto.FLOAT, shape=(2, 4)), version=version)
    (repo / "plain" / "config.pbtxt").write_text(PLAIN)
    add_model(repo, "override", identity(TensorProto.FLOAT))  # no config
    with OipServer(repo, grpc_implementation=request.param) as srv:
        yield srv


def _inputs(module, x=X):
    tensor = module.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return [tensor]


def _metrics(server) -> dict[tuple, float]:
    with urllib.request.urlopen(f"http://{server.http_url}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    values = {}
    for line in text.splitlines():
        match = re.match(r'^(nv_inference_\w+)\{(.*)\} (\S+)$', line)
        if match:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', match.group(2))))
            values[(match.group(1), labels)] = float(match.group(3))
    return values


def _sum(metrics, name, model, version) -> float:
    return sum(value for (metric, labels), value in metrics.items()
               if metric == name and ("model", model) in labels and ("version", version) in labels)


def test_model_config_over_grpc_and_http(server):
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    http = httpclient.InferenceServerClient(server.http_url)
    config = grpc.get_model_config("classifier").config
    assert config.name == "classifier" and config.max_batch_size == 8
    assert config.platform == "onnxruntime_onnx"
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("input", grpcclient.model_config_pb2.TYPE_FP32, [4])]
    assert config.output[0].label_filename == "labels.txt"
    assert config.HasField("dynamic_batching")
    assert config.instance_group[0].kind == grpcclient.model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert config.version_policy.latest.num_versions == 1
    as_json = http.get_model_config("classifier")
    assert as_json["name"] == "classifier" and as_json["max_batch_size"] == 8
    assert as_json["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [4]}]
    assert as_json["output"][0]["label_filename"] == "labels.txt"
    assert as_json["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 1024
    plain = http.get_model_config("plain", "1")
    assert plain["max_batch_size"] == 0 and plain["input"][0]["dims"] == [2, 4]
    assert "dynamic_batching" not in plain
    assert grpc.get_model_config("plain", "2").config.version_policy.HasField("all")
    with pytest.raises(InferenceServerException, match="no_such_model"):
        grpc.get_model_config("no_such_model")
    with pytest.raises(InferenceServerException, match="no_such_model"):
        http.get_model_config("no_such_model")
    grpc.close()
    http.close()


def test_statistics_match_metrics(server):
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    http = httpclient.InferenceServerClient(server.http_url)
    before = _metrics(server)
    success_before = _sum(before, "nv_inference_request_success", "plain", "2")
    for _ in range(3):
        grpc.infer("plain", _inputs(grpcclient, X), model_version="2")
    for _ in range(2):
        http.infer("plain", _inputs(httpclient, X), model_version="2")
    with pytest.raises(InferenceServerException):  # wrong shape: a failed request
        grpc.infer("plain", _inputs(grpcclient, X[:1]), model_version="2")
    metrics = _metrics(server)
    stats = grpc.get_inference_statistics("plain", "2", as_json=True)["model_stats"]
    assert len(stats) == 1 and stats[0]["name"] == "plain" and stats[0]["version"] == "2"
    entry = stats[0]
    success = _sum(metrics, "nv_inference_request_success", "plain", "2")
    assert success - success_before == 5
    # tritonclient's JSON form writes 64-bit integers as strings
    inference = entry["inference_stats"]
    assert int(inference["success"]["count"]) == success
    assert int(inference["fail"]["count"]) == _sum(metrics, "nv_inference_request_failure",
                                                   "plain", "2")
    assert int(entry["inference_count"]) == _sum(metrics, "nv_inference_count", "plain", "2")
    executions = _sum(metrics, "nv_inference_exec_count", "plain", "2")
    assert int(entry["execution_count"]) == executions == success
    assert int(inference["compute_infer"]["count"]) == executions
    # the queue per request that succeeded, as Triton counts it
    assert int(inference["queue"]["count"]) == success
    queue_us = _sum(metrics, "nv_inference_queue_duration_us", "plain", "2")
    assert abs(int(inference["queue"]["ns"]) / 1000 - queue_us) <= 1
    compute_us = _sum(metrics, "nv_inference_compute_infer_duration_us", "plain", "2")
    assert abs(int(inference["compute_infer"]["ns"]) / 1000 - compute_us) <= 1
    duration_us = _sum(metrics, "nv_inference_request_duration_us", "plain", "2")
    total_ns = int(inference["success"]["ns"]) + int(inference["fail"]["ns"])
    assert abs(total_ns / 1000 - duration_us) <= 1
    assert int(entry["last_inference"]) > 0
    assert [(int(b["batch_size"]), int(b["compute_infer"]["count"]))
            for b in entry["batch_stats"]] == [(1, executions)]
    # the HTTP client sees the same numbers (as JSON numbers)
    same = http.get_inference_statistics("plain", "2")["model_stats"][0]
    assert same["inference_stats"]["success"]["count"] == success
    assert same["execution_count"] == executions
    # every model and version
    names = {(s["name"], s["version"]) for s in
             http.get_inference_statistics()["model_stats"]}
    assert {("classifier", "1"), ("plain", "1"), ("plain", "2")} <= names
    grpc_all = grpc.get_inference_statistics().model_stats
    assert {(s.name, s.version) for s in grpc_all} == names
    with pytest.raises(InferenceServerException, match="no_such_model"):
        grpc.get_inference_statistics("no_such_model")
    with pytest.raises(InferenceServerException, match="no_such_model"):
        http.get_inference_statistics("no_such_model")
    grpc.close()
    http.close()


def test_classification(server):
    expected = np.array([[b"0.700000:1:bee", b"0.200000:2:cat"],
                         [b"4.000000:3:dog", b"3.000000:0:ant"]], dtype=object)
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    result = grpc.infer("classifier", _inputs(grpcclient), outputs=[
        grpcclient.InferRequestedOutput("output", class_count=2)])
    np.testing.assert_array_equal(result.as_numpy("output"), expected)
    assert result.get_output("output").datatype == "BYTES"
    http = httpclient.InferenceServerClient(server.http_url)
    for binary in (True, False):
        result = http.infer("classifier", _inputs(httpclient), outputs=[
            httpclient.InferRequestedOutput("output", binary_data=binary, class_count=2)])
        got = [[v if isinstance(v, bytes) else v.encode() for v in row]
               for row in result.as_numpy("output").tolist()]
        assert got == expected.tolist()
    # more classes than the output has: all of them, ranked
    result = grpc.infer("plain", _inputs(grpcclient, X), outputs=[
        grpcclient.InferRequestedOutput("output", class_count=100)])
    assert result.as_numpy("output").shape == (8,)
    assert result.as_numpy("output")[0] == b"4.000000:7"
    grpc.close()
    http.close()


def test_unimplemented_parameters_are_refused(server):
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    http = httpclient.InferenceServerClient(server.http_url)
    for client, module in ((grpc, grpcclient), (http, httpclient)):
        with pytest.raises(InferenceServerException, match="sequence_id"):
            client.infer("classifier", _inputs(module), sequence_id=7, sequence_start=True)
        with pytest.raises(InferenceServerException, match="priority"):
            client.infer("classifier", _inputs(module), priority=2)
        # a request without them still works
        assert client.infer("classifier", _inputs(module)).as_numpy("output").shape == (2, 4)
    try:
        grpc.infer("classifier", _inputs(grpcclient), sequence_id=7)
    except InferenceServerException as exc:
        assert exc.status() == "StatusCode.INVALID_ARGUMENT"
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/models/classifier/infer", method="POST",
        data=b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], '
             b'"data": [1, 2, 3, 4]}], "parameters": {"sequence_id": 3}}')
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 400 and b"sequence_id" in info.value.read()
    grpc.close()
    http.close()


def test_load_with_a_config(server):
    """Triton's load call with ``config``: that configuration for this load, then the
    folder's again at the next plain load; other load parameters are refused."""
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    http = httpclient.InferenceServerClient(server.http_url)
    override = json.dumps({"max_batch_size": 4, "version_policy": {"all": {}},
                           "dynamic_batching": {"max_queue_delay_microseconds": 100}})
    for client in (grpc, http):
        client.load_model("override", config=override)
        config = http.get_model_config("override")
        assert config["max_batch_size"] == 4
        assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 100
        with pytest.raises(InferenceServerException, match="sequence_batching"):
            client.load_model("override", config=json.dumps({"sequence_batching": {}}))
        with pytest.raises(InferenceServerException, match="file:1/model.onnx"):
            client.load_model("override", config=override, files={"file:1/model.onnx": b"x"})
        client.load_model("override")
        config = http.get_model_config("override")
        assert config["max_batch_size"] == 64 and "dynamic_batching" not in config
    # statistics list the versions served now
    assert "override" in {s["name"] for s in http.get_inference_statistics()["model_stats"]}
    grpc.unload_model("override")
    assert "override" not in {s.name for s in grpc.get_inference_statistics().model_stats}
    grpc.load_model("override")
    grpc.close()
    http.close()
