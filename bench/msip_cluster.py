"""Delivered messages per second for 1, 2 and 3 ``mip broker --cluster`` brokers.

A private engine (redis-server, or nats-server with JetStream, ``--backplane``) and N brokers
(``mip broker --cluster redis://…`` or ``nats://…``) run in their own processes; one
publisher connects to the first broker and the subscribers are spread over all of them in
turn (``mip bench pubsub --subscribe-url``), so with N > 1 most events cross the engine. With
N = 1 the broker still has ``--cluster`` (its publishes also go to the engine). Prints, per
N, delivered msg/s, p50/p99 latency and the CPU seconds used by the brokers and by the engine
per million delivered messages.

``--stream-max 0`` runs the brokers without streams (``--cluster-stream-max 0``): with Redis,
no check of the topic's stream every message; with NATS, no JetStream (every event is stored
in the stream otherwise).

    python bench/msip_cluster.py [--backplane redis|nats ...] [--seconds 3] [--subscribers 6]
        [--size 64] [--stream-max N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ab_compare import cpu_seconds  # noqa: E402  (bench/ is not a package)
from msip_pubsub import free_port, wait_port  # noqa: E402

from mip.bench.pubsub import run_pubsub  # noqa: E402


def run(n: int, url: str, args) -> dict:
    ports = [free_port() for _ in range(n)]
    procs = [subprocess.Popen([sys.executable, "-m", "mip.cli", "--log-level", "WARNING",
                               "broker", "--msip", f"tcp://127.0.0.1:{p}", "--cluster", url,
                               "--cluster-stream-max", str(args.stream_max)],
                              cwd=ROOT, stdout=subprocess.DEVNULL)
             for p in ports]
    try:
        for p in ports:
            wait_port(p, 30)
        urls = [f"tcp://127.0.0.1:{p}" for p in ports]
        cpu0 = [cpu_seconds(p.pid) for p in procs]
        doc = asyncio.run(run_pubsub(urls[0], subscribers=args.subscribers, size=args.size,
                                     duration=args.seconds, subscriber_urls=urls, settle=0.5,
                                     ping_duration=0))
        cpu = sum(cpu_seconds(p.pid) - c for p, c in zip(procs, cpu0))
        return {"doc": doc, "broker_cpu": cpu}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)


def start_engine(name: str, port: int, store: str) -> subprocess.Popen | None:
    """redis-server, or nats-server with JetStream (its files in ``store``), on ``port``;
    None when it is not installed."""
    binary = shutil.which(f"{name}-server")
    if binary is None:
        print(f"{name}-server is not installed (apt-get install {name}-server)", file=sys.stderr)
        return None
    if name == "redis":
        command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no"]
    else:
        command = [binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", store]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--subscribers", type=int, default=6)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--brokers", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--stream-max", type=int, default=10_000,
                    help="the brokers' --cluster-stream-max (0: no streams)")
    ap.add_argument("--backplane", choices=["redis", "nats"], nargs="+", default=["redis"],
                    help="the engine(s) to run on, one table each (default redis)")
    args = ap.parse_args()
    print(f"1 publisher on broker 1, {args.subscribers} subscribers spread over the brokers, "
          f"{args.size} B, {args.seconds:g} s a run, os.cpu_count()={os.cpu_count()}")
    for name in args.backplane:
        port = free_port()
        with tempfile.TemporaryDirectory(prefix="mip-bench-") as store:
            engine = start_engine(name, port, store)
            if engine is None:
                return 1
            try:
                url = (f"redis://127.0.0.1:{port}/0" if name == "redis"
                       else f"nats://127.0.0.1:{port}")
                print(f"\n{name}:")
                print(f"{'brokers':>7} {'delivered/s':>12} {'lost':>6} {'p50 ms':>8} "
                      f"{'p99 ms':>8} {'broker CPU s/1M':>16} {name + ' CPU s/1M':>15}")
                for n in args.brokers:
                    e0 = cpu_seconds(engine.pid)
                    out = run(n, url, args)
                    ecpu = cpu_seconds(engine.pid) - e0
                    ps = out["doc"]["pubsub"]
                    per_m = 1e6 / max(ps["delivered"], 1)
                    print(f"{n:>7} {ps['delivered_per_s']:>12,.0f} {ps['lost']:>6} "
                          f"{ps['latency_ms']['p50']:>8.2f} {ps['latency_ms']['p99']:>8.2f} "
                          f"{out['broker_cpu'] * per_m:>16.1f} {ecpu * per_m:>15.1f}")
            finally:
                engine.terminate()
                engine.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
