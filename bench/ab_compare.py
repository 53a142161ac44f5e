"""``mip serve`` at two revisions side by side: does a change keep the serving speed?

One command::

    python bench/ab_compare.py --base REV [--rounds 3] [--duration 3] [--concurrency 1,32]
                               [--protocols mip,grpc,http] [--cells identity,mlp,identity_1m]

1. installs revision ``REV`` (any git revision of this repository) into a venv of its own
   under ``--cache-dir`` (``git archive`` of the revision, then ``pip install '.[serve]'``:
   the first time a few minutes of compiling), and uses this checkout as the other side;
2. writes the serving benchmark's models (``serve_compare.write_models``: ``identity``,
   ``mlp``, ``identity_1m``, dynamic batching on);
3. measures both revisions ``--rounds`` times in alternating order (base, new, new, base,
   ...), each time a fresh ``mip serve`` of that revision driven by this checkout's
   ``mip bench infer`` (the same client for both) over every protocol and cell;
4. prints, per cell, each side's best round (req/s, p99) and the server's CPU per request
   (user + system time of the ``mip serve`` process over the cell, from ``/proc``, divided
   by the responses), with the ratios new / base. CPU per request is the steadier figure on a
   shared machine.

Every cell is bounded: warm-up + duration seconds per concurrency, plus the request timeout.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_compare as sc  # noqa: E402  (bench/ is not a package)

ROOT = sc.ROOT
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[ab_compare] {msg}", file=sys.stderr, flush=True)


def ensure_revision(cache: Path, rev: str) -> tuple[Path, str]:
    """The Python of a venv holding ``mip-toolkit`` at ``rev`` (installed when missing)."""
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.strip()
    venv = cache / "revisions" / sha[:12]
    python = venv / "bin" / "python"
    marker = venv / ".installed"
    if marker.is_file():
        return python, sha
    venv.parent.mkdir(parents=True, exist_ok=True)
    # One install a revision at a time: a second run asking for it waits for the first.
    with open(venv.parent / f"{sha[:12]}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.is_file():
            _install(venv, sha, rev)
    return python, sha


def _install(venv: Path, sha: str, rev: str) -> None:
    python = venv / "bin" / "python"
    marker = venv / ".installed"
    log(f"installing {rev} ({sha[:12]}) into {venv} (a few minutes of compiling)")
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--clear", str(venv)], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "src.tar"
        subprocess.run(["git", "archive", "--format=tar", "-o", str(archive), sha], cwd=ROOT,
                       check=True)
        src = Path(tmp) / "src"
        with tarfile.open(archive) as tar:
            tar.extractall(src, filter="data")
        proc = subprocess.run([str(python), "-m", "pip", "install", "-q", ".[serve]"], cwd=src,
                              capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise RuntimeError(f"pip install of {rev} failed: {tail}")
    marker.write_text(sha + "\n")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def serve(python: Path, repo: Path, label: str, logs: Path, protocols: list[str]) -> sc.Server:
    """``mip serve`` of one revision, with the listeners ``protocols`` need."""
    ports = {"mip": sc.free_port(), "grpc": sc.free_port(), "http": sc.free_port()}
    argv = [str(python), "-m", "mip.cli", "--log-level", "WARNING", "serve",
            "--model-repository", str(repo), "--mip", f"tcp://127.0.0.1:{ports['mip']}",
            "--grpc", f"127.0.0.1:{ports['grpc']}", "--http", f"127.0.0.1:{ports['http']}"]
    urls = {"mip": f"tcp://127.0.0.1:{ports['mip']}", "grpc": f"grpc://127.0.0.1:{ports['grpc']}",
            "http": f"http://127.0.0.1:{ports['http']}",
            "http-binary": f"http://127.0.0.1:{ports['http']}"}

    def ready(proc):
        sc.wait_port(ports["mip"], proc)
        sc.wait_ready(ports["http"], list(sc._SPECS), proc)
    # run outside the checkout, so that the revision's own installed package is imported
    return sc.Server(label, argv, [(p, urls[p]) for p in protocols], cwd=logs, ready=ready,
                     log_path=logs / f"{label}.log")


def measure(server: sc.Server, side: str, cells: list[tuple[str, list[int]]], args,
            out: Path) -> list[dict]:
    """Every (protocol, cell, concurrency) of one server: mip bench's steps plus the server's
    CPU per response, one concurrency at a time."""
    results = []
    with server:
        for protocol, url in server.endpoints:
            sc.warm(protocol, url, "identity")
        for model, shape in cells:
            for protocol, url in server.endpoints:
                for c in args.concurrency.split(","):
                    sub = argparse.Namespace(concurrency=c, duration=args.duration,
                                             warmup=args.warmup)
                    before = cpu_seconds(server.proc.pid)
                    doc = sc.bench(f"{side}/{sc.PROTOCOL_NAMES[protocol]}", protocol, url, model,
                                   shape, sub, out)
                    cpu = cpu_seconds(server.proc.pid) - before
                    if doc is None:
                        continue
                    step = doc["steps"][0]
                    # the CPU also covers the warm-up, at the same load: count its requests
                    # as the measured ones' rate over the warm-up's length
                    measured = step["responses"] * (args.warmup + args.duration) / args.duration
                    results.append({
                        "side": side, "protocol": sc.PROTOCOL_NAMES[protocol], "model": model,
                        "concurrency": int(c), "rps": step["throughput_rps"],
                        "p50_ms": step["latency_ms"]["p50"], "p99_ms": step["latency_ms"]["p99"],
                        "errors": step["errors"],
                        "cpu_us": 1e6 * cpu / measured if measured else None})
    return results


def summarize(results: list[dict], base_label: str) -> str:
    """Markdown: per cell, the best round of each side and the ratios new / base."""
    best: dict = {}
    for r in results:
        key = (r["model"], r["protocol"], r["concurrency"], r["side"])
        old = best.get(key)
        if old is None or r["rps"] > old["rps"]:
            cpu = min((x["cpu_us"] for x in results if (x["model"], x["protocol"],
                       x["concurrency"], x["side"]) == key and x["cpu_us"] is not None),
                      default=None)
            best[key] = dict(r, cpu_us=cpu)
    lines = [f"| cell | protocol | c | base ({base_label}) req/s, p99 ms, CPU µs/req "
             "| new req/s, p99 ms, CPU µs/req | req/s new/base | CPU new/base |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for (model, protocol, c, side), b in sorted(best.items()):
        if side != "base":
            continue
        n = best.get((model, protocol, c, "new"))
        if n is None:
            continue

        def cell(x):
            err = f", {x['errors']} errors" if x["errors"] else ""
            p99 = "-" if x["p99_ms"] is None else f"{x['p99_ms']:.2f}"
            cpu = "-" if x["cpu_us"] is None else f"{x['cpu_us']:.0f}"
            return f"{x['rps']:,.0f}, {p99}, {cpu}{err}"

        def ratio(a, b):
            return "-" if a is None or not b else f"{a / b:.2f}x"
        lines.append(f"| {model} | {protocol} | {c} | {cell(b)} | {cell(n)} | "
                     f"{ratio(n['rps'], b['rps'])} | {ratio(n['cpu_us'], b['cpu_us'])} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the git revision to compare against")
    p.add_argument("--rounds", type=int, default=3, help="rounds per side (default 3)")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per cell (default 3)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds per cell (default 1)")
    p.add_argument("--concurrency", default="1,32", help="default 1,32")
    p.add_argument("--protocols", default="mip,grpc,http",
                   help="of mip, grpc, http, http-binary (default mip,grpc,http)")
    p.add_argument("--cells", default="identity,mlp,identity_1m",
                   help="models measured (default identity,mlp,identity_1m)")
    p.add_argument("--cache-dir", type=Path,
                   default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mip-bench",
                   help="venvs and models (default ~/.cache/mip-bench)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ab",
                   help="JSON and logs (default bench/results/ab)")
    args = p.parse_args()
    protocols = args.protocols.split(",")
    unknown = set(protocols) - set(sc.PROTOCOL_NAMES)
    if unknown:
        p.error(f"--protocols: unknown {','.join(sorted(unknown))}")
    cells = [(m, s) for m, s in sc.CELLS if m in args.cells.split(",")]
    if not cells:
        p.error(f"--cells: choose from {','.join(m for m, _ in sc.CELLS)}")
    base_python, sha = ensure_revision(args.cache_dir, args.base)
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)
    repo = sc.write_models(args.cache_dir / "models-ab")["mip-batching"]
    sides = [("base", base_python), ("new", Path(sys.executable))]
    results: list[dict] = []
    for number in range(args.rounds):
        order = sides if number % 2 == 0 else sides[::-1]
        for side, python in order:
            log(f"round {number + 1} of {args.rounds}: {side}")
            server = serve(python, repo, side, logs, protocols)
            results += measure(server, side, cells, args, args.out)
    document = {"base": args.base, "base_sha": sha, "rounds": args.rounds,
                "duration_s": args.duration, "results": results}
    (args.out / "ab_compare.json").write_text(json.dumps(document, indent=2) + "\n")
    document["table"] = table = summarize(results, args.base if len(args.base) < 20 else sha[:12])
    print()
    print(table)
    (args.out / "ab_compare.json").write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
