"""A model reloaded 20 times through the repository API (tritonclient's ``load_model``, over
HTTP and gRPC in turn) while MIP, KServe v2 gRPC (tritonclient) and REST (httpx) requests run
against ``mip serve``: no request fails, every answer is right, and the model and the server
stay ready throughout."""

from __future__ import annotations

import collections
import re
import threading
import time

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from _oip_server import grpc_implementations

from mip.net.mip_client import Client
from mip.serving.demo import build_demo_repository

from _serve_process import start as _start, stop as _stop

pytestmark = pytest.mark.timeout(240)

RELOADS = 20
#: requests a load thread sends at most, and seconds it runs at most: the test is bounded
#: even if the reloads stall
MAX_REQUESTS = 3000
MAX_SECONDS = 90.0


def _mip(url: str, x: np.ndarray):
    client = Client(url, pool_size=1)

    def call():
        (item,) = client.infer([[x]], model="identity")
        return item[0]
    return call, client.close


def _grpc(url: str, x: np.ndarray):
    client = grpcclient.InferenceServerClient(url)
    tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)

    def call():
        return client.infer("identity", [tensor]).as_numpy("output")
    return call, client.close


def _rest(url: str, x: np.ndarray):
    client = httpx.Client(base_url=f"http://{url}", timeout=30)
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}]}

    def call():
        reply = client.post("/v2/models/identity/infer", json=body)
        if reply.status_code != 200:
            raise RuntimeError(f"HTTP {reply.status_code}: {reply.text}")
        output = reply.json()["outputs"][0]
        return np.array(output["data"], np.float32).reshape(output["shape"])
    return call, client.close


@pytest.mark.parametrize("implementation", grpc_implementations())
def test_reloads_under_mixed_load_fail_nothing(tmp_path, implementation):
    repo = build_demo_repository(tmp_path / "demo")
    process, out = _start(["--model-repository", str(repo), "--mip", "tcp://127.0.0.1:0",
                           "--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0",
                           "--grpc-impl", implementation], 3)
    try:
        mip_url = re.search(r"serving MIP on (\S+)", out).group(1)
        grpc_url = re.search(r"KServe v2 gRPC on (\S+)", out).group(1)
        http_url = re.search(r"REST and /metrics on http://(\S+)", out).group(1)
        stop = threading.Event()
        outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        failures: list[str] = []
        not_ready: list[str] = []
        lock = threading.Lock()

        def load(protocol: str, make, seed: int) -> None:
            x = np.random.default_rng(seed).standard_normal((1, 16)).astype(np.float32)
            call, close = make(x)
            end = time.monotonic() + MAX_SECONDS
            try:
                for _ in range(MAX_REQUESTS):
                    if stop.is_set() or time.monotonic() > end:
                        break
                    try:
                        right = np.array_equal(call(), x)
                        with lock:
                            outcomes[protocol]["ok" if right else "wrong"] += 1
                    except Exception as exc:  # every failure is counted, with its reason
                        with lock:
                            outcomes[protocol]["failed"] += 1
                            failures.append(f"{protocol}: {type(exc).__name__}: {exc}")
            finally:
                close()

        def probe() -> None:
            with httpx.Client(base_url=f"http://{http_url}", timeout=30) as client:
                end = time.monotonic() + MAX_SECONDS
                while not stop.is_set() and time.monotonic() < end:
                    for path in ("/v2/models/identity/ready", "/v2/health/ready"):
                        status = client.get(path).status_code
                        if status != 200:
                            not_ready.append(f"{path}: {status}")
                    time.sleep(0.005)

        makers = [("mip", lambda x: _mip(mip_url, x)), ("grpc", lambda x: _grpc(grpc_url, x)),
                  ("http", lambda x: _rest(http_url, x))]
        threads = [threading.Thread(target=load, args=(name, make, seed))
                   for seed, (name, make) in enumerate(makers * 2)]
        threads.append(threading.Thread(target=probe))
        for thread in threads:
            thread.start()
        try:
            time.sleep(0.3)  # every protocol under way before the first reload
            # the repository API of both protocols, in turn
            controls = [httpclient.InferenceServerClient(http_url),
                        grpcclient.InferenceServerClient(grpc_url)]
            try:
                for reload in range(RELOADS):
                    controls[reload % 2].load_model("identity")
                    time.sleep(0.02)
            finally:
                for control in controls:
                    control.close()
            time.sleep(0.2)
        finally:
            stop.set()
            for thread in threads:
                thread.join(MAX_SECONDS + 30)
        assert not any(thread.is_alive() for thread in threads)
        assert failures == [], failures[:10]
        assert not_ready == [], not_ready[:10]
        for protocol in ("mip", "grpc", "http"):
            assert outcomes[protocol]["wrong"] == 0
            assert outcomes[protocol]["ok"] >= 20, dict(outcomes)
        with grpcclient.InferenceServerClient(grpc_url) as client:
            assert client.is_model_ready("identity") and client.is_server_ready()
    finally:
        assert _stop(process) == 0
