"""``mip serve --workers N``: requests/s and server CPU µs a request, per protocol, engine
placement and N.

One command::

    python bench/workers.py [--workers 1,2,4] [--protocols mip,grpc,http]
                            [--placements worker,shared] [--duration 3] [--warmup 1]
                            [--concurrency 32] [--connections 8] [--json FILE]
                            [--model identity --shape 1,16] [--wide 262144]

For each N (default 1 and 2; ``auto`` adds one per usable core) and placement (``worker``:
each worker runs the model; ``shared``: one engine process runs it for every worker, tensors
through the shared arena) it starts ``mip serve --workers N --placement P`` on the demo
repository (127.0.0.1, free ports) and, per protocol, runs ``mip
bench infer`` (the command a user runs) against the demo ``identity`` model with 1x16 FP32
requests: small ones, where the protocol work is the cost. ``--model wide --shape 1,262144``
runs 1 MiB requests through an identity model of that width (``--wide``, added to the
repository), where copying the tensors is the cost.

* Cores: when there are more usable cores than N, the server runs under ``taskset`` on the
  first N and the load generator on the others, so that the figures are the server's; on a
  smaller machine both share every core, and the table says so.
* Server CPU a request: user + system time of the supervisor, every worker and the engine
  process (read from
  ``/proc``) over the whole load run, warm-up included, divided by the requests the server
  counted over the same run (``nv_inference_request_success`` of its merged ``/metrics``).
* ``copied B/req`` and ``in place B/req`` (shared placement): octets of request tensors the
  workers copied into the shared arena, and octets the engine process read where a MIP or gRPC
  connection received them, per request (``mip_shared_arena_*_bytes_total``).
* ``scaling``: requests/s over the first N's, per protocol and placement (the goal on a
  machine with cores to spare: at least 0.8 x N). The engine process of ``shared`` runs on
  the server's cores too.

Every run is bounded: warm-up + duration seconds a cell, plus the start of the server.
Linux only (``/proc``; ``taskset`` from util-linux when present).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS = ("mip", "grpc", "http")
TICKS = os.sysconf("SC_CLK_TCK")


def _cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def _tree_cpu_seconds(root: int) -> float:
    """User + system seconds of ``root`` and its descendants that are alive now."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / TICKS
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += times.get(pid, 0.0)
        todo.extend(child for child, parent in parents.items() if parent == pid)
    return total


def _counts(http: str) -> dict[str, float]:
    """Requests served, and octets copied into the shared arena and read in place."""
    with urllib.request.urlopen(f"http://{http}/metrics", timeout=10) as answer:
        text = answer.read().decode()

    def total(pattern: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{pattern} (\S+)$", text, re.M))

    return {"served": total(r"nv_inference_request_success\{[^}]*\}"),
            "copied": total("mip_shared_arena_copied_bytes_total"),
            "in_place": total("mip_shared_arena_in_place_bytes_total")}


def _add_wide(repo: Path, width: int) -> None:
    """Model ``wide``: FP32 ``input`` [-1, width] -> ``output``, unchanged."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])], "wide",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", width])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    (repo / "wide" / "1").mkdir(parents=True)
    (repo / "wide" / "1" / "model.onnx").write_bytes(model.SerializeToString())


def _pinned(cores: list[int] | None) -> list[str]:
    if not cores or not shutil.which("taskset"):
        return []
    return ["taskset", "-c", ",".join(map(str, cores))]


def _start_server(workers: int, cores: list[int] | None, repo: str, placement: str):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    command = [*_pinned(cores), sys.executable, "-m", "mip.cli", "--log-level", "WARNING",
               "serve", "--model-repository", repo, "--mip-model", "identity",
               "--mip", "tcp://127.0.0.1:0", "--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0",
               "--workers", str(workers), "--placement", placement]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env)
    ready = ("mip: serving KServe v2 REST" if workers == 1 and placement == "worker"
             else "worker processes serving")
    lines, deadline = [], time.monotonic() + 120
    while not any(ready in line for line in lines):
        line = process.stdout.readline()
        if not line or time.monotonic() > deadline:
            process.kill()
            raise SystemExit("mip serve did not start:\n" + "".join(lines))
        lines.append(line)
    text = "".join(lines)
    urls = {"mip": re.search(r"serving MIP on (\S+)", text).group(1),
            "grpc": re.search(r"KServe v2 gRPC on (\S+)", text).group(1),
            "http": re.search(r"REST and /metrics on http://(\S+)", text).group(1)}
    return process, urls


def _run_cell(urls: dict, protocol: str, args, cores: list[int] | None, server_pid: int,
              folder: str) -> dict:
    out = os.path.join(folder, f"{protocol}.json")
    url = urls[protocol] if protocol != "http" else f"http://{urls['http']}"
    command = [*_pinned(cores), sys.executable, "-m", "mip.cli", "bench", "infer", url,
               "--protocol", protocol, "--model", args.model, "--shape", args.shape,
               "--concurrency", str(args.concurrency), "--connections", str(args.connections),
               "--duration", str(args.duration), "--warmup", str(args.warmup),
               "--no-progress", "--json", out]
    before = _counts(urls["http"])
    cpu = _tree_cpu_seconds(server_pid)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)),
                   timeout=args.warmup + args.duration + 120)
    cpu = _tree_cpu_seconds(server_pid) - cpu
    time.sleep(1.5)  # the other workers publish their counts within a second
    after = _counts(urls["http"])
    served = int(after["served"] - before["served"])
    with open(out) as f:
        step = json.load(f)["steps"][0]
    return {"rps": step["throughput_rps"], "errors": step["errors"],
            "server_cpu_us_per_request": cpu / max(served, 1) * 1e6,
            "server_requests": served,
            "copied_bytes_per_request": (after["copied"] - before["copied"]) / max(served, 1),
            "in_place_bytes_per_request": ((after["in_place"] - before["in_place"])
                                           / max(served, 1))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", default="1,2",
                        help="worker counts, comma-separated; 'auto' = usable cores "
                             "(default 1,2)")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument("--placements", default="worker,shared",
                        help="engine placements, comma-separated (default worker,shared)")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds a cell")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before each cell")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--connections", type=int, default=8,
                        help="connections of the load generator (spread over the workers)")
    parser.add_argument("--model", default="identity", help="demo model (default identity)")
    parser.add_argument("--shape", default="1,16",
                        help="the request tensor's shape (default 1,16; mlp: N,784)")
    parser.add_argument("--wide", type=int, default=262144, metavar="WIDTH",
                        help="the width of model 'wide' (default 262144: 1 MiB a row)")
    parser.add_argument("--json", metavar="FILE", help="write the figures to this file")
    args = parser.parse_args(argv)
    cores = _cores()
    counts = [len(cores) if w.strip() == "auto" else int(w) for w in args.workers.split(",")]
    protocols = [p.strip() for p in args.protocols.split(",")]
    placements = [p.strip() for p in args.placements.split(",")]
    from mip.serving.demo import build_demo_repository

    rows, folder = [], tempfile.mkdtemp(prefix="mip-bench-workers-")
    try:
        repo = str(build_demo_repository(Path(folder) / "repo"))
        _add_wide(Path(repo), args.wide)
        for placement, n in [(p, n) for p in placements for n in counts]:
            split = len(cores) > n
            server_cores, client_cores = (cores[:n], cores[n:]) if split else (None, None)
            process, urls = _start_server(n, server_cores, repo, placement)
            try:
                for protocol in protocols:
                    cell = _run_cell(urls, protocol, args, client_cores, process.pid, folder)
                    cell.update(workers=n, protocol=protocol, placement=placement,
                                cores="server %s, load %s" % (
                                    ",".join(map(str, server_cores)),
                                    ",".join(map(str, client_cores))) if split
                                else f"shared ({len(cores)})")
                    rows.append(cell)
            finally:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    base = {(r["protocol"], r["placement"]): r["rps"] for r in rows
            if r["workers"] == counts[0]}
    print(f"{'protocol':8} {'placement':9} {'N':>3} {'req/s':>9} {'scaling':>8} "
          f"{'server CPU us/req':>18} {'copied B/req':>12} {'in place B/req':>14} "
          f"{'errors':>6}  cores")
    for r in rows:
        first = base.get((r["protocol"], r["placement"]))
        scaling = r["rps"] / first if first else float("nan")
        r["scaling"] = scaling
        print(f"{r['protocol']:8} {r['placement']:9} {r['workers']:>3} {r['rps']:>9,.0f} "
              f"{scaling:>7.2f}x "
              f"{r['server_cpu_us_per_request']:>18.1f} {r['copied_bytes_per_request']:>12,.0f} "
              f"{r['in_place_bytes_per_request']:>14,.0f} {r['errors']:>6}  {r['cores']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"concurrency": args.concurrency, "connections": args.connections,
                       "duration": args.duration, "model": args.model, "shape": args.shape,
                       "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
