"""`mip serve` serves MIP, KServe v2 gRPC and REST from one process on one engine."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

import mip
from mip.net.mip_client import Client
from mip.serving.demo import build_demo_repository

from _serve_process import ROOT, start as _start, stop as _stop


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


@pytest.mark.parametrize("argv, level", [
    (["serve", "--log-level", "DEBUG"], "DEBUG"),
    (["--log-level", "ERROR", "serve"], "ERROR"),
    (["serve"], "INFO"),
    (["bench", "infer", "tcp://127.0.0.1:7070", "--log-level", "WARNING"], "WARNING"),
    (["worker", "--queue", "q.sqlite3", "--log-level", "DEBUG"], "DEBUG"),
])
def test_log_level_before_or_after_the_command(argv, level):
    from mip.cli import _parser

    assert _parser().parse_args(argv).log_level == level


def test_version():
    result = subprocess.run([sys.executable, "-m", "mip.cli", "--version"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == f"mip {mip.__version__}"


def _cli(argv, *, without=None, timeout=60):
    """Run ``mip ARGV`` (with the Python package ``without`` made unimportable)."""
    code = ("import sys\n"
            + (f"sys.modules[{without!r}] = None\n" if without else "")
            + "from mip.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def _one_line_error(result, *fragments):
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("mip"), line
    for fragment in fragments:
        assert fragment in line, line


@pytest.mark.parametrize("argv, without, fragments", [
    (["serve", "--mip", "none", "--grpc", "none", "--http", "127.0.0.1:0"], "prometheus_client",
     ["'prometheus_client'", "pip install 'mip-toolkit[serve]'"]),
    (["serve", "--mip", "tcp://127.0.0.1:0", "--grpc", "none", "--http", "none"], "onnxruntime",
     ["failed to load", "onnxruntime", "pip install 'mip-toolkit[serve]'"]),
    (["serve", "--model-repository", "/nonexistent/models"], None,
     ["the model repository /nonexistent/models does not exist"]),
    (["worker", "--queue", "jobs.sqlite3"], "starlette",
     ["'starlette'", "pip install 'mip-toolkit[serve]'"]),
    (["infer", "tcp://127.0.0.1:7070", "--datatype", "floaty"], None,
     ["unknown datatype 'floaty'", "FP32"]),
    (["serve", "--mip-model", "nosuch", "--mip", "tcp://127.0.0.1:0", "--grpc", "none",
      "--http", "none"], None, ["the default model 'nosuch' is not in the repository"]),
    (["serve", "--mip", "none", "--grpc", "none", "--http", "127.0.0.1:0",
      "--queue", "redis://127.0.0.1:1/0"], None, ["Redis", "127.0.0.1:1"]),
])
def test_mistakes_end_in_one_line_naming_the_fix(tmp_path, argv, without, fragments):
    if argv[0] == "worker":
        argv = [*argv[:2], str(tmp_path / argv[2]), *argv[3:]]
    _one_line_error(_cli(argv, without=without), *fragments)


def test_datatype_takes_numpy_names_too():
    from mip.cli import _datatype

    assert _datatype("float32") == _datatype("fp32") == "FP32"
    assert _datatype("int64") == "INT64" and _datatype("BYTES") == "BYTES"


def test_bench_on_a_model_the_server_does_not_have(tmp_path):
    repo = build_demo_repository(tmp_path / "demo")
    process, out = _start(["--model-repository", str(repo), "--mip", "tcp://127.0.0.1:0",
                           "--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"], 3)
    try:
        urls = {"mip": re.search(r"serving MIP on (\S+)", out).group(1),
                "grpc": "grpc://" + re.search(r"KServe v2 gRPC on (\S+)", out).group(1),
                "http": "http://" + re.search(r"REST and /metrics on http://(\S+)", out).group(1)}
        for protocol, url in urls.items():
            result = _cli(["bench", "infer", url, "--protocol", protocol, "--model", "nosuch",
                           "--shape", "1,16", "--duration", "1", "--warmup", "0",
                           "--no-progress"])
            _one_line_error(result, f"refused a {protocol} request for model 'nosuch'")
            if protocol != "mip":
                assert "no model named 'nosuch'" in result.stderr
    finally:
        _stop(process)


def test_a_model_that_fails_to_load_stops_the_start_unless_told_otherwise(tmp_path):
    repo = build_demo_repository(tmp_path / "demo")
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    result = _cli(["serve", "--model-repository", str(repo), "--mip", "tcp://127.0.0.1:0",
                   "--grpc", "none", "--http", "none"])
    _one_line_error(result, "1 model(s) failed to load: broken: version 1", "--no-exit-on-error")
    for strict in ("--strict-readiness", "--no-strict-readiness"):
        process, out = _start(["--model-repository", str(repo), "--mip", "tcp://127.0.0.1:0",
                               "--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0",
                               "--no-exit-on-error", strict], 3)
        try:
            url = re.search(r"serving MIP on (\S+)", out).group(1)
            with Client(url) as client:
                (y,), = client.infer([[np.ones((1, 16), np.float32)]], model="identity")
            assert (y == 1).all()
            grpc_url = re.search(r"KServe v2 gRPC on (\S+)", out).group(1)
            http_url = re.search(r"REST and /metrics on http://(\S+)", out).group(1)
            rest, rpc = httpclient.InferenceServerClient(http_url), grpcclient.InferenceServerClient(grpc_url)
            # strict (the default, as Triton's): a model that should be served is broken
            expected = strict == "--no-strict-readiness"
            assert rest.is_server_ready() is expected and rpc.is_server_ready() is expected
            assert rest.is_server_live() and rpc.is_server_live()
            assert rest.is_model_ready("identity") and not rest.is_model_ready("broken")
        finally:
            _stop(process)


def test_every_protocol_is_counted_in_the_metrics(tmp_path):
    """MIP, gRPC, REST and /v1 jobs all go through the one data plane: each request appears
    in the per-request counters under its protocol, beside the executions they caused."""
    import json
    import time
    import urllib.request

    repo = build_demo_repository(tmp_path / "demo")
    os.environ["MIP_API_KEYS"] = key = "metrics-test-key-0123456789"
    try:
        process, out = _start(["--model-repository", str(repo), "--mip", "tcp://127.0.0.1:0",
                               "--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"], 3)
    finally:
        del os.environ["MIP_API_KEYS"]
    try:
        mip_url = re.search(r"serving MIP on (\S+)", out).group(1)
        grpc_url = re.search(r"KServe v2 gRPC on (\S+)", out).group(1)
        http_url = re.search(r"REST and /metrics on http://(\S+)", out).group(1)
        x = np.ones((1, 16), np.float32)
        with Client(mip_url) as client:
            for _ in range(5):
                client.infer([[x]], model="identity")
        with grpcclient.InferenceServerClient(grpc_url) as g:
            for _ in range(2):
                i = grpcclient.InferInput("input", [1, 16], "FP32")
                i.set_data_from_numpy(x)
                g.infer("identity", [i])
        rest = httpclient.InferenceServerClient(http_url)
        for _ in range(3):
            i = httpclient.InferInput("input", [1, 16], "FP32")
            i.set_data_from_numpy(x)
            rest.infer("identity", [i])
        auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        job = json.dumps({"model_id": "identity", "input_data": {"inputs": [
            {"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16}]}})
        with urllib.request.urlopen(urllib.request.Request(
                f"http://{http_url}/v1/inference", data=job.encode(), headers=auth)) as r:
            request_id = json.load(r)["request_id"]
        for _ in range(100):  # the job runs in the server's own worker
            with urllib.request.urlopen(urllib.request.Request(
                    f"http://{http_url}/v1/inference/{request_id}", headers=auth)) as r:
                if json.load(r)["status"] == "completed":
                    break
            time.sleep(0.1)
        with urllib.request.urlopen(f"http://{http_url}/metrics") as r:
            text = r.read().decode()
        counts = {m.group(1): float(m.group(2)) for m in re.finditer(
            r'nv_inference_request_success\{[^}]*model="identity"[^}]*protocol="(\w+)"[^}]*\} (\S+)',
            text)}
        assert counts == {"mip": 5.0, "grpc": 2.0, "http": 3.0, "jobs": 1.0}, counts
        executions = float(re.search(r'nv_inference_exec_count\{[^}]*model="identity"[^}]*\} (\S+)',
                                     text).group(1))
        assert 1 <= executions <= 11
    finally:
        _stop(process)
