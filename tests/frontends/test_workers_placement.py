"""Placement per model: a model's configuration says ``placement: worker`` or ``shared``, and
``--placement`` is the server's default. With ``mip serve --workers N`` the workers run their
per-worker models in process and hand the shared ones to the engine process; loads, unloads,
readiness and metrics follow each model to where it runs."""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import sys

import numpy as np
import pytest

from mip.errors import ConfigError, MipError
from mip.net.mip_client import Client
from mip.serving.config import parse_config, read_config
from mip.serving.demo import build_demo_repository
from mip.serving.remote import place
from mip.serving.triton import config_from_json

from _oip_server import add_python_model
from _serve_process import start as _start, stop as _stop
from _wait import wait_until
from _workers import (ROUNDS, WAIT, _grpc_client, _held, _metrics, _new_holders,
                          _read_lines, _ready_on_each, _repository)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="memfd, abstract unix sockets, /proc")

# answers the pid of the process that runs it, once per row
WHERE_MODEL = """
import os
import numpy as np

class Where:
    inputs = [("x", "FP32", [-1, 1])]
    outputs = [("pid", "INT64", [-1, 1])]

    def infer(self, inputs):
        return {"pid": np.full(inputs["x"].shape, os.getpid(), np.int64)}
"""
SHARED = {"placement": "shared"}
WORKER = {"placement": "worker"}
#: Triton's JSON ModelConfig of a load call that moves a model to the engine process
TO_SHARED = json.dumps({"parameters": {"placement": {"string_value": "shared"}}})


def _serve(tmp_path, models: dict[str, dict | None], *extra, workers: int = 2):
    repo = build_demo_repository(tmp_path / "repo")
    for name, config in models.items():
        add_python_model(repo, name, WHERE_MODEL, config)
    process, out = _start(["--model-repository", str(repo), "--mip", "tcp://127.0.0.1:0",
                           "--mip-model", "identity", "--http", "127.0.0.1:0",
                           "--grpc", "127.0.0.1:0", "--workers", str(workers),
                           "--log-level", "INFO", *extra], 1,
                          pattern=f"mip: {workers} worker processes serving")
    found = re.search(r"\(pids ([\d, ]+)\) on one engine process \(pid (\d+)\)", out)
    assert found, out
    pids = [int(p) for p in found.group(1).split(", ")]
    urls = {"mip": re.search(r"serving MIP on (\S+)", out).group(1),
            "grpc": re.search(r"KServe v2 gRPC on (\S+)", out).group(1),
            "http": re.search(r"REST and /metrics on http://(\S+)", out).group(1)}
    urls["made"] = collections.Counter()  # requests made by _runs_in, by model
    process.output = _read_lines(process)
    process.output.insert(0, out)
    return process, pids, int(found.group(2)), urls


def _runs_in(urls, pids, model: str) -> dict[int, object]:
    """Worker pid -> the pid of the process that ran ``model`` for a request it took (or
    the error it answered), over new MIP connections until every worker has answered."""
    address = urls["mip"].removeprefix("tcp://")
    seen: dict[int, object] = {}
    for _ in range(ROUNDS):
        before = _held(pids, address)
        with Client(urls["mip"]) as client:
            try:
                (item,) = client.infer([[np.zeros((2, 1), np.float32)]], model=model)
                outcome: object = int(item[0][0, 0])
                assert (item[0] == outcome).all()
            except MipError as exc:
                outcome = exc
            urls["made"][model] += 1
            (holder,) = _new_holders(pids, address, before)
        seen[holder] = outcome
        if len(seen) == len(pids):
            break
    assert set(seen) == set(pids), seen
    return seen


def _series(text: str, name: str, model: str) -> float:
    """The sum of ``name``'s samples for ``model`` in a /metrics text."""
    return sum(float(v) for v in re.findall(
        rf'^{name}\{{model="{model}"[^}}]*\}} (\S+)$', text, re.M))


def test_a_model_runs_where_its_configuration_says(tmp_path):
    process, pids, engine, urls = _serve(tmp_path, {"where": SHARED, "local": None})
    lines = process.output
    try:
        # the shared model runs in the engine process for both workers, the other one in
        # the worker that took the request
        assert _runs_in(urls, pids, "where") == dict.fromkeys(pids, engine)
        assert _runs_in(urls, pids, "local") == {pid: pid for pid in pids}
        text = "".join(lines)
        assert text.count("serving where version 1") == 1, text
        assert text.count("serving local version 1") == 2, text
        assert _ready_on_each(urls, pids, "where") == dict.fromkeys(pids, 200)
        assert _ready_on_each(urls, pids, "local") == dict.fromkeys(pids, 200)
        # every model is in the index, ready, wherever it runs
        with urllib_open(urls, "/v2/repository/index", b"{}") as answer:
            states = {(e["name"], e.get("state")) for e in json.loads(answer.read())}
        assert {("where", "READY"), ("local", "READY"), ("identity", "READY"),
                ("mlp", "READY")} <= states, states
        # one /metrics: the batches of each where they ran, the requests where they came in
        def counted():
            text = _metrics(urls["http"])
            return all(_series(text, "mip_inference_batch_size_count", m) == urls["made"][m]
                       and _series(text, "nv_inference_request_success", m) == urls["made"][m]
                       for m in ("where", "local"))
        assert wait_until(counted, WAIT, 0.1), _metrics(urls["http"])
        assert re.search(r"^mip_models_loaded 4(\.0)?$", _metrics(urls["http"]), re.M)
        # unload and load over the API reach the engine process for the shared model
        assert _repository(urls, "where", "unload") == (200, {})
        assert 200 not in _ready_on_each(urls, pids, "where").values()
        assert _ready_on_each(urls, pids, "local") == dict.fromkeys(pids, 200)
        assert _repository(urls, "where", "load") == (200, {})
        assert _runs_in(urls, pids, "where") == dict.fromkeys(pids, engine)
        # a load whose configuration says shared moves a per-worker model to the engine
        # process (and one that says nothing moves it back)
        client = _grpc_client(urls["grpc"])
        try:
            client.load_model("local", config=TO_SHARED)
            assert _runs_in(urls, pids, "local") == dict.fromkeys(pids, engine)
            client.load_model("local")
            assert _runs_in(urls, pids, "local") == {pid: pid for pid in pids}
        finally:
            client.close()
        # the engine process killed: the shared model fails at once, the workers' own
        # models serve on; all is back once it is started again
        os.kill(engine, signal.SIGKILL)
        assert wait_until(lambda: any("the engine process (pid" in line for line in lines),
                          WAIT)
        assert _runs_in(urls, pids, "local") == {pid: pid for pid in pids}
        assert wait_until(lambda: any("the engine process started again" in line
                                      for line in lines), WAIT)
        found = re.search(r"the engine process started again \(pid (\d+)\)", "".join(lines))
        new = int(found.group(1))
        assert wait_until(lambda: _ready_on_each(urls, pids, "where")
                          == dict.fromkeys(pids, 200), WAIT, 0.1)
        assert _runs_in(urls, pids, "where") == dict.fromkeys(pids, new)
    finally:
        assert _stop(process) == 0, "".join(lines)


def urllib_open(urls, path: str, data: bytes | None = None):
    import urllib.request

    request = urllib.request.Request(f"http://{urls['http']}{path}", data=data,
                                     method="POST" if data is not None else "GET")
    return urllib.request.urlopen(request, timeout=WAIT)


def test_one_worker_with_a_shared_default_runs_a_per_worker_model_in_process(tmp_path):
    process, pids, engine, urls = _serve(tmp_path, {"where": None, "local": WORKER},
                                         "--placement", "shared", workers=1)
    try:
        (worker,) = pids
        assert _runs_in(urls, pids, "where") == {worker: engine}
        assert _runs_in(urls, pids, "local") == {worker: worker}
        with Client(urls["mip"]) as client:  # the default model, in the engine process
            (item,) = client.infer([[np.ones((1, 16), np.float32)]])
            np.testing.assert_array_equal(item[0], np.ones((1, 16), np.float32))
        with urllib_open(urls, "/v2/health/ready") as answer:
            assert answer.status == 200
    finally:
        assert _stop(process) == 0, "".join(process.output)


def test_one_process_runs_a_shared_model_itself(tmp_path):
    # without --workers (or --placement shared) there is one process: every model runs in it
    repo = build_demo_repository(tmp_path / "repo")
    add_python_model(repo, "where", WHERE_MODEL, SHARED)
    process, out = _start(["--model-repository", str(repo), "--mip", "tcp://127.0.0.1:0",
                           "--http", "none", "--grpc", "none", "--workers", "1"], 1,
                          pattern="mip: serving MIP")
    try:
        url = re.search(r"serving MIP on (\S+)", out).group(1)
        with Client(url) as client:
            (item,) = client.infer([[np.zeros((1, 1), np.float32)]], model="where")
        assert int(item[0][0, 0]) == process.pid
    finally:
        assert _stop(process) == 0


def test_placement_is_read_from_config_json_and_config_pbtxt(tmp_path):
    assert parse_config({"placement": "shared"}).placement == "shared"
    assert parse_config({}).placement is None
    assert parse_config({"parameters": {"placement": {"string_value": "worker"}}}
                        ).placement == "worker"
    with pytest.raises(ConfigError, match="placement must be 'worker' or 'shared'"):
        parse_config({"placement": "gpu"})
    with pytest.raises(ConfigError, match="placement twice"):
        parse_config({"placement": "shared",
                      "parameters": {"placement": {"string_value": "shared"}}})
    assert config_from_json(TO_SHARED, "m").placement == "shared"
    with pytest.raises(ConfigError, match="placement must be"):
        config_from_json(json.dumps({"parameters": {"placement": {"string_value": "x"}}}),
                         "m")
    folder = tmp_path / "python"
    (folder / "1").mkdir(parents=True)
    (folder / "1" / "model.py").write_text(WHERE_MODEL)
    (folder / "config.pbtxt").write_text(
        'backend: "python"\nparameters { key: "placement" value { string_value: "shared" } }\n')
    config = read_config(folder)
    assert config.placement == "shared" and config.parameters == {"placement": "shared"}
    # the repository's startup models, split by placement (a broken config: the default)
    (tmp_path / "plain" / "1").mkdir(parents=True)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    names = ["python", "plain", "broken"]
    assert place(tmp_path, names, "worker") == (["plain", "broken"], ["python"])
    assert place(tmp_path, names, "shared") == ([], names)
