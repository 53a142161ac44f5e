"""Triton's system shared memory against the socket: an FP32 tensor's round trip through
``mip serve``'s identity model, with tritonclient, over HTTP and gRPC.

One command::

    python bench/shm.py [--rounds-1m 50] [--rounds-16m 20] [--out DIR]

1. writes the serving benchmark's models (``serve_compare.write_models``) and starts
   ``mip serve`` (dynamic batching off) on free 127.0.0.1 ports with ``--http`` and ``--grpc``;
2. for each size, 1 MiB (``identity_1m`` [1, 262144]) and 16 MiB ([16, 262144]), measures
   five cells, one request each per round, the cells interleaved round by round so that the
   machine's load hits them alike:

   - ``shm``: the input and the output in system shared-memory regions (tritonclient's
     ``shared_memory`` utilities, registered once); a request copies the tensor into the input
     region, infers, and views the output region;
   - ``socket``: the same tritonclient calls with the tensor in the request and the reply
     (binary data over HTTP);
   - ``memcpy``: ``numpy.copyto`` of the same bytes twice (in and out), the floor;

3. prints, per cell, the median and p90 latency, the server's CPU per request (user + system
   time of the ``mip serve`` process from ``/proc``, as ``bench/ab_compare.py`` reads it,
   summed over the requests), and the ratios shm / socket and shm / memcpy; writes
   ``DIR/shm.json``.

Every output is checked against its input once, before the rounds. Bounded: the rounds are
capped at 200 and 50, each request by tritonclient's timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_compare as sc  # noqa: E402  (bench/ is not a package)
from ab_compare import cpu_seconds  # noqa: E402

ROW = 262144  # FP32 values in one row of identity_1m: 1 MiB
SIZES = {"1 MiB": 1, "16 MiB": 16}  # label -> rows
TRANSPORTS = ("http", "grpc")


def log(msg: str) -> None:
    print(f"[shm] {msg}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Cells:
    """The request of every cell of one size, as a callable returning the output array."""

    def __init__(self, rows: int, urls: dict[str, str], tag: str):
        import tritonclient.grpc as grpcclient
        import tritonclient.http as httpclient
        import tritonclient.utils.shared_memory as shm_util

        self.shm_util = shm_util
        self.x = (np.arange(rows * ROW, dtype=np.float32) % 1000).reshape(rows, ROW)
        self.nbytes = self.x.nbytes
        self.regions = []
        self.clients = []
        self.calls = {}
        modules = {"http": httpclient, "grpc": grpcclient}
        for transport in TRANSPORTS:
            module = modules[transport]
            client = module.InferenceServerClient(urls[transport])
            self.clients.append(client)
            self.calls[f"socket/{transport}"] = self._socket(client, module, transport)
            self.calls[f"shm/{transport}"] = self._shm(client, module, f"{tag}-{transport}")
        scratch = np.empty_like(self.x)
        out = np.empty_like(self.x)

        def memcpy():
            np.copyto(scratch, self.x)
            np.copyto(out, scratch)
            return out
        self.calls["memcpy"] = memcpy

    def _socket(self, client, module, transport: str):
        binary = {"binary_data": True} if transport == "http" else {}
        shape = list(self.x.shape)

        def call():
            tensor = module.InferInput("input", shape, "FP32")
            tensor.set_data_from_numpy(self.x, **binary)
            result = client.infer("identity_1m", [tensor],
                                  outputs=[module.InferRequestedOutput("output", **binary)])
            return result.as_numpy("output")
        return call

    def _shm(self, client, module, name: str):
        shm_util = self.shm_util
        shape = list(self.x.shape)
        handles = {}
        for side in ("in", "out"):
            key = f"/mip-bench-{os.getpid()}-{name}-{side}"
            handles[side] = shm_util.create_shared_memory_region(f"{name}-{side}", key,
                                                                 self.nbytes)
            self.regions.append(handles[side])
            client.register_system_shared_memory(f"{name}-{side}", key, self.nbytes)

        def call():
            shm_util.set_shared_memory_region(handles["in"], [self.x])
            tensor = module.InferInput("input", shape, "FP32")
            tensor.set_shared_memory(f"{name}-in", self.nbytes)
            output = module.InferRequestedOutput("output")
            output.set_shared_memory(f"{name}-out", self.nbytes)
            client.infer("identity_1m", [tensor], outputs=[output])
            return shm_util.get_contents_as_numpy(handles["out"], np.float32, shape)
        return call

    def close(self) -> None:
        for client in self.clients:
            client.unregister_system_shared_memory()
            client.close()
        for handle in self.regions:
            self.shm_util.destroy_shared_memory_region(handle)


def measure(cells: Cells, rounds: int, pid: int) -> dict[str, dict]:
    """``rounds`` rounds of one request per cell, the cells' order rotated every round."""
    names = list(cells.calls)
    for name in names:  # warm up and check once
        got = cells.calls[name]()
        if not np.array_equal(got, cells.x):
            raise RuntimeError(f"{name}: the output differs from the input")
    latency = {name: [] for name in names}
    cpu = dict.fromkeys(names, 0.0)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            before_cpu = cpu_seconds(pid)
            start = time.perf_counter()
            cells.calls[name]()
            latency[name].append(time.perf_counter() - start)
            cpu[name] += cpu_seconds(pid) - before_cpu
    return {name: {"p50_ms": 1e3 * statistics.median(latency[name]),
                   "p90_ms": 1e3 * percentile(latency[name], 0.9),
                   "server_cpu_us": 1e6 * cpu[name] / rounds if name != "memcpy" else None,
                   "rounds": rounds} for name in names}


def markdown(results: dict[str, dict]) -> str:
    lines = ["| size | transport | path | p50 ms | p90 ms | server CPU µs/req "
             "| p50 shm/socket | p50 shm/memcpy |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for size, cells in results.items():
        memcpy = cells["memcpy"]["p50_ms"]
        for transport in TRANSPORTS:
            shm, sock = cells[f"shm/{transport}"], cells[f"socket/{transport}"]
            for path, cell in (("shm", shm), ("socket", sock)):
                ratios = (f"{shm['p50_ms'] / sock['p50_ms']:.2f} | "
                          f"{shm['p50_ms'] / memcpy:.1f}" if path == "shm" else " | ")
                lines.append(f"| {size} | {transport} | {path} | {cell['p50_ms']:.2f} | "
                             f"{cell['p90_ms']:.2f} | {cell['server_cpu_us']:,.0f} | {ratios} |")
        m = cells["memcpy"]
        lines.append(f"| {size} | - | memcpy ×2 | {m['p50_ms']:.2f} | {m['p90_ms']:.2f} "
                     f"| - | | |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds-1m", type=int, default=50)
    parser.add_argument("--rounds-16m", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="where shm.json goes")
    args = parser.parse_args()
    rounds = {"1 MiB": max(1, min(args.rounds_1m, 200)),
              "16 MiB": max(1, min(args.rounds_16m, 50))}
    with tempfile.TemporaryDirectory(prefix="mip-shm-bench-") as tmp:
        work = Path(tmp)
        repos = sc.write_models(work / "models")
        server = sc.mip_server(repos["mip-no-batching"], "mip-shm", work)
        results = {}
        with server:
            urls = {p: u.split("://", 1)[1] for p, u in server.endpoints}
            for size, rows in SIZES.items():
                log(f"{size}: {rounds[size]} rounds")
                cells = Cells(rows, urls, f"{rows}m")
                try:
                    results[size] = measure(cells, rounds[size], server.proc.pid)
                finally:
                    cells.close()
    table = markdown(results)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "shm.json").write_text(json.dumps(
            {"results": results, "loadavg": os.getloadavg()}, indent=2) + "\n")
    log(f"load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
