"""`mip serve --workers N`: N processes on the same MIP, gRPC and REST ports; a worker that
dies is started again, SIGTERM drains them all, /metrics counts every worker's requests, model
load and unload reach every worker."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from mip.net.mip_client import Client
from mip.serving.demo import build_demo_repository

from _oip_server import add_python_model
from _serve_process import ROOT, start as _start, stop as _stop
from _wait import wait_until
from _workers import (MARKED_MODEL, START, WAIT, X, _grpc_client, _held, _in_thread, _marked,
                      _marks, _metrics, _new_holders, _one_of_each, _only, _read_lines,
                      _ready_on_each, _repository)
from mip.workers import parse_workers

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc to see which worker holds a connection")


def _serve(tmp_path, monkeypatch, *extra):
    repo = build_demo_repository(tmp_path / "repo")
    (tmp_path / "marks").mkdir()
    add_python_model(repo, "marked", MARKED_MODEL.replace("FOLDER", repr(str(tmp_path / "marks"))))
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    with monkeypatch.context() as patch:
        patch.setenv("TMPDIR", str(temporary))  # where the supervisor makes its metrics folder
        process, out = _start(["--model-repository", str(repo), "--mip", "tcp://127.0.0.1:0",
                               "--mip-model", "identity", "--http", "127.0.0.1:0",
                               "--grpc", "127.0.0.1:0", "--workers", "2", "--log-level", "INFO",
                               *extra], 1, pattern="mip: 2 worker processes serving",
                              timeout=START)
    pids = [int(p) for p in re.search(r"\(pids ([\d, ]+)\)", out).group(1).split(", ")]
    urls = {"mip": re.search(r"serving MIP on (\S+)", out).group(1),
            "grpc": re.search(r"KServe v2 gRPC on (\S+)", out).group(1),
            "http": re.search(r"REST and /metrics on http://(\S+)", out).group(1)}
    process.output = _read_lines(process)  # read on: a full pipe would stall the server
    return process, pids, urls, temporary


def _successes(text: str, protocol: str) -> int:
    return sum(int(float(v)) for v in re.findall(
        r'^nv_inference_request_success\{model="identity",protocol="' + protocol
        + r'",version="1"\} (\S+)$', text, re.M))


def test_two_workers_serve_every_protocol_and_metrics_count_both(tmp_path, monkeypatch):
    process, pids, urls, temporary = _serve(tmp_path, monkeypatch)
    try:
        assert len(list(temporary.glob("mip-metrics-*"))) == 1
        for pid in pids:  # each worker serves every protocol
            with _only(pids, pid):
                assert _one_of_each(urls, pids) == {"mip": {pid}, "grpc": {pid}, "http": {pid}}
        rounds = len(pids)
        # one /metrics for both: the other worker's series are published within a second
        assert wait_until(lambda: all(_successes(_metrics(urls["http"]), p) == rounds
                                     for p in ("mip", "grpc", "http")), WAIT, 0.1), \
            (rounds, _metrics(urls["http"]))
        text = _metrics(urls["http"])
        assert text.count("# TYPE nv_inference_request_success counter") == 1
        assert re.search(r"^mip_models_loaded 3(\.0)?$", text, re.M), text
    finally:
        assert _stop(process) == 0
    assert not list(temporary.glob("mip-metrics-*"))  # removed at exit


def test_a_killed_worker_fails_its_requests_and_is_started_again(tmp_path, monkeypatch):
    process, pids, urls, _ = _serve(tmp_path, monkeypatch)
    lines = process.output
    try:
        # a request in a worker when it is killed: the client gets an error, at once
        thread, outcome = _in_thread(_marked(urls["mip"], 30.0))
        assert wait_until(lambda: _marks(tmp_path), WAIT)
        (victim,) = _marks(tmp_path)
        index = pids.index(victim)
        os.kill(victim, signal.SIGKILL)
        thread.join(15)
        assert not thread.is_alive()
        assert isinstance(outcome[0], ConnectionError), outcome
        # meanwhile the other worker answers every protocol on the same ports
        survivor = {pid for pid in pids if pid != victim}
        for _ in range(3):  # (or by the new worker, once it serves: not among pids)
            assert all(h <= survivor for h in _one_of_each(urls, pids).values())
        assert wait_until(lambda: any("started again" in line for line in lines), WAIT)
        text = "".join(lines)
        assert re.search(rf"worker {index} \(pid {victim}\) killed by signal 9 \(SIGKILL\); "
                         r"starting it again in [\d.]+ s", text), text
        new = int(re.search(rf"worker {index} started again \(pid (\d+)\)", text).group(1))
        pids = [new if pid == victim else pid for pid in pids]
        with _only(pids, new):  # the new worker serves every protocol
            assert _one_of_each(urls, pids) == {"mip": {new}, "grpc": {new}, "http": {new}}
    finally:
        assert _stop(process) == 0, "".join(lines)


def test_sigterm_drains_every_worker(tmp_path, monkeypatch):
    process, pids, urls, _ = _serve(tmp_path, monkeypatch)
    clients = {}
    try:
        address = urls["mip"].removeprefix("tcp://")
        for pid in pids:  # a connection held by each worker
            with _only(pids, pid):
                before = _held(pids, address)
                clients[pid] = client = Client(urls["mip"])
                client.ping()
                assert _new_holders(pids, address, before) == {pid}
        calls = [_in_thread(_marked(urls["mip"], 1.5, client)) for client in clients.values()]
        assert wait_until(lambda: set(_marks(tmp_path)) == set(pids), WAIT)
        process.send_signal(signal.SIGTERM)
        for thread, outcome in calls:
            thread.join(20)
            assert outcome == [1.5]
        assert process.wait(20) == 0
    finally:
        for client in clients.values():
            client.close()
        if process.poll() is None:
            process.kill()


def test_model_load_and_unload_reach_every_worker(tmp_path, monkeypatch):
    process, pids, urls, _ = _serve(tmp_path, monkeypatch)
    lines = process.output
    try:
        assert _ready_on_each(urls, pids, "mlp") == dict.fromkeys(pids, 200)
        assert _repository(urls, "mlp", "unload") == (200, {})
        assert 200 not in _ready_on_each(urls, pids, "mlp").values()
        status, body = _repository(urls, "nosuch", "load")
        assert status == 404 and "nosuch" in body["error"], (status, body)
        # a worker started again applies the changes made before it started
        os.kill(pids[1], signal.SIGKILL)
        assert wait_until(lambda: any("started again" in line for line in lines), WAIT)
        new = int(re.search(r"worker 1 started again \(pid (\d+)\)", "".join(lines)).group(1))
        pids = [pids[0], new]
        assert 200 not in _ready_on_each(urls, pids, "mlp").values()
        client = _grpc_client(urls["grpc"])
        try:
            client.load_model("mlp")
        finally:
            client.close()
        assert _ready_on_each(urls, pids, "mlp") == dict.fromkeys(pids, 200)
        # no model was shared at the start: there is no engine process to load one in
        client = _grpc_client(urls["grpc"])
        try:
            with pytest.raises(InferenceServerException, match="runs no engine process"):
                client.load_model("mlp", config=json.dumps(
                    {"parameters": {"placement": {"string_value": "shared"}}}))
        finally:
            client.close()
        assert _ready_on_each(urls, pids, "mlp") == dict.fromkeys(pids, 200)
    finally:
        assert _stop(process) == 0, "".join(lines)


@pytest.mark.parametrize("placement", ["worker", "shared"])
def test_unix_socket_is_shared(tmp_path, placement):
    path = tmp_path / "mip.sock"
    repo = build_demo_repository(tmp_path / "repo")
    process, out = _start(["--model-repository", str(repo), "--mip", f"unix://{path}",
                           "--mip-model", "identity", "--http", "none", "--grpc", "none",
                           "--workers", "2", "--placement", placement], 1,
                          pattern="mip: 2 worker processes serving", timeout=START)
    pids = [int(p) for p in re.search(r"\(pids ([\d, ]+)\)", out).group(1).split(", ")]
    try:
        for pid in pids:  # each worker accepts on the path
            with _only(pids, pid), Client(f"unix://{path}") as client:
                (item,) = client.infer([[X]])
                np.testing.assert_array_equal(item[0], X)
    finally:
        assert _stop(process) == 0
    assert not path.exists()


def _mip(*args, timeout: float = 60.0):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mip.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("value", ["0", "-1", "many", ""])
def test_bad_worker_counts_are_command_line_errors(value):
    result = _mip("serve", "--workers", value)
    assert result.returncode == 2
    assert "expected a number of worker processes of at least 1, or 'auto'" in result.stderr


def test_auto_is_one_worker_per_usable_core():
    assert parse_workers("auto") == len(os.sched_getaffinity(0))
    assert parse_workers(" 3 ") == 3


def test_a_start_error_is_reported_once(tmp_path):
    result = _mip("serve", "--workers", "2", "--model-repository", str(tmp_path / "missing"),
                  "--mip", "tcp://127.0.0.1:0", "--http", "127.0.0.1:0", "--grpc",
                  "127.0.0.1:0")
    assert result.returncode == 1
    assert result.stderr.count("does not exist") == 1, result.stderr
    assert "Traceback" not in result.stderr


def _exposition(success: int, pending: int, loaded: int, started: float) -> bytes:
    return (f'# HELP nv_inference_request_success Number of successful inference requests\n'
            f'# TYPE nv_inference_request_success counter\n'
            f'nv_inference_request_success{{model="m",protocol="mip",version="1"}} {success}\n'
            f'# HELP nv_inference_pending_request_count Requests waiting\n'
            f'# TYPE nv_inference_pending_request_count gauge\n'
            f'nv_inference_pending_request_count{{model="m",version="1"}} {pending}.0\n'
            f'# HELP mip_models_loaded Model versions ready to serve\n'
            f'# TYPE mip_models_loaded gauge\n'
            f'mip_models_loaded {loaded}.0\n'
            f'# HELP process_start_time_seconds Start time\n'
            f'# TYPE process_start_time_seconds gauge\n'
            f'process_start_time_seconds {started}\n').encode()


def test_merged_metrics_keep_dead_workers_counts_and_live_workers_gauges():
    from prometheus_client.parser import text_string_to_metric_families

    from mip.frontends.oip.worker_metrics import merge

    own = _exposition(success=3, pending=1, loaded=2, started=200.5)
    live = _exposition(success=4, pending=2, loaded=1, started=100.5)
    dead = _exposition(success=5, pending=7, loaded=9, started=50.5)
    text = merge(own, [(live, True), (dead, False)]).decode()
    values = {sample.name: sample.value
              for family in text_string_to_metric_families(text) for sample in family.samples}
    # (the parser adds _total to counters)
    assert values == {"nv_inference_request_success_total": 12,  # every worker's, the dead one too
                      "nv_inference_pending_request_count": 3,  # the live workers'
                      "mip_models_loaded": 2,  # the answering worker's
                      "process_start_time_seconds": 100.5}  # the oldest live worker's
    assert 'nv_inference_request_success{model="m",protocol="mip",version="1"} 12\n' in text
    assert text.count("# TYPE") == 4
