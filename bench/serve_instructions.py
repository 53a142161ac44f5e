"""The whole ``mip serve`` process's instructions a request, end to end, for two revisions.

``request_path.py`` counts the request path in one process without sockets; this counts the
server as clients see it: ``mip serve`` runs under ``valgrind --tool=callgrind`` (every thread,
the event loop, the sockets' system call wrappers, the batcher, ONNX Runtime), ``mip bench
infer`` sends a fixed number of requests at a fixed concurrency, and the counters are zeroed
before and dumped after them (``callgrind_control``). Under valgrind the server is far slower
than its clients, so every batch is as full as the concurrency allows, for both revisions:
the count moves by well under 1% between runs whatever else the machine does, where seconds
move by 30% on a shared machine::

    python bench/serve_instructions.py --base 1f44a44                 # MIP and gRPC, c=32
    python bench/serve_instructions.py --base 1f44a44 --protocols mip,grpc,http --requests 2000

``--base`` is installed as ``ab_compare.py`` installs it (a venv of its own, cached).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ab_compare as ab  # noqa: E402  (bench/ is not a package)
import serve_compare as sc  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _load(protocol: str, url: str, model: str, requests: int, concurrency: int) -> None:
    argv = [sys.executable, "-m", "mip.cli", "--log-level", "ERROR", "bench", "infer", url,
            "--protocol", protocol, "--model", model, "--concurrency", str(concurrency),
            "--max-requests", str(requests), "--duration", "3600", "--warmup", "0",
            "--no-progress"]
    if protocol == "mip":
        argv += ["--shape", ",".join(map(str, [1, sc._SPECS[model][0][1][-1]]))]
    subprocess.run(argv, capture_output=True, cwd=ROOT, timeout=3600, check=True)


def _total(dump: Path) -> int:
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise SystemExit(f"no totals in {dump}")


def count(python: Path, repo: Path, protocol: str, model: str, requests: int,
          concurrency: int, label: str) -> float:
    """Instructions of ``mip serve`` (all threads) a request, after a warm-up."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = sc.callgrind_wrap(ab.serve(python, repo, label, work, [protocol]), work,
                                   children=False)
        with server:
            url = dict(server.endpoints)[protocol]
            _load(protocol, url, model, max(concurrency * 10, 200), concurrency)  # warm-up
            subprocess.run(["callgrind_control", "-z", str(server.proc.pid)], check=True,
                           capture_output=True)
            _load(protocol, url, model, requests, concurrency)
            subprocess.run(["callgrind_control", "-d", str(server.proc.pid)], check=True,
                           capture_output=True)
            dumps = sorted(work.glob("callgrind.out.*"), key=lambda p: p.stat().st_mtime)
            return _total(dumps[-1]) / requests


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the git revision to compare against")
    p.add_argument("--protocols", default="mip,grpc", help="mip, grpc, http (default mip,grpc)")
    p.add_argument("--model", default="identity", help="identity, mlp or identity_1m")
    p.add_argument("--requests", type=int, default=3200, help="requests counted (default 3200)")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight (default 32)")
    p.add_argument("--cache-dir", type=Path,
                   default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                   / "mip-bench", help="venvs and models (default ~/.cache/mip-bench)")
    args = p.parse_args()
    base_python, sha = ab.ensure_revision(args.cache_dir, args.base)
    repo = sc.write_models(args.cache_dir / "models-instructions")["mip-batching"]
    sides = [(f"base ({args.base})", base_python), ("this tree", Path(sys.executable))]
    print(f"| protocol | {sides[0][0]} | {sides[1][0]} | new/base |")
    print("| --- | ---: | ---: | ---: |")
    for protocol in args.protocols.split(","):
        counts = [count(python, repo, protocol, args.model, args.requests, args.concurrency,
                        re.sub(r"\W", "_", label)) for label, python in sides]
        print(f"| {protocol} {args.model} c={args.concurrency} | {counts[0]:,.0f} | "
              f"{counts[1]:,.0f} | {counts[1] / counts[0]:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
