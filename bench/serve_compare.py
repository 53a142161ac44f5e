"""mip serve against MLServer, KServe and Triton on the same ONNX models, measured by ``mip bench``.

One command::

    python bench/serve_compare.py [--quick] [--duration 3] [--warmup 1] [--rounds 2] [--out DIR]
                                  [--servers mip,mlserver,kserve,pytriton,triton,echo]

and three narrower ones (section 6 and after)::

    python bench/serve_compare.py --against-triton [--rounds 2] [--duration 2]
    python bench/serve_compare.py --profile [--duration 6] [--profile-native]
    python bench/serve_compare.py --instructions 320 [--instructions-protocols grpc,http]

``--against-triton``: ``mip serve`` and Triton's own C++ server (the ``tritonserver`` binary
of the PyTriton wheel on a Triton repository of Python-backend models), both running, each
cell measured on one then the other (the order swapped each round), by h2load (gRPC as
HTTP/2 POSTs of a gRPC-framed body; REST with ``--h1``) and by ``mip bench``, with the
server's CPU a request (its process tree, from /proc), ratios and the goals as PASS/MISS.
``--profile``: where ``mip serve``'s CPU a request goes (py-spy), MIP, gRPC and REST.
``--instructions``: instructions a request under callgrind, ``mip serve`` and ``tritonserver``.

1. creates a venv per peer under ``--cache-dir`` (default ``~/.cache/mip-bench``) when
   missing: MLServer 1.7.1 (``mlserver onnxruntime 'uvloop<0.22'``), KServe 0.21
   (``kserve onnxruntime``) and Triton through PyTriton 0.7 (``nvidia-pytriton onnxruntime
   numpy``; the wheel bundles the ``tritonserver`` binary);
2. writes the models: the demo ``identity`` (FP32 [-1, 16]) and ``mlp`` (FP32 [-1, 784] ->
   [-1, 10]) plus ``identity_1m``, an identity of FP32 [-1, 262144] (1 MiB a row); for mip a
   repository with dynamic batching and one without, for the peers one folder with a custom
   runtime around ``onnxruntime.InferenceSession`` each (``bench/peers/``);
3. starts each server alone on free 127.0.0.1 ports, ``--rounds`` times (default 2; the
   order of the servers reversed each round; every cell keeps each row's best round, so that
   a drift of the machine's speed over the minutes of a run favours no server): ``mip serve``
   (batching on, then off), MLServer (``parallel_workers`` 0, metrics off), KServe (latency logging off, quiet logs),
   Triton (PyTriton Python-function models, dynamic batching up to 64 rows, metrics off),
   and a bare uvloop echo server of MIP frames (the ceiling);
4. runs ``mip bench infer`` (a subprocess, the command a user runs) for each cell: identity
   1x16, mlp 1x784, identity_1m 1x262144 at concurrency 1, 8, 32; mip over MIP (and over
   KServe v2 gRPC and REST when ``mip serve`` has ``--grpc``/``--http``), each peer over gRPC
   and REST;
5. prints a table with ratios against the best peer and the goals, writes
   ``DIR/serve_compare.json`` and every run's JSON, and draws ``DIR/serve_compare.png`` with
   ``mip bench --compare``.

A peer that fails to install or start is reported (with the reason: pip's or the server
log's last lines) in the printed notes and in the JSON's ``problems``, and skipped.  Every
cell is bounded: warm-up + duration seconds, plus at most the request timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = Path(__file__).resolve().parent / "peers"
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

CELLS = [  # (model, shape)
    ("identity", [1, 16]),
    ("mlp", [1, 784]),
    ("identity_1m", [1, 262144]),
]
PEERS_MEASURED = ("mlserver", "kserve", "pytriton", "triton")
#: mip bench protocol -> the row label's protocol part
PROTOCOL_NAMES = {"mip": "mip", "grpc": "grpc", "http": "rest-json", "http-binary": "rest-binary"}
#: our row of each protocol compared with the peers' rows of the same protocol
OURS = {"grpc": "mip/grpc batching", "rest-json": "mip/rest-json batching",
        "rest-binary": "mip/rest-binary batching"}  # the "best peer" is one of these
SERVERS = ("mip", *PEERS_MEASURED, "echo")
DEFAULT_SERVERS = "mip,mlserver,kserve,pytriton,triton,echo"
PEER_PACKAGES = {
    "mlserver": ["mlserver==1.7.1", "onnxruntime", "uvloop<0.22"],
    "kserve": ["kserve==0.21.*", "onnxruntime"],
    "pytriton": ["nvidia-pytriton==0.7.*", "onnxruntime", "numpy"],
}


def log(msg: str) -> None:
    print(f"[serve_compare] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listened on port {port} within {timeout:.0f} s")


def log_tail(path: Path | None, lines: int = 6) -> str:
    """The last lines of a server log, for the reason a server did not start."""
    if path is None or not path.is_file():
        return ""
    text = path.read_text(errors="replace").strip().splitlines()
    return " | ".join(line.strip() for line in text[-lines:] if line.strip())


def wait_ready(http_port: int, models: list[str], proc: subprocess.Popen,
               timeout: float = 90.0) -> None:
    """Wait until ``GET /v2/models/NAME/ready`` answers 200 for every model."""
    deadline = time.monotonic() + timeout
    pending = list(models)
    while pending and time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(
                    f"http://127.0.0.1:{http_port}/v2/models/{pending[0]}/ready", timeout=1) as r:
                if r.status == 200:
                    pending.pop(0)
                    continue
        except OSError:
            pass
        time.sleep(0.2)
    if pending:
        raise RuntimeError(f"models {pending} not ready within {timeout:.0f} s")


# -- 1. venvs -------------------------------------------------------------------------------

def ensure_venv(cache: Path, name: str) -> Path:
    """The Python of ``name``'s venv, created and installed when missing."""
    venv = cache / "venvs" / name
    python = venv / "bin" / "python"
    marker = venv / ".mip-bench-installed"
    if marker.is_file():
        return python
    if python.is_file() and subprocess.run(
            [str(python), "-c", f"import {name}, onnxruntime"], capture_output=True).returncode == 0:
        marker.write_text(" ".join(PEER_PACKAGES[name]) + "\n")  # installed by hand earlier
        return python
    log(f"creating {venv} and installing {' '.join(PEER_PACKAGES[name])} (a few minutes)")
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--clear", str(venv)], check=True)
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES[name]],
                          capture_output=True, text=True, timeout=1500)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"pip install failed: {tail}")
    marker.write_text(" ".join(PEER_PACKAGES[name]) + "\n")
    return python


# -- 2. models ------------------------------------------------------------------------------

def identity_1m_onnx() -> bytes:
    """ONNX identity of FP32 [-1, 262144]: one row is 1 MiB."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])], "identity_1m",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 262144])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 262144])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="mip")
    model.ir_version = 8
    return model.SerializeToString()


_SPECS = {  # model -> (input name, shape), (output name, shape)
    "identity": (("input", [-1, 16]), ("output", [-1, 16])),
    "mlp": (("input", [-1, 784]), ("logits", [-1, 10])),
    "identity_1m": (("input", [-1, 262144]), ("output", [-1, 262144])),
}


def write_models(work: Path) -> dict[str, Path]:
    """Write the mip repositories (batching on and off) and the peers' model folder."""
    from mip.serving.demo import build_demo_repository

    if work.exists():
        shutil.rmtree(work)
    repos = {}
    for variant, batching in (("mip-batching", True), ("mip-no-batching", False)):
        repo = build_demo_repository(work / variant)
        (repo / "identity_1m" / "1").mkdir(parents=True)
        (repo / "identity_1m" / "1" / "model.onnx").write_bytes(identity_1m_onnx())
        for name in _SPECS:
            config = {"max_batch_size": 64,
                      "dynamic_batching": ({"max_queue_delay_us": 0, "max_queue_size": 1024}
                                           if batching else None)}
            (repo / name / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        repos[variant] = repo
    peers = work / "peers"
    for name, ((iname, ishape), (oname, oshape)) in _SPECS.items():
        folder = peers / name
        folder.mkdir(parents=True)
        src = repos["mip-batching"] / name / "1" / "model.onnx"
        shutil.copyfile(src, folder / "model.onnx")
        (folder / "model-settings.json").write_text(json.dumps({
            "name": name,
            "implementation": "mlserver_runtime.OnnxRuntimeModel",
            "parameters": {"uri": "./model.onnx"},
            "inputs": [{"name": iname, "datatype": "FP32", "shape": ishape}],
            "outputs": [{"name": oname, "datatype": "FP32", "shape": oshape}],
        }, indent=2) + "\n")
    repos["peers"] = peers
    return repos


# -- 3. servers -----------------------------------------------------------------------------

class Server:
    """A server process and the endpoints ``mip bench`` drives: ``[(protocol, url)]``."""

    def __init__(self, name: str, argv: list[str], endpoints: list[tuple[str, str]],
                 env: dict | None = None, cwd: Path | None = None, ready=None,
                 log_path: Path | None = None):
        self.name = name
        self.argv = argv
        self.endpoints = endpoints
        self.env = env
        self.cwd = cwd
        self.ready = ready
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def __enter__(self):
        out = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.ready(self.proc)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def mip_serve_flags() -> set[str]:
    """Which optional listeners ``mip serve`` has (``--grpc``, ``--http``)."""
    text = subprocess.run([sys.executable, "-m", "mip.cli", "serve", "--help"],
                          capture_output=True, text=True, cwd=ROOT).stdout
    return {f for f in ("--grpc", "--http") if f in text}


def mip_server(repo: Path, label: str, logs: Path) -> Server:
    mip_port = free_port()
    argv = [sys.executable, "-m", "mip.cli", "--log-level", "WARNING", "serve",
            "--model-repository", str(repo), "--mip", f"tcp://127.0.0.1:{mip_port}"]
    endpoints = [("mip", f"tcp://127.0.0.1:{mip_port}")]
    flags = mip_serve_flags()
    http_port = None
    if "--grpc" in flags:
        grpc_port = free_port()
        argv += ["--grpc", f"127.0.0.1:{grpc_port}"]
        endpoints.append(("grpc", f"grpc://127.0.0.1:{grpc_port}"))
    if "--http" in flags:
        http_port = free_port()
        argv += ["--http", f"127.0.0.1:{http_port}"]
        endpoints.append(("http", f"http://127.0.0.1:{http_port}"))
        endpoints.append(("http-binary", f"http://127.0.0.1:{http_port}"))

    def ready(proc):
        wait_port(mip_port, proc)
        if http_port:
            wait_ready(http_port, list(_SPECS), proc)
    return Server(label, argv, endpoints, cwd=ROOT, ready=ready,
                  log_path=logs / f"{label.replace('/', '_')}.log")


def mlserver_server(python: Path, peers: Path, logs: Path) -> Server:
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    (peers / "settings.json").write_text(json.dumps({
        "debug": False, "parallel_workers": 0, "http_port": http_port,
        "grpc_port": grpc_port, "metrics_port": metrics_port, "metrics_endpoint": None,
        "host": "127.0.0.1"}, indent=2) + "\n")
    env = dict(os.environ, PYTHONPATH=str(PEERS))
    argv = [str(python.parent / "mlserver"), "start", str(peers)]
    return Server("mlserver", argv,
                  [("grpc", f"grpc://127.0.0.1:{grpc_port}"),
                   ("http", f"http://127.0.0.1:{http_port}")],  # no binary extension
                  env=env, cwd=peers,
                  ready=lambda proc: wait_ready(http_port, list(_SPECS), proc),
                  log_path=logs / "mlserver.log")


def kserve_server(python: Path, peers: Path, logs: Path) -> Server:
    http_port, grpc_port = free_port(), free_port()
    quiet = logs / "kserve-logging.json"
    quiet.write_text(json.dumps({
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
        "loggers": {name: {"handlers": ["stderr"], "level": "WARNING", "propagate": False}
                    for name in ("kserve", "kserve.trace", "uvicorn", "uvicorn.error",
                                 "uvicorn.access")},
    }))
    argv = [str(python), str(PEERS / "kserve_server.py"), "--model_dir", str(peers),
            "--http_port", str(http_port), "--grpc_port", str(grpc_port),
            "--enable_latency_logging", "false", "--log_config_file", str(quiet)]
    return Server("kserve", argv,
                  [("grpc", f"grpc://127.0.0.1:{grpc_port}"),
                   ("http", f"http://127.0.0.1:{http_port}"),
                   ("http-binary", f"http://127.0.0.1:{http_port}")],
                  cwd=peers, ready=lambda proc: wait_ready(http_port, list(_SPECS), proc),
                  log_path=logs / "kserve.log")


def pytriton_server(python: Path, peers: Path, logs: Path) -> Server:
    """Triton through PyTriton: KServe v2 gRPC and REST (binary tensors), metrics off."""
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    argv = [str(python), str(PEERS / "pytriton_server.py"), "--model_dir", str(peers),
            "--http_port", str(http_port), "--grpc_port", str(grpc_port),
            "--metrics_port", str(metrics_port)]
    return Server("pytriton", argv,
                  [("grpc", f"grpc://127.0.0.1:{grpc_port}"),
                   ("http", f"http://127.0.0.1:{http_port}"),
                   ("http-binary", f"http://127.0.0.1:{http_port}")],
                  cwd=peers,
                  ready=lambda proc: wait_ready(http_port, list(_SPECS), proc, timeout=180.0),
                  log_path=logs / "pytriton.log")


def echo_server(logs: Path) -> Server:
    port = free_port()
    return Server("echo", [sys.executable, str(PEERS / "echo_server.py"), "--port", str(port)],
                  [("mip", f"tcp://127.0.0.1:{port}")],
                  ready=lambda proc: wait_port(port, proc), log_path=logs / "echo.log")


# -- 4. measuring ---------------------------------------------------------------------------

def bench(label: str, protocol: str, url: str, model: str | None, shape: list[int],
          args, out: Path, failures: dict | None = None) -> dict | None:
    """Run ``mip bench infer`` for one cell; return its JSON document (None on failure).

    On failure the reason goes in ``failures[label + " " + model]``.
    """
    path = out / f"{label.replace('/', '_').replace(' ', '_')}-{model or 'echo'}-{shape[-1]}.json"
    argv = [sys.executable, "-m", "mip.cli", "--log-level", "WARNING", "bench", "infer", url,
            "--protocol", protocol, "--concurrency", args.concurrency,
            "--duration", str(args.duration), "--warmup", str(args.warmup),
            "--label", label, "--json", str(path), "--no-progress"]
    if model:
        argv += ["--model", model]
    if protocol == "mip":
        argv += ["--shape", ",".join(map(str, shape))]
    log(f"{label}: {model or 'echo'} {shape} over {protocol}")
    budget = len(args.concurrency.split(",")) * (args.duration + args.warmup + 15) + 60
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=budget)
    except subprocess.TimeoutExpired:
        log(f"  timed out after {budget:.0f} s")
        if failures is not None:
            failures[f"{label} {model}"] = f"mip bench timed out after {budget:.0f} s"
        return None
    if proc.returncode != 0 or not path.is_file():
        log(f"  failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")
        if failures is not None:
            failures[f"{label} {model}"] = (f"mip bench failed ({proc.returncode}): "
                                            f"{proc.stderr.strip()[-300:]}")
        return None
    print(proc.stdout, end="", flush=True)
    doc = json.loads(path.read_text())
    doc["cell_model"] = CELLS[[c[1] for c in CELLS].index(shape)][0]
    if model is None:  # the echo runs carry no model name: file them under their cell
        doc["target"]["model"] = doc["cell_model"]
    path.write_text(json.dumps(doc, indent=2) + "\n")
    doc["path"] = str(path)
    return doc


def warm(protocol: str, url: str, model: str | None) -> None:
    """Load a freshly started server for 2 s, unmeasured, so that the first cell measured
    does not also pay for a cold process (the same for every server)."""
    argv = [sys.executable, "-m", "mip.cli", "--log-level", "ERROR", "bench", "infer", url,
            "--protocol", protocol, "--concurrency", "8", "--duration", "1", "--warmup", "1",
            "--no-progress"]
    if model:
        argv += ["--model", model]
    if protocol == "mip":
        argv += ["--shape", "1,16"]
    subprocess.run(argv, capture_output=True, cwd=ROOT, timeout=120, check=False)


# -- 5. report ------------------------------------------------------------------------------

def step_at(doc: dict, c: int) -> dict | None:
    return next((s for s in doc["steps"] if s["concurrency"] == c), None)


def summarize(docs: list[dict], concurrencies: list[int]) -> tuple[str, dict]:
    """The comparison table (with ratios against the best peer) and the goals' verdicts."""
    lines = []
    head = (f"{'cell':<12} {'c':>3}  {'server/protocol':<28} {'req/s':>9} {'p50 ms':>8} "
            f"{'p99 ms':>8} {'errors':>6} {'x best peer':>11} {'x same proto':>12} "
            f"{'client CPU':>10}")
    lines += [head, "-" * len(head)]
    best: dict = {}
    for model, _ in CELLS:
        for c in concurrencies:
            rows = []
            for doc in docs:
                if doc["cell_model"] != model:
                    continue
                s = step_at(doc, c)
                if s is not None:
                    rows.append((doc["label"], s))
            peers = [(label, s) for label, s in rows if label.split("/")[0] in PEERS_MEASURED]
            good_peers = [(label, s) for label, s in peers if s["responses"]]
            best_peer = max(good_peers, key=lambda r: r[1]["throughput_rps"], default=None)
            best[(model, c)] = {"rows": rows, "best_peer": best_peer, "peers": good_peers}
            for label, s in sorted(rows, key=lambda r: -r[1]["throughput_rps"]):
                ratio = (s["throughput_rps"] / best_peer[1]["throughput_rps"]
                         if best_peer and best_peer[1]["throughput_rps"] else None)
                same = best_of_protocol(good_peers, label.split("/")[1].split()[0])
                same_ratio = (s["throughput_rps"] / same[1]["throughput_rps"]
                              if same and same[1]["throughput_rps"] else None)
                p50, p99 = s["latency_ms"]["p50"], s["latency_ms"]["p99"]
                lines.append(
                    f"{model:<12} {c:>3}  {label:<28} {s['throughput_rps']:>9,.0f} "
                    f"{p50 if p50 is not None else float('nan'):>8.3f} "
                    f"{p99 if p99 is not None else float('nan'):>8.3f} {s['errors']:>6} "
                    f"{(f'{ratio:.2f}x' if ratio else '-'):>11} "
                    f"{(f'{same_ratio:.2f}x' if same_ratio else '-'):>12} "
                    f"{s['client_cpu_percent']:>9.0f}%")
            lines.append("")
    goals = check_goals(best, concurrencies)
    goals["markdown"] = markdown(best, concurrencies)
    lines.append("Goals (at concurrency 32 unless said):")
    for g in goals["checks"]:
        lines.append(f"  [{g['verdict']}] {g['goal']}: {g['measured']}")
    return "\n".join(lines), goals


_CELL_TITLES = {"identity": "identity, FP32 1x16 (64 B)",
                "mlp": "mlp, FP32 1x784 (3 KiB in, 40 B out)",
                "identity_1m": "identity_1m, FP32 1x262144 (1 MiB each way)"}


def markdown(best: dict, concurrencies: list[int]) -> str:
    """One Markdown table per cell: req/s (p99 ms) per concurrency, and each row's ratio
    to the best peer row of the same protocol at the highest concurrency."""
    out = []
    top = max(concurrencies)
    for model, _ in CELLS:
        labels: dict[str, dict] = {}
        for c in concurrencies:
            for label, st in best.get((model, c), {}).get("rows", []):
                labels.setdefault(label, {})[c] = st
        if not labels:
            continue
        out += [f"**{_CELL_TITLES.get(model, model)}**", "",
                "| server / protocol | " + " | ".join(f"c={c} req/s (p99 ms)" for c in concurrencies)
                + f" | c={top} vs best peer, same protocol |",
                "| --- | " + " | ".join("---:" for _ in concurrencies) + " | ---: |"]
        peers = best.get((model, top), {}).get("peers", [])
        order = sorted(labels, key=lambda lab: -labels[lab].get(top, {}).get("throughput_rps", 0))
        for label in order:
            cells = []
            for c in concurrencies:
                st = labels[label].get(c)
                if st is None:
                    cells.append("-")
                    continue
                p99 = st["latency_ms"]["p99"]
                err = f", {st['errors']} errors" if st["errors"] else ""
                cells.append(f"{st['throughput_rps']:,.0f} ({'-' if p99 is None else f'{p99:,.2f}'}{err})")
            protocol = label.split("/")[1].split()[0]
            same = best_of_protocol(peers, protocol)
            st = labels[label].get(top)
            ratio = (f"{st['throughput_rps'] / same[1]['throughput_rps']:.2f}x"
                     if st and same and same[1]["throughput_rps"] else "-")
            out.append(f"| {label} | " + " | ".join(cells) + f" | {ratio} |")
        out.append("")
    return "\n".join(out)


def best_of_protocol(peers: list, protocol: str):
    """The peer row of ``protocol`` (``grpc``, ``rest-json``, ...) with the most req/s."""
    same = [(label, s) for label, s in peers if label.split("/")[1] == protocol]
    return max(same, key=lambda r: r[1]["throughput_rps"], default=None)


def _tput(best, model, c, label):
    for lab, s in best.get((model, c), {}).get("rows", []):
        if lab == label:
            return s
    return None


def check_goals(best: dict, concurrencies: list[int]) -> dict:
    checks = []
    c = 32 if 32 in concurrencies else max(concurrencies)
    ours = "mip/mip batching"

    def add(goal, ok, measured):
        checks.append({"goal": goal, "verdict": "n/a" if ok is None else ("PASS" if ok else "MISS"),
                       "measured": measured})

    for model, factor in (("identity", 5.0), ("mlp", 5.0), ("identity_1m", 2.0)):
        s = _tput(best, model, c, ours)
        bp = best.get((model, c), {}).get("best_peer")
        if s is None or bp is None:
            add(f"{model}: MIP >= {factor:g}x the best peer", None, "not measured")
            continue
        r = s["throughput_rps"] / bp[1]["throughput_rps"]
        add(f"{model}: MIP >= {factor:g}x the best peer", r >= factor,
            f"{s['throughput_rps']:,.0f} vs {bp[0]} {bp[1]['throughput_rps']:,.0f} req/s = {r:.2f}x")
    s, e = _tput(best, "identity", c, ours), _tput(best, "identity", c, "echo/mip")
    if s and e:
        r = s["throughput_rps"] / e["throughput_rps"]
        add("identity: MIP >= 25% of the echo ceiling", r >= 0.25,
            f"{s['throughput_rps']:,.0f} vs {e['throughput_rps']:,.0f} req/s = {100 * r:.0f}%")
    else:
        add("identity: MIP >= 25% of the echo ceiling", None, "not measured")
    misses = []
    measured_any = False
    for (model, cc), entry in best.items():
        s = _tput(best, model, cc, ours)
        if s is None or not entry["peers"]:
            continue
        measured_any = True
        lowest = min(entry["peers"], key=lambda r: r[1]["latency_ms"]["p99"])
        if s["latency_ms"]["p99"] >= lowest[1]["latency_ms"]["p99"]:
            misses.append(f"{model} c={cc}: {s['latency_ms']['p99']:.2f} ms vs {lowest[0]} "
                          f"{lowest[1]['latency_ms']['p99']:.2f} ms")
    add("MIP p99 lower than every peer's in every cell", (not misses) if measured_any else None,
        "; ".join(misses) if misses else "lower everywhere")
    # the KServe v2 frontends: each protocol against the peers' rows of the same protocol,
    # at every concurrency (equal load)
    for protocol, factor, models in (("grpc", 1.5, ("identity", "mlp", "identity_1m")),
                                     ("rest-json", 1.5, ("identity", "mlp", "identity_1m")),
                                     ("rest-binary", 2.0, ("identity_1m",))):
        goal = (f"{protocol}: {OURS[protocol]} >= {factor:g}x the best peer's {protocol} "
                f"({', '.join(models)}; every concurrency)")
        worst, found = None, False
        for model in models:
            for cc in concurrencies:
                entry = best.get((model, cc), {})
                s = _tput(best, model, cc, OURS[protocol])
                bp = best_of_protocol(entry.get("peers", []), protocol)
                if s is None or bp is None:
                    continue
                found = True
                r = s["throughput_rps"] / bp[1]["throughput_rps"]
                if worst is None or r < worst[0]:
                    worst = (r, model, cc, s["throughput_rps"], bp)
        if not found:
            add(goal, None, "not measured")
            continue
        r, model, cc, ours_rps, bp = worst
        add(goal, r >= factor, f"lowest {r:.2f}x ({model} c={cc}: {ours_rps:,.0f} vs "
                               f"{bp[0]} {bp[1]['throughput_rps']:,.0f} req/s)")
    for protocol, label in OURS.items():
        misses, measured_any = [], False
        for (model, cc), entry in best.items():
            s = _tput(best, model, cc, label)
            same = [(lab, st) for lab, st in entry.get("peers", [])
                    if lab.split("/")[1] == protocol and st["latency_ms"]["p99"] is not None]
            if s is None or not same or s["latency_ms"]["p99"] is None:
                continue
            measured_any = True
            lowest = min(same, key=lambda r: r[1]["latency_ms"]["p99"])
            if s["latency_ms"]["p99"] >= lowest[1]["latency_ms"]["p99"]:
                misses.append(f"{model} c={cc}: {s['latency_ms']['p99']:.2f} ms vs {lowest[0]} "
                              f"{lowest[1]['latency_ms']['p99']:.2f} ms")
        add(f"{protocol}: p99 lower than every peer's {protocol} in every cell",
            (not misses) if measured_any else None,
            "; ".join(misses) if misses else "lower everywhere")
    on, off = _tput(best, "mlp", c, ours), _tput(best, "mlp", c, "mip/mip no batching")
    if on and off:
        r = on["throughput_rps"] / off["throughput_rps"]
        add("mlp: dynamic batching >= 2x our own throughput", r >= 2.0,
            f"{on['throughput_rps']:,.0f} vs {off['throughput_rps']:,.0f} req/s = {r:.2f}x")
    else:
        add("mlp: dynamic batching >= 2x our own throughput", None, "not measured")
    return {"concurrency": c, "checks": checks}


# -- 6. against Triton's own server, with h2load beside mip bench ---------------------------

#: the Triton comparison's cells: (model, concurrency, protocols)
TRITON_CELLS = [
    ("identity", 32, ("mip", "grpc", "http", "http-binary")),
    ("mlp", 32, ("mip", "grpc", "http", "http-binary")),
    ("identity", 1, ("mip", "grpc", "http", "http-binary")),
    ("identity_1m", 32, ("mip", "grpc", "http-binary")),  # JSON of 1 MiB: seconds a request
]
GENERATORS = ("h2load", "mip-bench")
#: the cells the echo server of MIP frames (bench/peers/echo_server.py) is measured in: the
#: same frames as identity's, less the model's name
ECHO_CELLS = {("identity", 32), ("identity", 1), ("identity_1m", 32)}
_GRPC_PATH = "/inference.GRPCInferenceService/ModelInfer"


def pytriton_package(python: Path) -> Path:
    """The ``pytriton`` package folder of PyTriton's venv (the wheel's ``tritonserver``)."""
    found = sorted(python.parent.parent.glob("lib/python*/site-packages/pytriton"))
    if not found:
        raise RuntimeError(f"no pytriton package beside {python}")
    return found[0]


def write_triton_repository(work: Path, onnx_from: Path) -> Path:
    """A Triton model repository: ``NAME/config.pbtxt`` (Python backend, dynamic batching up
    to 64 rows, one CPU instance) and ``NAME/1/model.py`` (``bench/peers/triton_model.py``)
    beside ``NAME/1/model.onnx``, for every model of the comparison."""
    repo = work / "triton"
    if repo.exists():
        shutil.rmtree(repo)
    for name, ((iname, ishape), (oname, oshape)) in _SPECS.items():
        version = repo / name / "1"
        version.mkdir(parents=True)
        shutil.copyfile(onnx_from / name / "1" / "model.onnx", version / "model.onnx")
        shutil.copyfile(PEERS / "triton_model.py", version / "model.py")
        (repo / name / "config.pbtxt").write_text(
            f'name: "{name}"\nbackend: "python"\nmax_batch_size: 64\n'
            f'input [ {{ name: "{iname}" data_type: TYPE_FP32 dims: [ {ishape[-1]} ] }} ]\n'
            f'output [ {{ name: "{oname}" data_type: TYPE_FP32 dims: [ {oshape[-1]} ] }} ]\n'
            'dynamic_batching { }\n'
            'instance_group [ { count: 1 kind: KIND_CPU } ]\n')
    return repo


def triton_server(python: Path, repo: Path, logs: Path,
                  models: list[str] | None = None) -> Server:
    """The ``tritonserver`` binary of the PyTriton wheel, run directly on ``repo`` with the
    wheel's backends folder; KServe v2 HTTP (binary tensors) and gRPC, metrics off.
    ``models``: load only these (explicit model control), else every model of ``repo``."""
    package = pytriton_package(python)
    tritonserver = package / "tritonserver"
    http_port, grpc_port = free_port(), free_port()
    libdir, version = subprocess.run(
        [str(python), "-c", "import sys, sysconfig; print(sysconfig.get_config_var('LIBDIR')); "
                            "print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
        capture_output=True, text=True, check=True).stdout.split()
    # The wheel's backends folder holds the Python backend without its stub, which comes
    # per Python version (python_backend_stubs/3.X/): a copy of the folder gets the venv's.
    backends = repo.parent / "triton-backends"
    if backends.exists():
        shutil.rmtree(backends)
    shutil.copytree(tritonserver / "backends", backends)
    shutil.copy(tritonserver / "python_backend_stubs" / version / "triton_python_backend_stub",
                backends / "python" / "triton_python_backend_stub")
    libs = [libdir, str(package.parent / "nvidia_pytriton.libs"),
            *filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep))]
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(libs),
               PYTHONPATH=str(package.parent),  # the stub's Python finds onnxruntime, numpy
               PATH=f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    argv = [str(tritonserver / "bin" / "tritonserver"),
            "--model-repository", str(repo),
            "--backend-directory", str(backends),
            "--http-address", "127.0.0.1", "--http-port", str(http_port),
            "--grpc-address", "127.0.0.1", "--grpc-port", str(grpc_port),
            "--allow-metrics", "false", "--allow-gpu-metrics", "false",
            "--allow-cpu-metrics", "false", "--log-verbose", "0", "--log-info", "false"]
    if models:
        argv += ["--model-control-mode", "explicit", *[f"--load-model={m}" for m in models]]
    return Server("triton", argv,
                  [("grpc", f"grpc://127.0.0.1:{grpc_port}"),
                   ("http", f"http://127.0.0.1:{http_port}"),
                   ("http-binary", f"http://127.0.0.1:{http_port}")],
                  env=env, cwd=repo,
                  ready=lambda proc: wait_ready(http_port, models or list(_SPECS), proc,
                                                timeout=180.0),
                  log_path=logs / "triton.log")


def triton_peer(python: Path, peers: Path, logs: Path) -> Server:
    """:func:`triton_server` on a repository written beside the peers' model folder."""
    work = peers.parent  # beside the mip repositories (write_models)
    return triton_server(python, write_triton_repository(work, work / "mip-batching"), logs)


def process_tree_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread) of ``pid`` and all its descendants, from
    /proc (children that already exited are not counted: none do while a server runs)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}  # pid -> (parent, seconds)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        fields = raw[raw.rindex(b")") + 2:].split()  # after "pid (comm) "
        stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    tree, total = {pid}, 0.0
    changed = True
    while changed:
        changed = False
        for child, (parent, _) in stats.items():
            if parent in tree and child not in tree:
                tree.add(child)
                changed = True
    for member in tree:
        total += stats.get(member, (0, 0.0))[1]
    return total


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / tick, sum(values[:8]) / tick


def children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def request_bodies(url: str, protocol: str, model: str, work: Path) -> tuple[Path, list[str], str]:
    """The body file, extra headers and URL h2load sends for one cell: one gRPC-framed
    ``ModelInferRequest`` (built by ``mip bench``'s own request code), or the REST JSON or
    binary-tensor body."""
    from mip.bench.drivers import GrpcDriver, HttpDriver, InferTarget, make_tensor

    (iname, ishape), (oname, _) = _SPECS[model]
    shape = [1, ishape[-1]]
    target = InferTarget(url=url, protocol=protocol, model=model,
                         inputs=[(iname, "FP32", shape)], outputs=[oname])
    arrays = [make_tensor("FP32", shape)]
    body = work / f"{model}-{protocol}.body"
    base = url.split("://", 1)[1]
    if protocol == "grpc":
        payload = GrpcDriver(target, arrays).payload
        body.write_bytes(b"\x00" + len(payload).to_bytes(4, "big") + payload)
        return body, ["content-type: application/grpc", "te: trailers"], f"http://{base}{_GRPC_PATH}"
    driver = HttpDriver(target, arrays, binary=protocol == "http-binary", concurrency=1)
    body.write_bytes(driver.body)
    headers = [f"{k.lower()}: {v}" for k, v in driver.headers.items()]
    return body, headers, f"http://{base}/v2/models/{model}/infer"


def check_grpc_status(body: Path, headers: list[str], url: str) -> str | None:
    """Send the h2load body once with ``nghttp`` (a real HTTP/2 client) and read the gRPC
    status from the trailers; None when it is 0, the problem otherwise."""
    argv = ["nghttp", "-v", "-n", "-d", str(body), *[x for h in headers for x in ("-H", h)], url]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nghttp: {exc}"
    statuses = [line.split("grpc-status:", 1)[1].strip() for line in out.splitlines()
                if "grpc-status:" in line]
    if statuses == ["0"]:
        return None
    message = [line.split("grpc-message:", 1)[1].strip() for line in out.splitlines()
               if "grpc-message:" in line]
    return f"grpc-status {statuses or 'missing'} {message}"


def _h2load(body: Path, headers: list[str], url: str, protocol: str, concurrency: int,
            count: int | None, duration: float | None, log_file: Path | None) -> dict:
    """One h2load run: a fixed ``count`` of requests, or ``duration`` seconds."""
    if protocol == "grpc":  # HTTP/2: 4 connections x 8 streams at 32 in flight
        conns = min(4, concurrency)
        shape = ["-c", str(conns), "-m", str(max(1, concurrency // conns))]
    else:  # HTTP/1.1: one connection a request in flight
        shape = ["--h1", "-c", str(concurrency), "-m", "1"]
    argv = ["h2load", *shape, "-d", str(body), *[x for h in headers for x in ("-H", h)],
            *(["-n", str(count)] if count else ["-D", f"{round(1000 * (duration or 1))}ms"]),
            *(["--log-file", str(log_file)] if log_file else []), url]
    proc = subprocess.run(argv, capture_output=True, text=True,
                          timeout=(duration or 0) + 300)
    out = proc.stdout
    doc: dict = {"argv": argv}
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("finished in"):
            doc["throughput_rps"] = float(line.split(",")[1].split()[0])
        elif line.startswith("requests:"):
            parts = dict((k, int(v)) for v, k in
                         (p.split()[:2] for p in line.split(":", 1)[1].split(",")))
            doc.update(requests=parts.get("total", 0), succeeded=parts.get("succeeded", 0),
                       failed=parts.get("failed", 0) + parts.get("errored", 0)
                       + parts.get("timeout", 0))
        elif line.startswith("status codes:"):
            codes = dict((k, int(v)) for v, k in
                         (p.split()[:2] for p in line.split(":", 1)[1].split(",")))
            doc["non_2xx"] = sum(v for k, v in codes.items() if k != "2xx")
    if "throughput_rps" not in doc:
        raise RuntimeError(f"h2load failed ({proc.returncode}): "
                           f"{(proc.stderr or out).strip()[-300:]}")
    if log_file and log_file.is_file():
        import numpy as np

        elapsed = [int(line.split("\t")[2]) for line in log_file.read_text().splitlines()
                   if line.count("\t") >= 2]
        if elapsed:
            a = np.asarray(elapsed) / 1000.0
            doc["latency_ms"] = {"p50": float(np.percentile(a, 50)),
                                 "p99": float(np.percentile(a, 99))}
        log_file.unlink()
    return doc


def _mip_bench(protocol: str, url: str, model: str, concurrency: int, count: int | None,
               duration: float | None, work: Path, named: bool = True) -> dict:
    """One ``mip bench infer`` run: a fixed ``count`` of requests, or ``duration`` s.
    ``named``: the requests name ``model`` (the echo server's frames carry no name, only
    the model's shape)."""
    path = work / "mip-bench.json"
    argv = [sys.executable, "-m", "mip.cli", "--log-level", "ERROR", "bench", "infer", url,
            "--protocol", protocol, *(["--model", model] if named else []),
            "--concurrency", str(concurrency),
            "--warmup", "0", "--json", str(path), "--no-progress"]
    argv += (["--max-requests", str(count), "--duration", "3600"] if count
             else ["--duration", str(duration)])
    if protocol == "mip":
        argv += ["--shape", f"1,{_SPECS[model][0][1][-1]}"]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=600)
    if proc.returncode != 0 or not path.is_file():
        raise RuntimeError(f"mip bench failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
    step = json.loads(path.read_text())["steps"][0]
    path.unlink()
    return {"throughput_rps": step["throughput_rps"], "requests": step["requests"],
            "succeeded": step["responses"], "failed": step["errors"],
            "latency_ms": {"p50": step["latency_ms"]["p50"], "p99": step["latency_ms"]["p99"]}}


def measure_cpu_cell(server: Server, generator: str, protocol: str, model: str,
                     concurrency: int, duration: float, work: Path) -> dict:
    """One cell: a 1 s run (warms the server and finds its rate), then a fixed number of
    requests (about ``duration`` seconds' worth) with the server's process-tree CPU read
    from /proc before and after: CPU per request is that difference over the count."""
    url = dict(server.endpoints)[protocol]
    assert server.proc is not None
    if generator == "h2load":
        body, headers, target = request_bodies(url, protocol, model, work)

        def run(count, seconds, log_file=None):
            return _h2load(body, headers, target, protocol, concurrency, count, seconds, log_file)
    else:
        def run(count, seconds, log_file=None):
            return _mip_bench(protocol, url, model, concurrency, count, seconds, work,
                              named=server.name != "echo")
    rate = run(None, 1.0)["throughput_rps"]
    count = int(min(max(rate * duration, 20 * concurrency, 50), 200_000))
    cpu0, busy0, client0 = process_tree_cpu(server.proc.pid), machine_busy(), children_cpu()
    t0 = time.perf_counter()
    doc = run(count, None, work / "h2load.log")
    wall = time.perf_counter() - t0
    cpu1, busy1, client1 = process_tree_cpu(server.proc.pid), machine_busy(), children_cpu()
    done = max(doc.get("succeeded", 0), 1)
    server_cpu = cpu1 - cpu0
    client_cpu = client1 - client0
    machine = busy1[0] - busy0[0]
    doc.update(generator=generator, protocol=protocol, model=model, concurrency=concurrency,
               count=count, wall_s=wall,
               server_cpu_s=server_cpu, server_cpu_us=1e6 * server_cpu / done,
               client_cpu_us=1e6 * client_cpu / done,
               server_cores=server_cpu / wall, client_cores=client_cpu / wall,
               other_cores=max(0.0, machine - server_cpu - client_cpu) / wall)
    return doc


def triton_compare(args, repos: dict, logs: Path) -> int:
    """``--against-triton``: mip serve and Triton's own server, both running, measured cell by
    cell in alternating order, by h2load and by mip bench; table, ratios, goals."""
    python = ensure_venv(args.cache_dir, "pytriton")
    for tool in ("h2load", "nghttp"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install nghttp2-client")
    triton_repo = write_triton_repository(args.cache_dir / "models", repos["mip-batching"])
    work = args.out / "triton"
    work.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    rows: list[dict] = []
    problems: dict[str, str] = {}
    servers = {"mip": mip_server(repos["mip-batching"], "mip batching", logs),
               "triton": triton_server(python, triton_repo, logs),
               "echo": echo_server(logs)}
    with servers["mip"], servers["triton"], servers["echo"]:
        for name, server in servers.items():  # h2load's gRPC must really succeed
            if "grpc" not in dict(server.endpoints):
                continue
            for model in _SPECS:
                body, headers, url = request_bodies(dict(server.endpoints)["grpc"], "grpc",
                                                    model, work)
                problem = check_grpc_status(body, headers, url)
                if problem:
                    problems[f"{name} grpc {model}"] = problem
                    log(f"{name}: h2load's gRPC request to {model} fails: {problem}")
        for number in range(1, args.rounds + 1):
            order = ["mip", "triton", "echo"] if number % 2 else ["echo", "triton", "mip"]
            log(f"round {number} of {args.rounds}")
            for model, concurrency, protocols in TRITON_CELLS:
                for protocol in protocols:
                    for generator in GENERATORS:
                        if generator == "h2load" and protocol == "mip":
                            continue  # h2load speaks HTTP only
                        for name in order:
                            if protocol not in dict(servers[name].endpoints) or (
                                    name == "echo" and (model, concurrency) not in ECHO_CELLS):
                                continue
                            key = f"{name} {generator} {protocol} {model} c={concurrency}"
                            try:
                                doc = measure_cpu_cell(servers[name], generator, protocol, model,
                                                       concurrency, args.duration, work)
                            except Exception as exc:
                                problems[key] = str(exc)
                                log(f"{key}: {exc}")
                                continue
                            doc.update(server=name, round=number)
                            rows.append(doc)
                            log(f"{key}: {doc['throughput_rps']:,.0f} req/s, "
                                f"{doc['server_cpu_us']:,.0f} us server CPU a request")
    load1 = os.getloadavg()
    best = best_cpu_rows(rows)
    table = triton_table(best) + "\n\n" + echo_table(best)
    goals = triton_goals(best)
    other = [r["other_cores"] for r in rows]
    load = (f"load average {load0[0]:.1f} before, {load1[0]:.1f} after; other processes used "
            f"{min(other, default=0):.2f}-{max(other, default=0):.2f} cores "
            f"(mean {sum(other) / max(len(other), 1):.2f}) of 2 during the cells")
    print(table)
    print()
    print("Goals (h2load rows decide; mip bench rows in brackets):")
    for g in goals:
        print(f"  [{g['verdict']}] {g['goal']}: {g['measured']}")
    print(f"\nMachine: {load}")
    if problems:
        print("\nProblems:")
        for k, v in problems.items():
            print(f"  {k}: {v}")
    (args.out / "triton_compare.json").write_text(json.dumps(
        {"rounds": args.rounds, "duration_s": args.duration, "machine_load": load,
         "rows": rows, "goals": goals, "problems": problems, "table": table}, indent=2) + "\n")
    print(f"\nJSON: {args.out / 'triton_compare.json'}")
    return 0


def best_cpu_rows(rows: list[dict]) -> dict:
    """(server, generator, protocol, model, concurrency) -> the round with the most req/s,
    with the lowest CPU per request of all rounds beside it (noise only ever adds CPU)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["server"], r["generator"], r["protocol"], r["model"],
                           r["concurrency"]), []).append(r)
    best = {}
    for key, group in groups.items():
        top = dict(max(group, key=lambda r: r["throughput_rps"]))
        top["server_cpu_us_min"] = min(r["server_cpu_us"] for r in group)
        top["rounds_rps"] = [round(r["throughput_rps"]) for r in group]
        top["rounds_cpu_us"] = [round(r["server_cpu_us"], 1) for r in group]
        best[key] = top
    return best


def _fmt_ms(doc: dict, key: str) -> str:
    value = doc.get("latency_ms", {}).get(key)
    return "-" if value is None else f"{value:.2f}"


def _pair(m: dict | None, t: dict | None, fmt) -> str:
    return " / ".join("-" if d is None else fmt(d) for d in (m, t))


def triton_table(best: dict) -> str:
    """Markdown: one row per (cell, protocol, generator): mip and Triton side by side."""
    out = ["| cell | protocol | generator | req/s mip / Triton | ratio | p50 ms mip / Triton "
           "| p99 ms mip / Triton | server CPU µs a request mip / Triton | ratio |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for model, concurrency, protocols in TRITON_CELLS:
        for protocol in protocols:
            for generator in GENERATORS:
                m = best.get(("mip", generator, protocol, model, concurrency))
                t = best.get(("triton", generator, protocol, model, concurrency))
                if m is None and t is None:
                    continue
                name = PROTOCOL_NAMES[protocol]
                rps = _pair(m, t, lambda d: f"{d['throughput_rps']:,.0f}")
                cpu = _pair(m, t, lambda d: f"{d['server_cpu_us_min']:,.0f}")
                r_rps = (f"{m['throughput_rps'] / t['throughput_rps']:.2f}x"
                         if m and t and t["throughput_rps"] else "-")
                r_cpu = (f"{m['server_cpu_us_min'] / t['server_cpu_us_min']:.2f}x"
                         if m and t and t["server_cpu_us_min"] else "-")
                fails = sum(d.get("failed", 0) + d.get("non_2xx", 0) for d in (m, t) if d)
                out.append(f"| {model} c={concurrency} | {name} | {generator} | {rps} | {r_rps} | "
                           f"{_pair(m, t, lambda d: _fmt_ms(d, 'p50'))} | "
                           f"{_pair(m, t, lambda d: _fmt_ms(d, 'p99'))} | {cpu} | {r_cpu} |"
                           + (f" {fails} failed" if fails else ""))
    return "\n".join(out)


def echo_table(best: dict) -> str:
    """Markdown: mip serve over MIP against the echo server of the same frames."""
    out = ["| cell (mip bench, MIP) | req/s mip / echo | ratio | p50 ms mip / echo "
           "| p99 ms mip / echo | server CPU µs a request mip / echo | ratio |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for model, concurrency in sorted(ECHO_CELLS):
        m = best.get(("mip", "mip-bench", "mip", model, concurrency))
        e = best.get(("echo", "mip-bench", "mip", model, concurrency))
        if m is None or e is None:
            continue
        rps = _pair(m, e, lambda d: f"{d['throughput_rps']:,.0f}")
        cpu = _pair(m, e, lambda d: f"{d['server_cpu_us_min']:,.1f}")
        out.append(f"| {model} c={concurrency} | {rps} | "
                   f"{m['throughput_rps'] / e['throughput_rps']:.2f} | "
                   f"{_pair(m, e, lambda d: _fmt_ms(d, 'p50'))} | "
                   f"{_pair(m, e, lambda d: _fmt_ms(d, 'p99'))} | {cpu} | "
                   f"{m['server_cpu_us_min'] / e['server_cpu_us_min']:.2f}x |")
    return "\n".join(out)


def triton_goals(best: dict) -> list[dict]:
    """The goals against Triton, per protocol; h2load's rows decide (mip bench's shown)."""
    checks = []

    def ratio(generator, protocol, model, c, field):
        m = best.get(("mip", generator, protocol, model, c))
        t = best.get(("triton", generator, protocol, model, c))
        if not m or not t:
            return None
        if field == "cpu":
            a, b = m["server_cpu_us_min"], t["server_cpu_us_min"]
        elif field == "rps":
            a, b = m["throughput_rps"], t["throughput_rps"]
        else:
            a, b = m.get("latency_ms", {}).get(field), t.get("latency_ms", {}).get(field)
        return (a / b, a, b) if a is not None and b else None

    def add(goal, generator, protocol, cells, field, ok):
        found = [(cell, ratio(generator, protocol, cell[0], cell[1], field)) for cell in cells]
        found = [(cell, r) for cell, r in found if r is not None]
        other = "mip-bench" if generator == "h2load" else None
        also = ""
        if other:
            o = [ratio(other, protocol, m, c, field) for m, c in cells]
            o = [r[0] for r in o if r is not None]
            also = f" [mip bench: {', '.join(f'{r:.2f}x' for r in o)}]" if o else ""
        if not found:
            checks.append({"goal": goal, "verdict": "n/a", "measured": "not measured" + also})
            return
        verdict = all(ok(r[0]) for _, r in found)
        measured = "; ".join(f"{m} c={c}: {r[1]:,.1f} / {r[2]:,.1f} = {r[0]:.2f}x"
                             for (m, c), r in found)
        checks.append({"goal": goal, "verdict": "PASS" if verdict else "MISS",
                       "measured": measured + also})

    small = [("identity", 32), ("mlp", 32)]
    for protocol in ("grpc", "http", "http-binary"):
        name = PROTOCOL_NAMES[protocol]
        add(f"{name}: server CPU a request <= 0.4x Triton's", "h2load", protocol, small,
            "cpu", lambda r: r <= 0.4)
        add(f"{name}: req/s >= 1.5x Triton's at 32 in flight", "h2load", protocol, small,
            "rps", lambda r: r >= 1.5)
        add(f"{name}: p99 <= Triton's at 32 in flight", "h2load", protocol, small,
            "p99", lambda r: r <= 1.0)
        add(f"{name}: c=1 p50 <= Triton's", "h2load", protocol, [("identity", 1)],
            "p50", lambda r: r <= 1.0)
    for protocol in ("grpc", "http-binary"):
        add(f"{PROTOCOL_NAMES[protocol]}: 1 MiB req/s >= 1.5x Triton's at 32 in flight",
            "h2load", protocol, [("identity_1m", 32)], "rps", lambda r: r >= 1.5)
    checks.extend(mip_goals(best))
    return checks


def mip_goals(best: dict) -> list[dict]:
    """MIP's goals: against the echo server of the same frames, and at concurrency 1 against
    Triton's fastest protocol (mip bench drives both, so the client is the same)."""
    checks = []

    def row(server, protocol, model, c):
        return best.get((server, "mip-bench", protocol, model, c))

    def add(goal, a, b, what, ok):
        if a is None or b is None or not b:
            checks.append({"goal": goal, "verdict": "n/a", "measured": "not measured"})
            return
        checks.append({"goal": goal, "verdict": "PASS" if ok(a / b) else "MISS",
                       "measured": f"{what}: {a:,.1f} / {b:,.1f} = {a / b:.2f}x"})

    m, e = row("mip", "mip", "identity", 32), row("echo", "mip", "identity", 32)
    add("mip: server CPU a request <= 3x the echo server's", m and m["server_cpu_us_min"],
        e and e["server_cpu_us_min"], "identity c=32, µs", lambda r: r <= 3.0)
    m, e = row("mip", "mip", "identity_1m", 32), row("echo", "mip", "identity_1m", 32)
    add("mip: 1 MiB req/s >= 70% of the echo ceiling", m and m["throughput_rps"],
        e and e["throughput_rps"], "identity_1m c=32, req/s", lambda r: r >= 0.7)
    m = row("mip", "mip", "identity", 1)
    triton = [r["latency_ms"]["p50"] for p in ("grpc", "http", "http-binary")
              if (r := row("triton", p, "identity", 1)) and r.get("latency_ms", {}).get("p50")]
    add("mip: c=1 p50 <= Triton's (its fastest protocol)",
        m and m.get("latency_ms", {}).get("p50"), min(triton, default=None),
        "identity c=1, ms", lambda r: r <= 1.0)
    return checks


# -- 7. where a request's CPU goes in mip serve ---------------------------------------------

#: (category, frame patterns): a sample is filed under the category of its innermost frame
#: that matches one of these (searched leaf first; for each frame, categories in this order)
PROFILE_RULES = [
    ("ONNX Runtime", ("onnxruntime", "OrtRun")),
    ("garbage collector", ("gc_collect",)),
    ("write", ("write (libc", "writev (libc", "sendmsg (libc", "send (libc", "UVStream__try_write",
               "UVStream_write", "nghttp2_session_mem_send", "data_to_send", "send_data",
               "RequestResponseCycle.send", "_flush", "writelines")),
    ("read", ("read (libc", "recv (libc", "recvmsg (libc", "uv__read", "buffer_updated",
              "get_buffer")),
    ("thread hand-off", ("sem_post", "pthread_cond_signal", "SimpleQueue", "ThreadPoolExecutor",
                         "run_in_executor", "call_soon_threadsafe", "Semaphore", "_worker (",
                         "_deliver", "_threaded", "wrap_future", "_copy_future_state")),
    ("batcher", ("mip/serving/batching",)),
    ("encode", ("_reply", "to_raw", "encode", "Encode", "SerializeToString", "dumps",
                "_response", "Response")),
    ("parse", ("nghttp2_session_mem_recv", "receive (mip/protocol", "from_raw", "_inputs",
               "FromString", "split_raw_inputs", "decode", "Decode", "loads", "parser.c",
               "on_headers_complete", "on_header", "on_body", "on_url", "on_message",
               "_receive_body", "data_received", "_http_protocol")),
    ("dispatch", ("mip/", "oip/", "dataplane.py", "_futures.py", "starlette", "uvicorn")),
    ("event loop", ("loop.c", "uvloop", "asyncio", "_asynciomodule", "core.c", "linux.c",
                    "loop-watcher.c", "stream.c", "runpy", "mip/cli.py")),
]
#: a sample whose innermost frame is one of these is a thread asleep (py-spy's --native
#: samples do not tell idle threads apart here): left out
IDLE_FRAMES = ("epoll_pwait", "epoll_wait", "PyThread_acquire_lock_timed", "pthread_cond_wait",
               "pthread_cond_timedwait", "sem_wait", "sem_clockwait", "sem_timedwait",
               "futex_wait", "nanosleep", "select (libc", "poll (libc")
OTHER = "other (interpreter, allocator)"
#: work that is no request's, wherever in its stack: mip serve's job worker polling its queue
BACKGROUND = ("job queue poller (no request's)", ("mip/jobs/",))


def categorize_stack(frames: list[str]) -> str | None:
    """The category of one sampled stack (root first), or None for a thread asleep."""
    named = [f for f in frames  # without the thread's name and unresolved libc addresses
             if not f.startswith(("0x", "thread ("))]
    if not named or any(p in named[-1] for p in IDLE_FRAMES):
        return None
    if any(p in frame for frame in named for p in BACKGROUND[1]):
        return BACKGROUND[0]
    for frame in reversed(named):
        for category, patterns in PROFILE_RULES:
            if any(p in frame for p in patterns):
                return category
    return OTHER


def profile_mip(args, repos: dict, logs: Path) -> int:
    """``--profile``: ``mip serve`` (identity, c=32) sampled by ``py-spy record`` (every
    thread, idle threads left out; C frames too with ``--profile-native``) while h2load (gRPC,
    REST JSON) or mip bench (MIP) loads it for 2 x ``--duration`` seconds; the samples filed
    by :data:`PROFILE_RULES` and scaled to the server's CPU a request measured without the
    profiler over ``--duration`` seconds just before."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).is_file():
        raise SystemExit("py-spy is missing: pip install py-spy")
    work = args.out / "profile"
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    server = mip_server(repos["mip-batching"], "mip batching", logs)
    with server:
        assert server.proc is not None
        for generator, protocol in (("mip-bench", "mip"), ("h2load", "grpc"),
                                    ("h2load", "http")):
            # the CPU a request without the profiler (py-spy stops the process to sample)
            plain = measure_cpu_cell(server, generator, protocol, "identity", 32,
                                     args.duration, work)
            raw = work / f"{protocol}.txt"
            spy_log = work / f"{protocol}-py-spy.log"
            with open(spy_log, "w") as out:
                # --native stops the process for every sample (it unwinds C frames). Without
                # it py-spy reads the Python stacks of the running process; it does not tell
                # idle threads apart here, so only the thread holding the GIL is sampled
                # (uvloop's poll and ONNX Runtime's run release it: they are not seen)
                mode = ["--native"] if args.profile_native else ["--nonblocking", "--gil"]
                spy = subprocess.Popen([py_spy, "record", *mode, "--threads", "--rate", "250",
                                        "--format", "raw", "--output", str(raw),
                                        "--pid", str(server.proc.pid)],
                                       stdout=out, stderr=subprocess.STDOUT)
            time.sleep(1.0)  # py-spy attaches
            sampled = measure_cpu_cell(server, generator, protocol, "identity", 32,
                                       2 * args.duration, work)
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
            if not raw.is_file():
                raise SystemExit(f"py-spy wrote no profile: {log_tail(spy_log)}")
            totals: dict[str, int] = {}
            for line in raw.read_text(errors="replace").splitlines():
                stack, _, n = line.rpartition(" ")
                category = categorize_stack(stack.split(";")) if n.isdigit() else None
                if category is not None:
                    totals[category] = totals.get(category, 0) + int(n)
            results[PROTOCOL_NAMES[protocol]] = {"cell": plain, "sampled": sampled,
                                                 "samples": totals}
            log(f"{protocol}: {plain['throughput_rps']:,.0f} req/s, {plain['server_cpu_us']:.0f} "
                f"us a request ({sampled['server_cpu_us']:.0f} while sampled); "
                f"{sum(totals.values())} samples of a busy thread")
    table = profile_table(results)
    print(table)
    (args.out / "profile_mip.json").write_text(json.dumps(
        {"results": results, "table": table}, indent=2) + "\n")
    return 0


def profile_table(results: dict) -> str:
    """Markdown: each category's share of the busy samples, times the CPU a request measured
    without the profiler."""
    names = list(results)
    lines = ["| where | " + " | ".join(f"{n}: µs a request (share)" for n in names) + " |",
             "| --- | " + " | ".join("---:" for _ in names) + " |"]
    for category in [c for c, _ in PROFILE_RULES] + [OTHER, BACKGROUND[0]]:
        cells = []
        for n in names:
            samples = results[n]["samples"]
            share = samples.get(category, 0) / max(sum(samples.values()), 1)
            cells.append(f"{share * results[n]['cell']['server_cpu_us']:.1f} ({100 * share:.0f}%)")
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    lines.append("| **server CPU a request** (req/s) | " + " | ".join(
        f"**{results[n]['cell']['server_cpu_us']:.1f}** ({results[n]['cell']['throughput_rps']:,.0f}/s)"
        for n in names) + " |")
    lines.append("| busy samples | " + " | ".join(
        f"{sum(results[n]['samples'].values()):,}" for n in names) + " |")
    return "\n".join(lines)


# -- 8. instructions a request, mip serve and Triton, under callgrind ------------------------

def callgrind_wrap(server: Server, work: Path, children: bool) -> Server:
    """``server`` under ``valgrind --tool=callgrind`` (and its child processes when
    ``children``), each process writing ``work/callgrind.out.PID`` (and its dumps
    ``.PID.N``); the server is waited for up to 15 minutes."""
    server.argv = ["valgrind", "--tool=callgrind", f"--trace-children={'yes' if children else 'no'}",
                   f"--callgrind-out-file={work}/callgrind.out.%p", *server.argv]
    ready = server.ready

    def slow_ready(proc):  # imports alone take minutes under valgrind
        deadline = time.monotonic() + 900
        while True:
            try:
                return ready(proc)
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(1.0)
    server.ready = slow_ready
    return server


def _tree_pids(pid: int) -> list[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    raw = f.read()
                parents[int(entry)] = int(raw[raw.rindex(b")") + 2:].split()[1])
            except (OSError, ValueError):
                continue
    tree = [pid]
    for member in tree:
        tree.extend(p for p, parent in parents.items() if parent == member and p not in tree)
    return tree


def count_instructions(server: Server, generator: str, protocol: str, model: str,
                       requests: int, concurrency: int, work: Path) -> float:
    """Instructions of ``server``'s whole process tree a request: counters of every
    process zeroed, ``requests`` sent, counters dumped and summed."""
    from serve_instructions import _total  # noqa: PLC0415  (bench/ is not a package)

    with server:
        assert server.proc is not None
        url = dict(server.endpoints)[protocol]
        if generator == "h2load":
            body, headers, target = request_bodies(url, protocol, model, work)

            def run(count):
                return _h2load(body, headers, target, protocol, concurrency, count, None, None)
        else:
            def run(count):
                return _mip_bench(protocol, url, model, concurrency, count, None, work)
        run(max(concurrency * 10, 200))  # warm-up: first requests load code and caches
        pids = [p for p in _tree_pids(server.proc.pid)
                if subprocess.run(["callgrind_control", "-z", str(p)],
                                  capture_output=True).returncode == 0]
        before = set(work.glob("callgrind.out.*"))
        doc = run(requests)
        for p in pids:
            subprocess.run(["callgrind_control", "-d", str(p)], capture_output=True, check=False)
        dumps = [d for d in work.glob("callgrind.out.*.*") if d not in before]
        total = 0
        for p in pids:  # each process's last dump
            mine = sorted((d for d in dumps if d.name.startswith(f"callgrind.out.{p}.")),
                          key=lambda d: d.stat().st_mtime)
            if mine:
                total += _total(mine[-1])
        return total / max(doc.get("succeeded", requests), 1)


def instructions_compare(args, repos: dict, logs: Path) -> int:
    """``--instructions N``: mip serve and Triton's own server under callgrind, N requests
    of ``--instructions-model`` at ``--instructions-concurrency`` in flight by h2load."""
    model = args.instructions_model
    python = ensure_venv(args.cache_dir, "pytriton")
    triton_repo = write_triton_repository(repos["mip-batching"].parent, repos["mip-batching"])
    lines = ["| protocol (h2load) | mip serve (whole process: frontends, batcher, ONNX Runtime), "
             "instructions a request | tritonserver (frontends, scheduler; not the Python "
             "backend stub) | mip / tritonserver |",
             "| --- | ---: | ---: | ---: |"]
    names = ("mip",) if args.instructions_mip_only else ("mip", "triton")
    for protocol in args.instructions_protocols.split(","):
        counts = []
        for name in names:
            work = Path(tempfile.mkdtemp(prefix=f"mip-callgrind-{name}-"))
            server = (mip_server(repos["mip-batching"], "mip batching", logs) if name == "mip"
                      else triton_server(python, triton_repo, logs, models=[model]))
            try:
                # Triton's Python backend stub dies under valgrind (a general protection
                # fault reading Triton's shared memory; tritonserver then aborts on a
                # boost::interprocess::lock_exception): only tritonserver itself is counted,
                # not the stub that runs model.py and ONNX Runtime
                counts.append(count_instructions(callgrind_wrap(server, work, name == "mip"),
                                                 "h2load",
                                                 protocol, model, args.instructions,
                                                 args.instructions_concurrency, work))
            finally:
                if args.instructions_keep is not None and name == "mip":
                    kept = args.instructions_keep / f"{protocol}-{model}"
                    shutil.rmtree(kept, ignore_errors=True)
                    shutil.copytree(work, kept)
                    log(f"mip's callgrind dumps for {protocol}: {kept} (callgrind_annotate "
                        "--inclusive=yes on the callgrind.out.PID.N files)")
                shutil.rmtree(work, ignore_errors=True)
            log(f"{name} {protocol}: {counts[-1]:,.0f} instructions a request")
        triton = f"{counts[1]:,.0f} | {counts[0] / counts[1]:.2f}x" if len(counts) > 1 else "- | -"
        lines.append(f"| {PROTOCOL_NAMES[protocol]} {model} c={args.instructions_concurrency}, "
                     f"{args.instructions} requests | {counts[0]:,.0f} | {triton} |")
        print("\n".join(lines[-1:]), flush=True)
    print("\n".join(lines))
    return 0


# -- main -----------------------------------------------------------------------------------

def measure_server(name: str, server: Server, args, out: Path, problems: dict) -> list[dict]:
    """Start ``server``, warm every endpoint, run every cell; the cells' documents."""
    docs = []
    log(f"starting {name}")
    try:
        with server:
            for protocol, url in server.endpoints:
                warm(protocol, url, None if name == "echo" else "identity")
            # small cells first, 1 MiB cells last: the same order for every server, and
            # no small cell right after a 1 MiB one (whose memory churn slows the next)
            for model, shape in CELLS:
                for protocol, url in server.endpoints:
                    proto_name = PROTOCOL_NAMES[protocol]
                    label = f"{name.split()[0]}/{proto_name}" + (
                        f" {' '.join(name.split()[1:])}" if " " in name else "")
                    if name == "mip no batching" and (protocol != "mip" or model == "identity_1m"):
                        continue  # the batching comparison is over MIP on the small cells
                    doc = bench(label, protocol, url, None if name == "echo" else model,
                                shape, args, out, failures=None if name == "echo" else problems)
                    if doc is not None:
                        docs.append(doc)
    except Exception as exc:
        tail = log_tail(server.log_path)
        problems[name] = (f"start failed: {exc} (log: {server.log_path}"
                          + (f"; last lines: {tail}" if tail else "") + ")")
        log(f"{name}: {problems[name]}")
    return docs


def best_rounds(docs: list[dict]) -> list[dict]:
    """One document per (row, cell): at each concurrency, the step of the round with the
    highest throughput (its latencies with it), and every round's throughput kept in
    ``rounds_rps``. The machine's speed drifts over minutes; taking every server's best
    round compares them at their best, not at whichever moment each was measured."""
    groups: dict = {}
    for doc in docs:
        groups.setdefault((doc["label"], doc["cell_model"]), []).append(doc)
    merged = []
    for group in groups.values():
        doc = dict(group[0])
        steps = []
        for step in group[0]["steps"]:
            c = step["concurrency"]
            candidates = [s for s in (step_at(d, c) for d in group) if s is not None]
            best = dict(max(candidates, key=lambda s: s["throughput_rps"]))
            best["rounds_rps"] = [round(s["throughput_rps"], 1) for s in candidates]
            steps.append(best)
        doc["steps"] = steps
        doc["rounds"] = len(group)
        merged.append(doc)
    return merged


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=3.0, help="seconds per cell (default 3)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds per cell (default 1)")
    p.add_argument("--quick", action="store_true", help="1 s cells, 0.5 s warm-up")
    p.add_argument("--concurrency", default="1,8,32", help="default 1,8,32")
    p.add_argument("--rounds", type=int, default=2,
                   help="measure every server this many times, the order of the servers "
                        "reversed each round; each cell keeps its best round (default 2)")
    p.add_argument("--servers", default=DEFAULT_SERVERS,
                   help=f"comma-separated, of {','.join(SERVERS)} (default {DEFAULT_SERVERS})")
    p.add_argument("--against-triton", action="store_true",
                   help="only mip serve against Triton's own server (both running, cells "
                        "alternated), by h2load and mip bench, with server CPU a request")
    p.add_argument("--profile", action="store_true",
                   help="only profile mip serve (identity, c=32; MIP, gRPC, REST JSON) with "
                        "py-spy: where a request's CPU goes")
    p.add_argument("--profile-native", action="store_true",
                   help="with --profile: py-spy --native (C frames too; stops the process "
                        "for every sample)")
    p.add_argument("--instructions", type=int, default=0, metavar="N",
                   help="only count instructions a request (callgrind, whole process tree) "
                        "of mip serve and Triton's own server over N requests")
    p.add_argument("--instructions-protocols", default="grpc,http",
                   help="with --instructions: grpc, http, http-binary (default grpc,http)")
    p.add_argument("--instructions-model", default="identity",
                   help="with --instructions: identity, mlp or identity_1m (default identity)")
    p.add_argument("--instructions-concurrency", type=int, default=32,
                   help="with --instructions: requests in flight (default 32)")
    p.add_argument("--instructions-mip-only", action="store_true",
                   help="with --instructions: count mip serve only, not Triton's server")
    p.add_argument("--instructions-keep", type=Path, metavar="DIR",
                   help="with --instructions: keep mip serve's callgrind dumps in "
                        "DIR/PROTOCOL-MODEL for callgrind_annotate")
    p.add_argument("--cache-dir", type=Path,
                   default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mip-bench",
                   help="venvs and models (default ~/.cache/mip-bench)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                   help="JSON files, logs and the plot (default bench/results)")
    args = p.parse_args()
    if args.quick:
        args.duration, args.warmup = 1.0, 0.5
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    concurrencies = [int(x) for x in args.concurrency.split(",")]
    servers = set(args.servers.split(","))
    unknown = servers - set(SERVERS)
    if unknown:
        p.error(f"--servers: unknown {','.join(sorted(unknown))} (choose from {','.join(SERVERS)})")
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)
    for old in args.out.glob("*.json"):
        old.unlink()
    # --instructions runs for long: its models of its own, so that other runs can go on
    models = (args.out if args.instructions else args.cache_dir) / "models"
    repos = write_models(models)
    if args.against_triton:
        return triton_compare(args, repos, logs)
    if args.profile:
        return profile_mip(args, repos, logs)
    if args.instructions:
        return instructions_compare(args, repos, logs)
    problems: dict[str, str] = {}
    plan: list = []  # (label, server factory)
    if "mip" in servers:
        plan.append(("mip batching", lambda: mip_server(repos["mip-batching"], "mip batching", logs)))
        plan.append(("mip no batching",
                     lambda: mip_server(repos["mip-no-batching"], "mip no batching", logs)))
    for name, factory in (("mlserver", mlserver_server), ("kserve", kserve_server),
                          ("pytriton", pytriton_server), ("triton", triton_peer)):
        if name not in servers:
            continue
        try:  # Triton's own server comes from the PyTriton wheel
            python = ensure_venv(args.cache_dir, "pytriton" if name == "triton" else name)
        except Exception as exc:
            problems[name] = f"install failed: {exc}"
            log(f"{name}: {problems[name]}")
            continue
        plan.append((name, lambda f=factory, py=python: f(py, repos["peers"], logs)))
    if "echo" in servers:
        plan.append(("echo", lambda: echo_server(logs)))

    rounds: list[dict] = []
    for number in range(1, args.rounds + 1):
        out = args.out / "rounds" / str(number)
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("*.json"):
            old.unlink()
        order = plan if number % 2 else plan[::-1]
        log(f"round {number} of {args.rounds}: {', '.join(name for name, _ in order)}")
        for name, factory in order:
            rounds.extend(measure_server(name, factory(), args, out, problems))
    docs = best_rounds(rounds)
    for doc in docs:
        path = args.out / Path(doc.pop("path")).name
        path.write_text(json.dumps(doc, indent=2) + "\n")

    table, goals = summarize(docs, concurrencies)
    print()
    print(table)
    print()
    print(goals["markdown"])
    if problems:
        print("\nNot measured:")
        for k, v in problems.items():
            print(f"  {k}: {v}")
    summary = {"machine": docs[0]["machine"] if docs else {}, "duration_s": args.duration,
               "warmup_s": args.warmup, "rounds": args.rounds, "concurrency": concurrencies, "goals": goals,
               "problems": problems, "table": table, "runs": docs}
    (args.out / "serve_compare.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot = args.out / "serve_compare.png"
    runs = sorted(str(pth) for pth in args.out.glob("*.json") if pth.name != "serve_compare.json")
    if runs:
        names = {"mip": "mip serve", "mlserver": "MLServer", "kserve": "KServe",
                 "pytriton": "PyTriton", "triton": "Triton"}
        measured = {doc["label"].split("/")[0] for doc in docs}
        title = " vs ".join(v for k, v in names.items() if k in measured) or "mip bench"
        subprocess.run([sys.executable, "-m", "mip.cli", "--log-level", "WARNING", "bench",
                        "--compare", *runs, "--plot", str(plot), "--title",
                        f"{title} (mip bench, loopback)"],
                       cwd=ROOT, check=False, stdout=subprocess.DEVNULL)
        print(f"\nplot: {plot}\nJSON: {args.out / 'serve_compare.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
