"""``mip bench``: short bounded runs against a real ``mip serve`` and a real MSIP broker."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _serve_process import free_port

from mip.bench import infer, pubsub, report

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mip serve exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("mip serve did not listen in time")


def _mip(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mip.cli", "--log-level", "WARNING", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def _serve_has(flag: str) -> bool:
    return flag in _serve_help()


_HELP: list[str] = []


def _serve_help() -> str:
    if not _HELP:
        _HELP.append(_mip("serve", "--help").stdout)
    return _HELP[0]


def _listeners_off(keep: str | None = None) -> list[str]:
    """Turn off the listeners ``mip serve`` opens by default (other than ``keep``)."""
    return [arg for flag in ("--http", "--grpc") if flag != keep and _serve_has(flag)
            for arg in (flag, "none")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``mip serve`` on the demo repository, on a free port: yields its MIP URL."""
    from mip.serving.demo import build_demo_repository

    repo = build_demo_repository(tmp_path_factory.mktemp("repo"))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mip.cli", "--log-level", "WARNING", "serve",
                             "--model-repository", str(repo), "--mip", f"tcp://127.0.0.1:{port}",
                             *_listeners_off()],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, proc)
        yield f"tcp://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _target(url: str, model: str | None = "identity") -> infer.InferTarget:
    return infer.InferTarget(url=url, protocol="mip", model=model, timeout=5.0)


def _check_consistent(step: dict) -> None:
    lat = step["latency_ms"]
    assert step["requests"] == step["responses"] + step["errors"]
    assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert step["throughput_rps"] > 0
    assert step["client_cpu_s"] >= 0 and step["client_cpu_us_per_request"] > 0


async def test_closed_loop_counts_every_reply(server):
    doc = await infer.run_steps(_target(server), concurrencies=[1, 4], duration=0.5,
                                warmup=0.1, shapes=[[1, 16]])
    assert [s["concurrency"] for s in doc["steps"]] == [1, 4]
    for step in doc["steps"]:
        assert step["errors"] == 0 and step["error_kinds"] == {}
        assert step["requests"] == step["responses"] > 10
        _check_consistent(step)
        assert 0.4 < step["duration_s"] < 1.5


async def test_open_loop_sends_at_the_rate_and_counts_from_the_schedule(server):
    doc = await infer.run_steps(_target(server, "mlp"), rates=[200.0], duration=0.5,
                                warmup=0.1, shapes=[[1, 784]])
    step = doc["steps"][0]
    assert step["request_rate"] == 200.0 and step["concurrency"] is None
    assert 90 <= step["requests"] <= 101  # 0.5 s at 200/s
    assert step["responses"] == step["requests"] and step["errors"] == 0
    assert step["unsent"] == 0
    _check_consistent(step)


async def test_open_loop_in_flight_cap_reports_unsent(server):
    # one request in flight at 20,000/s cannot keep up: the rest is reported, not hidden
    doc = await infer.run_steps(_target(server), rates=[20000.0], duration=0.3, warmup=0.0,
                                shapes=[[1, 16]], max_inflight=1)
    step = doc["steps"][0]
    assert step["unsent"] > 0
    assert step["responses"] == step["requests"]
    assert step["requests"] + step["unsent"] == pytest.approx(6000, abs=2)


async def test_a_refusing_server_is_reported_before_measuring(server):
    with pytest.raises(infer.TargetRefused,
                       match="refused a mip request for model 'no-such-model': mip error METHOD"):
        await infer.run_steps(_target(server, "no-such-model"), concurrencies=[2],
                              duration=0.5, warmup=0.0, shapes=[[1, 16]])


async def test_errors_are_counted_against_a_refusing_server(server):
    target = _target(server, "no-such-model")
    await infer.fill_from_metadata(target, [[1, 16]], None)
    step = await infer.measure_step(lambda c: infer.make_driver(target, c), concurrency=2,
                                    duration=0.5, warmup=0.0)
    doc = {"steps": [step]}
    assert step["responses"] == 0
    assert step["errors"] == step["requests"] > 0
    (kind,) = step["error_kinds"]
    assert kind.startswith("mip error")
    assert step["error_kinds"][kind] == step["errors"]
    assert step["latency_ms"]["p50"] is None
    assert "error" in report.format_table(doc, title=False)


async def test_max_requests_bounds_a_step(server):
    doc = await infer.run_steps(_target(server), concurrencies=[4], duration=5.0, warmup=0.0,
                                shapes=[[1, 16]], max_requests=50)
    step = doc["steps"][0]
    assert step["requests"] == step["responses"] == 50
    assert step["duration_s"] < 2.0


def test_cli_json_and_plot(server, tmp_path):
    out, png = tmp_path / "run.json", tmp_path / "run.png"
    proc = _mip("bench", "infer", server, "--model", "identity", "--shape", "1,16",
                "--concurrency", "1,2", "--duration", "0.5", "--warmup", "0.1",
                "--label", "mip test", "--json", str(out), "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    assert "p99 ms" in proc.stdout and "c=2" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["schema"] == infer.SCHEMA
    assert doc["label"] == "mip test"
    assert set(doc) >= {"tool", "mip_version", "started_at", "target", "config", "machine",
                        "steps"}
    assert doc["target"] == {"url": server, "protocol": "mip", "model": "identity",
                             "version": None, "outputs": [],
                             "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 16]}]}
    assert doc["config"]["duration_s"] == 0.5 and doc["config"]["warmup_s"] == 0.1
    assert doc["machine"]["nproc"] == os.cpu_count()
    numbers = {"duration_s", "throughput_rps", "client_cpu_s", "client_cpu_percent",
               "client_cpu_us_per_request"}
    counts = {"requests", "responses", "errors", "unsent", "request_bytes"}
    for step in doc["steps"]:
        assert set(step) >= numbers | counts | {"concurrency", "request_rate", "latency_ms",
                                                "error_kinds", "error_examples"}
        assert all(isinstance(step[k], (int, float)) for k in numbers)
        assert all(isinstance(step[k], int) for k in counts)
        assert set(step["latency_ms"]) == {"min", "mean", "p50", "p90", "p99", "max"}
        assert step["request_bytes"] > 64
        _check_consistent(step)
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000

    both = tmp_path / "both.png"
    proc = _mip("bench", "--compare", str(out), str(out), "--plot", str(both))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("mip test") == 4  # two runs x two steps in the table
    assert both.read_bytes()[:8] == PNG_MAGIC


def test_cli_needs_an_explicit_target():
    proc = _mip("bench", "infer", "--model", "identity")
    assert proc.returncode == 2 and "URL is required" in proc.stderr
    proc = _mip("bench")
    assert proc.returncode == 2


def test_cli_mip_without_shape_is_a_clear_error(server):
    proc = _mip("bench", "infer", server, "--model", "identity", "--duration", "0.2")
    assert proc.returncode == 1 and "--shape" in proc.stderr


def test_cli_reports_a_refused_connection():
    port = free_port()  # nothing listens there
    proc = _mip("bench", "infer", f"tcp://127.0.0.1:{port}", "--shape", "1,16",
                "--concurrency", "1", "--duration", "0.2", "--warmup", "0")
    assert proc.returncode == 1 and "error" in proc.stderr


def test_compare_rejects_other_json(tmp_path):
    other = tmp_path / "x.json"
    other.write_text('{"schema": "something/else"}')
    with pytest.raises(ValueError):
        report.load_runs([other])


def test_resolve_inputs():
    meta = [{"name": "x", "datatype": "FP32", "shape": [-1, 3]},
            {"name": "y", "datatype": "INT64", "shape": [-1]}]
    assert infer.resolve_inputs(meta, None, None) == [("x", "FP32", [1, 3]), ("y", "INT64", [1])]
    assert infer.resolve_inputs(meta, [[4, 3]], None)[0] == ("x", "FP32", [4, 3])
    assert infer.resolve_inputs(None, [[2, 2]], ["fp16"]) == [("input", "FP16", [2, 2])]
    with pytest.raises(ValueError):
        infer.resolve_inputs(None, None, ["FP32"])


def test_guess_protocol():
    assert infer.guess_protocol("tcp://h:1") == "mip"
    assert infer.guess_protocol("unix:///tmp/s") == "mip"
    assert infer.guess_protocol("grpc://h:1") == "grpc"
    assert infer.guess_protocol("http://h:1") == "http"
    with pytest.raises(ValueError):
        infer.guess_protocol("ftp://h")


@pytest.mark.parametrize("protocol,flag", [("grpc", "--grpc"), ("http", "--http"),
                                           ("http-binary", "--http")])
def test_oip_protocols_against_mip_serve(protocol, flag, tmp_path):
    if not _serve_has(flag):
        pytest.skip(f"mip serve has no {flag} listener in this build")
    pytest.importorskip("grpc" if protocol == "grpc" else "aiohttp")
    mip_port, port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mip.cli", "--log-level", "WARNING", "serve",
                             "--mip", f"tcp://127.0.0.1:{mip_port}", flag, f"127.0.0.1:{port}",
                             *_listeners_off(keep=flag)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, proc)
        scheme = "grpc" if protocol == "grpc" else "http"
        out = tmp_path / "r.json"
        run = _mip("bench", "infer", f"{scheme}://127.0.0.1:{port}", "--protocol", protocol,
                   "--model", "mlp", "--concurrency", "2", "--duration", "0.5", "--warmup",
                   "0.1", "--json", str(out))
        assert run.returncode == 0, run.stderr
        step = json.loads(out.read_text())["steps"][0]
        assert step["errors"] == 0 and step["requests"] == step["responses"] > 0
        # inputs came from the server's metadata
        assert json.loads(out.read_text())["target"]["inputs"][0]["shape"] == [1, 784]
        # a shape the model refuses stops the run before measuring, with the server's reason
        bad = _mip("bench", "infer", f"{scheme}://127.0.0.1:{port}", "--protocol", protocol,
                   "--model", "mlp", "--shape", "1,5", "--concurrency", "1", "--duration",
                   "0.3", "--warmup", "0", "--json", str(tmp_path / "bad.json"))
        assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr
        assert f"refused a {protocol} request for model 'mlp'" in bad.stderr
        assert "[1, 5]" in bad.stderr and "784" in bad.stderr
        assert not (tmp_path / "bad.json").exists()
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
async def broker():
    try:
        from mip.net.msip_broker import Broker
    except ImportError as exc:  # pragma: no cover
        pytest.skip(f"no MSIP broker in this build: {exc}")
    b = Broker()
    address = await b.start("tcp://127.0.0.1:0")
    yield str(address)
    await b.stop()


@pytest.mark.parametrize("rate", [None, 400.0])
async def test_pubsub_delivers_everything(broker, rate):
    doc = await pubsub.run_pubsub(broker, publishers=2, subscribers=2, size=100, rate=rate,
                                  duration=0.5, warmup=0.1, ping_duration=0.2)
    assert doc["schema"] == pubsub.SCHEMA
    p = doc["pubsub"]
    assert p["published"] > 0
    assert p["delivered"] == p["published"] * 2 and p["lost"] == 0
    assert p["measured_delivered"] == p["measured_published"] * 2 or rate is None
    lat = p["latency_ms"]
    assert 0 <= lat["p50"] <= lat["p99"] <= lat["max"]
    if rate:
        assert p["published"] == pytest.approx(rate * 0.6, abs=4)
    assert doc["ping"]["count"] > 0 and doc["ping"]["latency_ms"]["p50"] > 0
    assert doc["config"]["size"] == 100
    assert "delivered/s" in report.format_pubsub(doc)


def test_cli_pubsub(tmp_path):
    pytest.importorskip("mip.net.msip_broker")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mip.cli", "--log-level", "WARNING", "broker",
                             "--msip", f"tcp://127.0.0.1:{port}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, proc)
        out = tmp_path / "p.json"
        run = _mip("bench", "pubsub", f"tcp://127.0.0.1:{port}", "--subscribers", "3",
                   "--size", "16", "--duration", "0.5", "--warmup", "0.1", "--ping-duration",
                   "0.2", "--json", str(out))
        assert run.returncode == 0, run.stderr
        doc = json.loads(out.read_text())
        assert doc["pubsub"]["lost"] == 0 and doc["pubsub"]["delivered_per_s"] > 0
        assert "PING" in run.stdout
    finally:
        proc.terminate()
        proc.wait(10)
