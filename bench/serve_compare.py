"""mip serve against MLServer, KServe and Triton on the same ONNX models, measured by ``mip bench``.

One command::

    python bench/serve_compare.py [--quick] [--duration 3] [--warmup 1] [--rounds 2] [--out DIR]
                                  [--servers mip,mlserver,kserve,pytriton,echo]

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
PEERS_MEASURED = ("mlserver", "kserve", "pytriton")
#: mip bench protocol -> the row label's protocol part
PROTOCOL_NAMES = {"mip": "mip", "grpc": "grpc", "http": "rest-json", "http-binary": "rest-binary"}
#: our row of each protocol compared with the peers' rows of the same protocol
OURS = {"grpc": "mip/grpc batching", "rest-json": "mip/rest-json batching",
        "rest-binary": "mip/rest-binary batching"}  # the "best peer" is one of these
SERVERS = ("mip", *PEERS_MEASURED, "echo")
DEFAULT_SERVERS = "mip,mlserver,kserve,pytriton,echo"
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
    repos = write_models(args.cache_dir / "models")
    problems: dict[str, str] = {}
    plan: list = []  # (label, server factory)
    if "mip" in servers:
        plan.append(("mip batching", lambda: mip_server(repos["mip-batching"], "mip batching", logs)))
        plan.append(("mip no batching",
                     lambda: mip_server(repos["mip-no-batching"], "mip no batching", logs)))
    for name, factory in (("mlserver", mlserver_server), ("kserve", kserve_server),
                          ("pytriton", pytriton_server)):
        if name not in servers:
            continue
        try:
            python = ensure_venv(args.cache_dir, name)
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
                 "pytriton": "Triton"}
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
