"""Credentials on the KServe v2 endpoints and /metrics (``--auth-scope``): tritonclient over
HTTP and gRPC (both transports) passing ``headers``, grpcio's health and reflection clients
with none, httpx for the raw answers; failures limited per address across REST and gRPC;
JWTs whose keys are fetched from a URL; and ``mip serve`` with the flag."""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import os
import re
import threading
import time

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from _oip_server import OipServer, grpc_implementations
from tritonclient.utils import InferenceServerException

from mip.frontends.auth import AREAS, Authenticator, Guard, hash_key, parse_scope
from mip.frontends.oip.grpc import RPC_AREAS
from mip.frontends.oip.rest import area_of
from mip.net.ratelimit import FailureLimit
from mip.serving.demo import build_demo_repository

from _serve_process import start as _start, stop as _stop

pytestmark = pytest.mark.timeout(120)

KEY = "oip-key-6f1c0d9a8b7e4f3a2d1c0b9a8e7f6d5c"
WRONG = "oip-key-wrong-000000000000000000000000"
GRPC_AUTH = {"authorization": f"Bearer {KEY}"}  # gRPC metadata keys are lowercase
X = np.arange(16, dtype=np.float32).reshape(1, 16)


def _guard(scope: str, failures: str = "1000/min", **authenticator):
    """A factory of the Guard an OipServer checks (made on the server's loop)."""
    def make() -> Guard:
        auth = Authenticator([hash_key(KEY)], **authenticator)
        return Guard(auth, parse_scope(scope), FailureLimit(failures))
    return make


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build_demo_repository(tmp_path_factory.mktemp("auth") / "demo")


@pytest.fixture(scope="module", params=grpc_implementations())
def everything(request, repo):
    """Every area protected."""
    with OipServer(repo, grpc_implementation=request.param, guard=_guard("all")) as srv:
        yield srv


@pytest.fixture(scope="module", params=grpc_implementations())
def control_only(request, repo):
    """Model control protected, inference, metadata and metrics open."""
    with OipServer(repo, grpc_implementation=request.param, guard=_guard("control")) as srv:
        yield srv


def _http_auth() -> dict:
    """tritonclient.http's headers (a new dict each time: its infer() adds to it)."""
    return {"Authorization": f"Bearer {KEY}"}


def _http_input():
    tensor = httpclient.InferInput("input", [1, 16], "FP32")
    tensor.set_data_from_numpy(X)
    return [tensor]


def _grpc_input():
    tensor = grpcclient.InferInput("input", [1, 16], "FP32")
    tensor.set_data_from_numpy(X)
    return [tensor]


def _refused(call, status: str) -> str:
    """The message of the InferenceServerException ``call()`` raises with ``status``."""
    with pytest.raises(InferenceServerException) as caught:
        call()
    assert caught.value.status() == status, (caught.value.status(), caught.value.message())
    return caught.value.message()


# -- areas --------------------------------------------------------------------------------


def test_area_of_each_rest_path():
    assert area_of("/v2/health/live") is None and area_of("/v2/health/ready") is None
    assert area_of("/v2/models/m/ready") is None
    assert area_of("/v2/models/m/versions/2/ready") is None
    assert area_of("/v2/models/m/infer") == "inference"
    assert area_of("/v2/models/m/versions/2/infer") == "inference"
    assert area_of("/v2") == "metadata" and area_of("/v2/models/m") == "metadata"
    assert area_of("/v2/models/m/versions/2") == "metadata"
    assert area_of("/v2/models/m/config") == "metadata"
    assert area_of("/v2/repository/index") == "control"
    assert area_of("/v2/repository/models/m/load") == "control"
    assert area_of("/v2/repository/models/m/unload") == "control"
    assert area_of("/metrics") == "metrics" and area_of("/v2/models/stats") == "metrics"
    assert area_of("/v2/models/m/stats") == "metrics"
    assert area_of("/v2/models/m/versions/1/stats") == "metrics"
    # a model may be named like an endpoint: its metadata is still metadata
    assert area_of("/v2/models/ready") == "metadata"
    assert area_of("/v2/models/infer") == "metadata"
    assert area_of("/v2/anything/else") == "metadata"
    assert area_of("/v1/models") is None  # /v1 checks its own credentials
    assert set(RPC_AREAS.values()) <= set(AREAS)


def test_parse_scope():
    assert parse_scope("control") == {"v1", "control"}
    assert parse_scope("inference, Metrics") == {"v1", "inference", "metrics"}
    assert parse_scope("all") == set(AREAS)
    with pytest.raises(ValueError, match="unknown auth scope 'v2'"):
        parse_scope("control,v2")


# -- every area protected -----------------------------------------------------------------


def test_tritonclient_http_passes_headers(everything):
    client = httpclient.InferenceServerClient(everything.http_url)
    try:
        # probes need nothing
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("identity")
        message = _refused(lambda: client.infer("identity", _http_input()), "401")
        assert "credentials required" in message
        assert "invalid API key" in _refused(
            lambda: client.infer("identity", _http_input(),
                                 headers={"Authorization": f"Bearer {WRONG}"}), "401")
        out = client.infer("identity", _http_input(), headers=_http_auth()).as_numpy("output")
        np.testing.assert_array_equal(out, X)
        out = client.infer("identity", _http_input(), headers={"X-API-Key": KEY})
        np.testing.assert_array_equal(out.as_numpy("output"), X)
        _refused(lambda: client.get_model_metadata("identity"), "401")
        assert client.get_model_metadata("identity", headers=_http_auth())["name"] == "identity"
        _refused(lambda: client.get_server_metadata(), "401")
        _refused(lambda: client.get_model_config("identity"), "401")
        _refused(lambda: client.get_model_repository_index(), "401")
        index = client.get_model_repository_index(headers=_http_auth())
        assert {entry["name"] for entry in index} == {"identity", "mlp"}
        _refused(lambda: client.load_model("identity"), "401")
        client.load_model("identity", headers=_http_auth())
        assert client.is_model_ready("identity", headers=_http_auth())
        _refused(lambda: client.get_inference_statistics("identity"), "401")
        stats = client.get_inference_statistics("identity", headers=_http_auth())
        assert stats["model_stats"][0]["name"] == "identity"
    finally:
        client.close()


def test_tritonclient_grpc_passes_headers(everything):
    with grpcclient.InferenceServerClient(everything.grpc_url) as client:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("identity")
        message = _refused(lambda: client.infer("identity", _grpc_input()),
                           "StatusCode.UNAUTHENTICATED")
        assert "credentials required" in message
        out = client.infer("identity", _grpc_input(), headers=GRPC_AUTH).as_numpy("output")
        np.testing.assert_array_equal(out, X)
        out = client.infer("identity", _grpc_input(), headers={"x-api-key": KEY})
        np.testing.assert_array_equal(out.as_numpy("output"), X)
        for call in (lambda **kw: client.get_model_metadata("identity", **kw),
                     lambda **kw: client.get_server_metadata(**kw),
                     lambda **kw: client.get_model_config("identity", **kw),
                     lambda **kw: client.get_model_repository_index(**kw),
                     lambda **kw: client.get_inference_statistics("identity", **kw),
                     lambda **kw: client.load_model("identity", **kw),
                     lambda **kw: client.unload_model("no-such-model", **kw)):
            _refused(call, "StatusCode.UNAUTHENTICATED")
        assert client.get_model_metadata("identity", headers=GRPC_AUTH).name == "identity"
        index = client.get_model_repository_index(headers=GRPC_AUTH)
        assert {model.name for model in index.models} == {"identity", "mlp"}
        client.load_model("identity", headers=GRPC_AUTH)
        assert client.is_model_ready("identity")
        stats = client.get_inference_statistics("identity", headers=GRPC_AUTH)
        assert stats.model_stats[0].name == "identity"


def _stream(url: str, headers: dict | None) -> list:
    """Two requests on a ModelStreamInfer stream; what the callback got, in order."""
    results, done = [], threading.Event()

    def callback(result, error):
        results.append(error if error is not None else result.as_numpy("output"))
        if len(results) == 2 or error is not None:
            done.set()

    with grpcclient.InferenceServerClient(url) as client:
        client.start_stream(callback, headers=headers)
        try:
            for _ in range(2):
                try:
                    client.async_stream_infer("identity", _grpc_input())
                except InferenceServerException:  # the stream has ended: see the callback
                    break
            assert done.wait(20)
        finally:
            client.stop_stream()
    return results


def test_stream_infer_needs_credentials(everything):
    results = _stream(everything.grpc_url, GRPC_AUTH)
    assert len(results) == 2
    for out in results:
        np.testing.assert_array_equal(out, X)
    (error,) = _stream(everything.grpc_url, None)[:1]
    assert isinstance(error, InferenceServerException)
    assert error.status() == "StatusCode.UNAUTHENTICATED"


def test_health_and_reflection_stay_open(everything):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(everything.grpc_url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert "inference.GRPCInferenceService" in services


def test_rest_answers(everything):
    with httpx.Client(base_url=f"http://{everything.http_url}", timeout=10) as client:
        for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/identity/ready"):
            assert client.get(path).status_code == 200, path
        for path in ("/metrics", "/v2/models/stats", "/v2", "/v2/models/identity"):
            reply = client.get(path)
            assert reply.status_code == 401, path
            assert reply.headers["www-authenticate"] == 'Bearer realm="mip"'
            assert "credentials required" in reply.json()["error"]
        metrics = client.get("/metrics", headers=_http_auth())
        assert metrics.status_code == 200 and "nv_inference_request_success" in metrics.text
        reply = client.get("/metrics", headers={"Authorization": f"Basic {KEY}"})
        assert reply.status_code == 401 and "Bearer" in reply.json()["error"]
        # refused before the body is read: a large body, then the connection goes on
        body = json.dumps({"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32",
                                       "data": X.ravel().tolist()}]}) + " " * (1 << 20)
        assert client.post("/v2/models/identity/infer", content=body).status_code == 401
        reply = client.post("/v2/models/identity/infer", content=body, headers=_http_auth())
        assert reply.status_code == 200
        assert reply.json()["outputs"][0]["data"] == X.ravel().tolist()
        assert client.post("/v2/repository/index", headers=_http_auth()).status_code == 200


# -- one area protected -------------------------------------------------------------------


def test_control_protected_inference_open(control_only):
    client = httpclient.InferenceServerClient(control_only.http_url)
    try:
        np.testing.assert_array_equal(
            client.infer("identity", _http_input()).as_numpy("output"), X)
        assert client.get_model_metadata("identity")["name"] == "identity"
        assert client.get_inference_statistics("identity")["model_stats"]
        _refused(lambda: client.load_model("identity"), "401")
        _refused(lambda: client.get_model_repository_index(), "401")
        client.load_model("identity", headers=_http_auth())
    finally:
        client.close()
    with grpcclient.InferenceServerClient(control_only.grpc_url) as client:
        np.testing.assert_array_equal(
            client.infer("identity", _grpc_input()).as_numpy("output"), X)
        assert client.get_model_metadata("identity").name == "identity"
        _refused(lambda: client.load_model("identity"), "StatusCode.UNAUTHENTICATED")
        _refused(lambda: client.unload_model("identity"), "StatusCode.UNAUTHENTICATED")
        client.load_model("identity", headers=GRPC_AUTH)
        assert client.is_model_ready("identity")
    with httpx.Client(base_url=f"http://{control_only.http_url}", timeout=10) as http:
        assert http.get("/metrics").status_code == 200


# -- failed authentications ---------------------------------------------------------------


def _grpc_call(channel, metadata):
    """ServerMetadata with ``metadata``: ``(status, details, trailing metadata)``."""
    from mip.frontends.oip import inference_pb2 as pb

    call = channel.unary_unary("/inference.GRPCInferenceService/ServerMetadata",
                               request_serializer=pb.ServerMetadataRequest.SerializeToString,
                               response_deserializer=pb.ServerMetadataResponse.FromString)
    try:
        call(pb.ServerMetadataRequest(), metadata=metadata, timeout=10)
    except grpc.RpcError as exc:
        return exc.code(), exc.details(), dict(exc.trailing_metadata() or ())
    return grpc.StatusCode.OK, "", {}


@pytest.mark.parametrize("implementation", grpc_implementations())
def test_failures_limited_per_address_across_rest_and_grpc(repo, implementation, caplog):
    """10 failures an hour: 5 wrong keys over REST and 5 over gRPC from 127.0.0.1 spend the
    address's budget; then it is refused (429 / RESOURCE_EXHAUSTED with a retry hint)
    whatever it sends, right key included, while 127.0.0.2 keeps working. Neither key is
    ever logged."""
    caplog.set_level(logging.INFO)
    wrong = {"authorization": f"Bearer {WRONG}"}
    with OipServer(repo, grpc_implementation=implementation,
                   guard=_guard("all", failures="10/hour")) as srv, \
            grpc.insecure_channel(srv.grpc_url) as channel, \
            httpx.Client(base_url=f"http://{srv.http_url}", timeout=10) as http, \
            httpx.Client(base_url=f"http://{srv.http_url}", timeout=10, transport=httpx.HTTPTransport(
                local_address="127.0.0.2")) as other:
        codes = [http.get("/v2", headers=wrong).status_code for _ in range(5)]
        assert codes == [401] * 5
        # no credentials at all guess nothing: not counted
        assert _grpc_call(channel, ())[0] == grpc.StatusCode.UNAUTHENTICATED
        statuses = [_grpc_call(channel, tuple(wrong.items()))[0] for _ in range(5)]
        assert statuses == [grpc.StatusCode.UNAUTHENTICATED] * 5
        for metadata in (wrong, GRPC_AUTH):
            status, details, trailers = _grpc_call(channel, tuple(metadata.items()))
            assert status == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert re.search(r"too many failed authentications from this address; retry "
                             r"after \d+ s", details), details
            assert 1 <= int(trailers["retry-after"]) <= 360  # one failure per 360 s
        with grpcclient.InferenceServerClient(srv.grpc_url) as client:
            message = _refused(lambda: client.infer("identity", _grpc_input(),
                                                    headers=GRPC_AUTH),
                               "StatusCode.RESOURCE_EXHAUSTED")
            assert "retry after" in message
            assert client.is_server_ready()  # probes are never refused
        reply = http.get("/metrics", headers=_http_auth())
        assert reply.status_code == 429 and 1 <= int(reply.headers["retry-after"]) <= 360
        assert "retry after" in reply.json()["error"]
        assert http.get("/v2/health/ready").status_code == 200
        assert other.get("/metrics", headers=_http_auth()).status_code == 200
        assert other.get("/metrics", headers=wrong).status_code == 401
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "failed authentication from 127.0.0.1: invalid API key" in text
    assert KEY not in text and WRONG not in text


@pytest.mark.parametrize("implementation", grpc_implementations())
def test_failure_budgets_in_redis(repo, implementation, redis_url):
    """Budgets kept in Redis (shared by replicas) are checked on the gRPC paths that wait
    for them, inference included."""
    def make() -> Guard:
        return Guard(Authenticator([hash_key(KEY)]), parse_scope("all"),
                     FailureLimit("3/hour", redis_url))

    wrong = {"authorization": f"Bearer {WRONG}"}
    with OipServer(repo, grpc_implementation=implementation, guard=make) as srv, \
            grpcclient.InferenceServerClient(srv.grpc_url) as client:
        assert not srv.guard.immediate
        out = client.infer("identity", _grpc_input(), headers=GRPC_AUTH).as_numpy("output")
        np.testing.assert_array_equal(out, X)
        for _ in range(3):
            _refused(lambda: client.infer("identity", _grpc_input(), headers=wrong),
                     "StatusCode.UNAUTHENTICATED")
        _refused(lambda: client.infer("identity", _grpc_input(), headers=GRPC_AUTH),
                 "StatusCode.RESOURCE_EXHAUSTED")
        h = httpclient.InferenceServerClient(srv.http_url)
        try:
            _refused(lambda: h.infer("identity", _http_input(), headers=_http_auth()), "429")
        finally:
            h.close()
    import redis

    with contextlib.closing(redis.Redis.from_url(redis_url)) as r:
        r.delete("mip:authfail:127.0.0.1")


# -- JWTs with keys fetched from a URL ----------------------------------------------------


@contextlib.contextmanager
def _jwks_server(document: dict):
    """An HTTP server on 127.0.0.1 answering every GET with ``document``; yields its URL."""
    body = json.dumps(document).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("implementation", grpc_implementations())
def test_jwt_from_a_jwks_url(repo, implementation):
    jwt = pytest.importorskip("jwt")
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    jwk |= {"kid": "k1", "use": "sig", "alg": "RS256"}

    def token(key) -> str:
        claims = {"sub": "svc", "iss": "https://issuer.example", "aud": "mip",
                  "exp": int(time.time() + 300)}
        return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"})

    good, forged = token(private), token(other)
    with _jwks_server({"keys": [jwk]}) as url, \
            OipServer(repo, grpc_implementation=implementation,
                      guard=_guard("inference", jwt_keys=url, jwt_issuer="https://issuer.example",
                                   jwt_audience="mip")) as srv:
        assert not srv.guard.immediate  # verified in a worker thread: the keys may be fetched
        with grpcclient.InferenceServerClient(srv.grpc_url) as client:
            out = client.infer("identity", _grpc_input(),
                               headers={"authorization": f"Bearer {good}"})
            np.testing.assert_array_equal(out.as_numpy("output"), X)
            message = _refused(lambda: client.infer(
                "identity", _grpc_input(), headers={"authorization": f"Bearer {forged}"}),
                "StatusCode.UNAUTHENTICATED")
            assert message.startswith("invalid token")
            # the API key still works beside the tokens
            client.infer("identity", _grpc_input(), headers=GRPC_AUTH)
        h = httpclient.InferenceServerClient(srv.http_url)
        try:
            out = h.infer("identity", _http_input(), headers={"Authorization": f"Bearer {good}"})
            np.testing.assert_array_equal(out.as_numpy("output"), X)
            _refused(lambda: h.infer("identity", _http_input(),
                                     headers={"Authorization": f"Bearer {forged}"}), "401")
        finally:
            h.close()


# -- mip serve ----------------------------------------------------------------------------


def test_mip_serve_auth_scope(tmp_path, monkeypatch):
    repo = build_demo_repository(tmp_path / "demo")
    monkeypatch.setenv("MIP_API_KEYS", KEY)
    process, out = _start(["--model-repository", str(repo), "--mip", "none",
                           "--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0",
                           "--auth-scope", "control,metrics"], 2)
    try:
        assert KEY not in out and "API key for this run" not in out
        grpc_url = re.search(r"KServe v2 gRPC on (\S+)", out).group(1)
        http_url = re.search(r"REST and /metrics on http://(\S+)", out).group(1)
        client = httpclient.InferenceServerClient(http_url)
        try:
            np.testing.assert_array_equal(
                client.infer("identity", _http_input()).as_numpy("output"), X)
            _refused(lambda: client.load_model("identity"), "401")
            client.load_model("identity", headers=_http_auth())
        finally:
            client.close()
        with grpcclient.InferenceServerClient(grpc_url) as g:
            np.testing.assert_array_equal(g.infer("identity", _grpc_input()).as_numpy("output"),
                                          X)
            _refused(lambda: g.load_model("identity"), "StatusCode.UNAUTHENTICATED")
            g.load_model("identity", headers=GRPC_AUTH)
        with httpx.Client(base_url=f"http://{http_url}", timeout=10) as http:
            assert http.get("/metrics").status_code == 401
            assert http.get("/metrics", headers=_http_auth()).status_code == 200
            assert http.get("/v1/models").status_code == 401  # /v1 as ever
            assert http.get("/v1/models", headers=_http_auth()).status_code == 200
            # one failure budget for the address, whichever endpoint the failures hit
            wrong = {"Authorization": f"Bearer {WRONG}"}
            codes = [http.get("/v1/models", headers=wrong).status_code for _ in range(10)]
            assert codes == [401] * 10
            assert http.post("/v2/repository/index", headers=_http_auth()).status_code == 429
        with grpcclient.InferenceServerClient(grpc_url) as g:
            _refused(lambda: g.load_model("identity", headers=GRPC_AUTH),
                     "StatusCode.RESOURCE_EXHAUSTED")
            g.infer("identity", _grpc_input())  # inference is open: nothing to refuse
    finally:
        assert _stop(process) == 0


def test_mip_serve_makes_a_key_for_the_scope(tmp_path, monkeypatch):
    """No key configured: the key made for the run is printed and works on gRPC too (the
    HTTP listener off)."""
    repo = build_demo_repository(tmp_path / "demo")
    monkeypatch.delenv("MIP_API_KEYS", raising=False)
    process, out = _start(["--model-repository", str(repo), "--mip", "none", "--http", "none",
                           "--grpc", "127.0.0.1:0", "--auth-scope", "inference"], 1)
    try:
        key = re.search(r"API key for this run, for v1, inference .*: (\S+)", out).group(1)
        grpc_url = re.search(r"KServe v2 gRPC on (\S+)", out).group(1)
        with grpcclient.InferenceServerClient(grpc_url) as g:
            _refused(lambda: g.infer("identity", _grpc_input()), "StatusCode.UNAUTHENTICATED")
            out = g.infer("identity", _grpc_input(), headers={"authorization": f"Bearer {key}"})
            np.testing.assert_array_equal(out.as_numpy("output"), X)
            g.load_model("identity")  # control is open
    finally:
        assert _stop(process) == 0


def test_mip_serve_refuses_an_unknown_area():
    import subprocess
    import sys

    from _serve_process import ROOT

    result = subprocess.run([sys.executable, "-m", "mip.cli", "serve", "--auth-scope",
                             "inference,admin"], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 2
    assert "unknown auth scope 'admin'" in result.stderr
