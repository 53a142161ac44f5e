"""`mip serve` serves MIP, KServe v2 gRPC and REST from one process on one engine."""

from __future__ import annotations

import re

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

import mip
from mip.net.mip_client import Client
from mip.serving.demo import build_demo_repository

from _serve_process import start as _start, stop as _stop


def test_all_three_protocols_on_one_engine(tmp_path):
    repo = build_demo_repository(tmp_path / "demo")
    process, out = _start(["--model-repository", str(repo), "--mip", "tcp://127.0.0.1:0",
                           "--mip-model", "identity", "--http", "127.0.0.1:0",
                           "--grpc", "127.0.0.1:0", "--http-max-body-size", "1M",
                           "--grpc-max-message-size", "1M"], 3)
    try:
        mip_url = re.search(r"serving MIP on (\S+)", out).group(1)
        grpc_url = re.search(r"KServe v2 gRPC on (\S+)", out).group(1)
        http_url = re.search(r"REST and /metrics on http://(\S+)", out).group(1)
        x = np.arange(16, dtype=np.float32).reshape(1, 16)
        with grpcclient.InferenceServerClient(grpc_url) as g:
            tensor = grpcclient.InferInput("input", [1, 16], "FP32")
            tensor.set_data_from_numpy(x)
            np.testing.assert_array_equal(g.infer("identity", [tensor]).as_numpy("output"), x)
            big = grpcclient.InferInput("input", [20000, 16], "FP32")
            big.set_data_from_numpy(np.zeros((20000, 16), dtype=np.float32))
            try:
                g.infer("identity", [big])
                raise AssertionError("a message over --grpc-max-message-size was accepted")
            except grpcclient.InferenceServerException as exc:
                assert "--grpc-max-message-size" in exc.message()
        h = httpclient.InferenceServerClient(http_url)
        try:
            tensor = httpclient.InferInput("input", [1, 16], "FP32")
            tensor.set_data_from_numpy(x)
            np.testing.assert_array_equal(h.infer("identity", [tensor]).as_numpy("output"), x)
            assert h.is_server_ready()
        finally:
            h.close()
        with Client(mip_url) as c:
            (item,) = c.infer([[x]])
            np.testing.assert_array_equal(item[0], x)
        assert isinstance(mip.__version__, str)
    finally:
        assert _stop(process) == 0


def test_none_turns_listeners_off(tmp_path):
    repo = build_demo_repository(tmp_path / "demo")
    process, out = _start(["--model-repository", str(repo), "--mip", "none", "--grpc", "none",
                           "--http", "127.0.0.1:0"], 1)
    try:
        assert "gRPC" not in out and "serving MIP" not in out
        http_url = re.search(r"REST and /metrics on http://(\S+)", out).group(1)
        # an answer means the loop has run on, past installing the signal handlers
        h = httpclient.InferenceServerClient(http_url)
        try:
            assert h.is_server_live()
        finally:
            h.close()
    finally:
        assert _stop(process) == 0
