"""MSIP broker vs Redis pub/sub, measured with the same client code style, in one run.

Cells: PING round trips per second (1 and 16 connections); pub/sub delivered messages per second
for 1 publisher to 1 and to 10 subscribers with 64 B and 4 KiB payloads; end-to-end latency
p50/p99 at a steady 1,000 msg/s (64 B, 1 subscriber). The brokers run in their own processes
(ours on uvloop when installed); the load generator is one asyncio process; the cells alternate
between the two servers. Prints a table with ratios (MSIP / Redis) and, beside each rate, the
server's CPU time per delivered message (or round trip): user + system time of the server's
process over the cell, from ``/proc``, which moves less than rates on a shared machine, and the
load generator's own CPU time per message (client CPU: one client reads MSIP frames, the other
RESP, so this shows when the client rather than the server sets the rate). Every cell runs for
``--seconds`` (default 2 s).

``--instructions`` counts instead the instructions the broker's whole process executes per
delivered message (or round trip) for a fixed amount of work: ``mip broker`` runs under
``valgrind --tool=callgrind``, its counters zeroed before and dumped after each cell
(``callgrind_control``), as ``serve_instructions.py`` does for ``mip serve``. Under valgrind the
broker is far slower than its clients, so it reads full batches whatever the machine does: the
count moves by about 1% between runs. ``--base REV`` counts that revision too (installed as
``ab_compare.py`` installs it)::

    python bench/msip_pubsub.py [--seconds 2] [--quick]
    python bench/msip_pubsub.py --instructions [--base main]

``--sub-procs N`` has the subscribers of the pub/sub cells read in N processes of their own
(spawned, each with its own event loop, counting in shared memory) rather than in the load
generator's one process, so that reading every subscriber's messages in Python does not cap
the delivered rate; the client CPU columns (the load generator's processes' CPU per delivered
message or round trip) count them too. ``--pubsub`` runs only the pub/sub cells::

    python bench/msip_pubsub.py --pubsub --sub-procs 2

``--ping N`` runs only the PING cells, N rounds, each round every server in turn (with ``--base
REV``, that revision's broker too), and prints each server's median rate and CPU per round trip
over the rounds: on a shared machine, the steadier comparison of per-round-trip costs::

    python bench/msip_pubsub.py --ping 5 [--base main] [--seconds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))

from ab_compare import cpu_seconds  # noqa: E402  (bench/ is not a package)

from mip.net import AsyncClient  # noqa: E402

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

_TS = struct.Struct("<d")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


# -- a minimal Redis client, built like ours: an asyncio protocol, futures for replies ---------

class _Resp(asyncio.Protocol):
    def __init__(self, client):
        self.client = client
        self.buf = bytearray()

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buf += data
        buf = self.buf
        pos = 0
        n = len(buf)
        while pos < n:
            end = buf.find(b"\r\n", pos)
            if end < 0:
                break
            kind = buf[pos]
            if kind in (43, 45, 58):  # + - :  one-line replies
                self.client._reply(bytes(buf[pos + 1:end]))
                pos = end + 2
            elif kind == 42:  # *: a pub/sub message array (3 bulk strings)
                item, newpos = self._array(buf, pos)
                if item is None:
                    break
                self.client._message(item)
                pos = newpos
            else:
                raise RuntimeError(f"unexpected RESP {bytes(buf[pos:pos + 20])!r}")
        del self.buf[:pos]

    @staticmethod
    def _array(buf, pos):
        end = buf.find(b"\r\n", pos)
        count = int(buf[pos + 1:end])
        pos = end + 2
        items = []
        for _ in range(count):
            end = buf.find(b"\r\n", pos)
            if end < 0:
                return None, pos
            if buf[pos] == 58:
                items.append(int(buf[pos + 1:end]))
                pos = end + 2
                continue
            size = int(buf[pos + 1:end])
            start = end + 2
            if len(buf) < start + size + 2:
                return None, pos
            items.append(bytes(buf[start:start + size]))
            pos = start + size + 2
        return items, pos


def _cmd(*args: bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n" % len(a))
        out.append(a)
        out.append(b"\r\n")
    return b"".join(out)


class RedisClient:
    def __init__(self, port: int):
        self.port = port
        self.replies = asyncio.Queue()
        self.pending = []
        self.on_message = None

    async def connect(self):
        loop = asyncio.get_running_loop()
        _, self.proto = await loop.create_connection(lambda: _Resp(self), "127.0.0.1", self.port)
        self.proto.transport.get_extra_info("socket").setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _reply(self, line):
        fut = self.pending.pop(0) if self.pending else None
        if fut is not None and not fut.done():
            fut.set_result(line)

    def _message(self, items):
        if items and items[0] == b"message" and self.on_message is not None:
            self.on_message(items[2])
        elif self.pending:
            fut = self.pending.pop(0)
            if not fut.done():
                fut.set_result(items)

    async def call(self, *args: bytes):
        fut = asyncio.get_running_loop().create_future()
        self.pending.append(fut)
        self.proto.transport.write(_cmd(*args))
        return await fut

    def publish_nowait(self, channel: bytes, data: bytes) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.pending.append(fut)
        self.proto.transport.write(_cmd(b"PUBLISH", channel, data))
        return fut

    async def ping(self):
        await self.call(b"PING")

    async def subscribe(self, channel: bytes, on_message):
        self.on_message = on_message
        await self.call(b"SUBSCRIBE", channel)

    def close(self):
        self.proto.transport.close()


# -- the same operations on MSIP ----------------------------------------------------------

class MsipSide:
    name = "MSIP"

    def __init__(self, port):
        self.port = port
        self.url = f"tcp://127.0.0.1:{port}"

    async def client(self):
        c = AsyncClient(self.url, reconnect=False)
        await c.connect()
        return c

    async def ping(self, c):
        await c.ping()

    async def subscribe(self, c, topic, on_data):
        await c.subscribe(topic, lambda e: on_data(e.data))

    def publish_nowait(self, c, topic, data):
        return c.publish_nowait(topic, data)

    async def sync(self, c):
        await c.ping()

    async def close(self, c):
        await c.close()


class RedisSide:
    name = "Redis"

    def __init__(self, port):
        self.port = port

    async def client(self):
        c = RedisClient(self.port)
        await c.connect()
        return c

    async def ping(self, c):
        await c.ping()

    async def subscribe(self, c, topic, on_data):
        await c.subscribe(topic.encode(), on_data)

    def publish_nowait(self, c, topic, data):
        return c.publish_nowait(topic.encode(), data)

    async def sync(self, c):
        await c.ping()

    async def close(self, c):
        c.close()


_SIDES = {"MSIP": MsipSide, "Redis": RedisSide}


class _Idle:
    """A meter that measures nothing (warm-up rounds)."""

    def start(self) -> None:
        pass

    def stop(self) -> float:
        return 0.0


_IDLE = _Idle()


class CpuMeter:
    """CPU seconds (user + system, all threads) a server process spends between start and
    stop, from /proc."""

    def __init__(self, pid: int):
        self.pid = pid
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = cpu_seconds(self.pid)

    def stop(self) -> float:
        return cpu_seconds(self.pid) - self._t0


class ClientMeter:
    """CPU seconds the load generator spends between start and stop: this process and the
    subscriber processes ``pids``."""

    def __init__(self, pids=()):
        self.meters = [CpuMeter(pid) for pid in (os.getpid(), *pids)]

    def start(self) -> None:
        for m in self.meters:
            m.start()

    def stop(self) -> float:
        return sum(m.stop() for m in self.meters)


class CallgrindMeter:
    """Instructions a process running under callgrind executes between start and stop
    (counters zeroed, then dumped, with ``callgrind_control``)."""

    def __init__(self, pid: int, dumps: Path):
        self.pid = pid
        self.dumps = dumps

    def _control(self, option: str) -> None:
        subprocess.run(["callgrind_control", option, str(self.pid)], check=True,
                       capture_output=True, timeout=600)

    def start(self) -> None:
        self._control("-z")

    def stop(self) -> float:
        self._control("-d")
        dumps = sorted(self.dumps.glob("callgrind.out.*"), key=lambda p: p.stat().st_mtime)
        for line in dumps[-1].read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                return float(line.split()[1])
        raise RuntimeError(f"no totals in {dumps[-1]}")


async def bench_ping(side, conns: int, seconds: float, meter=_IDLE,
                     count: int | None = None) -> tuple[float, float, float]:
    """Round trips per second, what ``meter`` measured per round trip, and the load
    generator's CPU seconds per round trip (``count``: that many round trips per connection
    instead of ``seconds``)."""
    clients = [await side.client() for _ in range(conns)]
    client_meter = ClientMeter()
    done = 0
    stop = time.perf_counter() + seconds

    async def loop(c):
        nonlocal done
        if count is not None:
            for _ in range(count):
                await side.ping(c)
            done += count
            return
        while time.perf_counter() < stop:
            await side.ping(c)
            done += 1

    meter.start()
    client_meter.start()
    t0 = time.perf_counter()
    await asyncio.gather(*(loop(c) for c in clients))
    elapsed = time.perf_counter() - t0
    spent = meter.stop()
    client_spent = client_meter.stop()
    for c in clients:
        await side.close(c)
    return done / elapsed, spent / done, client_spent / done


class _InProcess:
    """Subscribers read in the load generator's own event loop."""

    pids: tuple[int, ...] = ()
    pause = 0.0  # (the loop turns while waiting: the subscribers' reads are on it)

    def __init__(self):
        self.count = 0
        self.subscribers: list = []

    def received(self) -> int:
        return self.count

    async def start(self, side, subs: int) -> None:
        def on_data(_):
            self.count += 1

        self.subscribers = [await side.client() for _ in range(subs)]
        for s in self.subscribers:
            await side.subscribe(s, "bench", on_data)

    async def stop(self, side) -> None:
        for c in self.subscribers:
            await side.close(c)


def _subscriber_process(kind: str, port: int, conns: int, slot: int, counts, pipe) -> None:
    """A subscriber process: ``conns`` subscribers of topic ``bench`` counting what they
    receive in ``counts[slot]`` (shared memory), from "ready" to the "stop" it is sent."""
    view = memoryview(counts).cast("B").cast("q")

    def on_data(_):
        view[slot] += 1

    async def main():
        side = _SIDES[kind](port)
        clients = [await side.client() for _ in range(conns)]
        for c in clients:
            await side.subscribe(c, "bench", on_data)
        pipe.send("ready")
        await asyncio.get_running_loop().run_in_executor(None, pipe.recv)
        for c in clients:
            await side.close(c)

    (uvloop.run if uvloop is not None else asyncio.run)(main())


class _Processes:
    """Subscribers read in ``procs`` processes of their own (each its own event loop), their
    counts in shared memory."""

    pause = 0.0005  # (the subscribers read elsewhere: wait without taking a CPU from them)

    def __init__(self, procs: int):
        self.procs = procs
        self.workers: list = []
        self.pids: tuple[int, ...] = ()

    def received(self) -> int:
        return sum(self.view)

    async def start(self, side, subs: int) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        n = min(self.procs, subs)
        counts = ctx.RawArray("q", n)
        self.view = memoryview(counts).cast("B").cast("q")
        loop = asyncio.get_running_loop()
        for i in range(n):
            mine, theirs = ctx.Pipe()
            conns = subs // n + (i < subs % n)
            p = ctx.Process(target=_subscriber_process,
                            args=(side.name, side.port, conns, i, counts, theirs), daemon=True)
            p.start()
            self.workers.append((p, mine))
        for _, pipe in self.workers:
            if not await loop.run_in_executor(None, pipe.poll, 60) or pipe.recv() != "ready":
                raise RuntimeError("a subscriber process did not start")
        self.pids = tuple(p.pid for p, _ in self.workers)

    async def stop(self, side) -> None:
        for _, pipe in self.workers:
            pipe.send("stop")
        for p, _ in self.workers:
            await asyncio.get_running_loop().run_in_executor(None, p.join, 10)
            if p.is_alive():
                p.kill()
                p.join()


async def bench_pubsub(side, subs: int, size: int, seconds: float, meter=_IDLE,
                       count: int | None = None, window: int = 200,
                       procs: int = 0) -> tuple[float, float, float]:
    """Delivered messages per second, what ``meter`` measured per delivered message, and the
    load generator's CPU seconds per delivered message (``count``: publish that many messages
    instead of for ``seconds``; ``procs``: the subscribers read in that many processes of their
    own, their CPU counted with the load generator's)."""
    group = _Processes(procs) if procs else _InProcess()
    await group.start(side, subs)
    received = group.received
    pub = await side.client()
    client_meter = ClientMeter(group.pids)
    data = b"x" * size
    sent = 0
    meter.start()
    client_meter.start()
    t0 = time.perf_counter()
    stop = t0 + seconds
    while sent < count if count is not None else time.perf_counter() < stop:
        # publish a window, then let the subscribers catch up to within one window
        for _ in range(window):
            side.publish_nowait(pub, "bench", data)
        sent += window
        await side.sync(pub)
        for _ in range(10_000):
            if received() >= (sent - window) * subs:
                break
            await asyncio.sleep(group.pause)
    for _ in range(2000 if count is None else 600_000):
        if received() >= sent * subs:
            break
        await asyncio.sleep(0.001)
    elapsed = time.perf_counter() - t0
    spent = meter.stop()
    client_spent = client_meter.stop()
    got = received()
    await group.stop(side)
    await side.close(pub)
    return got / elapsed, spent / max(got, 1), client_spent / max(got, 1)


async def bench_latency(side, rate: float, seconds: float, size: int = 64) -> tuple[float, float]:
    lat = []

    def on_data(d):
        lat.append(time.perf_counter() - _TS.unpack_from(bytes(d[:8]))[0])

    sub = await side.client()
    await side.subscribe(sub, "lat", on_data)
    pub = await side.client()
    pad = b"y" * (size - 8)
    n = int(rate * seconds)
    t0 = time.perf_counter()
    for i in range(n):
        target = t0 + i / rate
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        side.publish_nowait(pub, "lat", _TS.pack(time.perf_counter()) + pad)
    for _ in range(1000):
        if len(lat) >= n:
            break
        await asyncio.sleep(0.001)
    await side.close(sub)
    await side.close(pub)
    lat.sort()
    return lat[len(lat) // 2] * 1e3, lat[int(len(lat) * 0.99)] * 1e3


async def run_all(sides, meters, seconds, procs: int = 0, only_pubsub: bool = False):
    """Every cell on each side in turn (``only_pubsub``: the pub/sub cells); prints the
    table."""
    rows = []
    if not only_pubsub:
        for conns in (1, 16):
            r = [await bench_ping(s, conns, seconds, m) for s, m in zip(sides, meters)]
            rows.append((f"PING round trips/s, {conns} conn", r, "{:,.0f}"))
    for subs in (1, 10):
        for size in (64, 4096):
            r = [await bench_pubsub(s, subs, size, seconds, m, procs=procs)
                 for s, m in zip(sides, meters)]
            rows.append((f"pub/sub delivered msg/s, 1->{subs}, {size} B", r, "{:,.0f}"))
    if not only_pubsub:
        lat = [await bench_latency(s, 1000, seconds) for s in sides]
        rows.append(("latency p50 ms @1,000 msg/s, 64 B", [(x[0], None, None) for x in lat],
                     "{:.3f}"))
        rows.append(("latency p99 ms @1,000 msg/s, 64 B", [(x[1], None, None) for x in lat],
                     "{:.3f}"))
    print("\n| cell | MSIP (mip) | Redis | ratio MSIP/Redis | MSIP CPU µs/msg | Redis CPU µs/msg "
          "| CPU ratio MSIP/Redis | client CPU µs/msg, MSIP | client CPU µs/msg, Redis |"
          "\n|---|---|---|---|---|---|---|---|---|")
    for name, ((a, ca, la), (b, cb, lb)), fmt in rows:
        cpu = ("| – | – | – | – | –" if ca is None else
               f"| {ca * 1e6:.2f} | {cb * 1e6:.2f} | {ca / cb if cb else float('nan'):.2f} "
               f"| {la * 1e6:.2f} | {lb * 1e6:.2f}")
        print(f"| {name} | {fmt.format(a)} | {fmt.format(b)} | {a / b:.2f} {cpu} |")


async def run_ping(names, sides, meters, seconds: float, rounds: int) -> None:
    """The PING cells only, ``rounds`` times, each round every side in turn; prints each
    side's median rate and CPU per round trip, and their ratios to the last side's."""
    results: dict[tuple[int, int], list[tuple[float, float, float]]] = {}
    for side in sides:  # warm-up, unmeasured
        await bench_ping(side, 16, 0, count=100)
    for _ in range(rounds):
        for conns in (1, 16):
            for i, (side, meter) in enumerate(zip(sides, meters)):
                results.setdefault((conns, i), []).append(
                    await bench_ping(side, conns, seconds, meter))
    print("\n| PING cell, median of %d rounds | " % rounds
          + " | ".join(f"{n} round trips/s | {n} CPU µs" for n in names)
          + " | " + " | ".join(f"{n}/{names[-1]} rate | {n}/{names[-1]} CPU" for n in names[:-1])
          + " |")
    print("|---" * (1 + 2 * len(names) + 2 * (len(names) - 1)) + "|")
    for conns in (1, 16):
        med = [(statistics.median(r for r, _, _ in results[conns, i]),
                statistics.median(c for _, c, _ in results[conns, i]))
               for i in range(len(sides))]
        ref = med[-1]
        print(f"| {conns} conn | " + " | ".join(f"{r:,.0f} | {c * 1e6:.2f}" for r, c in med)
              + " | " + " | ".join(f"{r / ref[0]:.2f} | {c / ref[1]:.2f}" for r, c in med[:-1])
              + " |")


#: the cells counted with --instructions: (name, coroutine function, its arguments)
_COUNTED = [
    ("PING, 1 conn, per round trip", bench_ping, dict(conns=1, count=2000)),
    ("PING, 16 conn, per round trip", bench_ping, dict(conns=16, count=500)),
    ("pub/sub 1->1, 64 B, per delivered message", bench_pubsub, dict(subs=1, size=64, count=10_000)),
    ("pub/sub 1->10, 64 B, per delivered message", bench_pubsub,
     dict(subs=10, size=64, count=4000)),
    ("pub/sub 1->10, 4096 B, per delivered message", bench_pubsub,
     dict(subs=10, size=4096, count=2000)),
]


async def count_all(port: int, pid: int, dumps: Path) -> list[float]:
    """Instructions per unit of each counted cell, after one unmeasured round of each."""
    side = MsipSide(port)
    meter = CallgrindMeter(pid, dumps)
    for _, bench, kw in _COUNTED:  # warm-up: caches, routes, the allocator's pools
        await bench(side, seconds=0, **{**kw, "count": kw["count"] // 10})
    return [(await bench(side, seconds=0, meter=meter, **kw))[1] for _, bench, kw in _COUNTED]


def _broker_argv(python: str, port: int) -> list[str]:
    return [python, "-c", "from mip.net.msip_broker import serve; "
            f"serve('tcp://127.0.0.1:{port}', idle_timeout=None)"]


def instructions(base: str | None) -> None:
    """Print the instructions the broker executes per delivered message (or round trip), for
    this checkout and, with ``base``, for that revision."""
    if shutil.which("valgrind") is None:
        sys.exit("valgrind not found: apt-get install -y valgrind")
    sides = [("this tree", sys.executable)]
    if base is not None:
        import ab_compare

        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mip-bench"
        sides.insert(0, (f"base ({base})", str(ab_compare.ensure_revision(cache, base)[0])))
    counts = []
    for _, python in sides:
        with tempfile.TemporaryDirectory() as tmp:
            port = free_port()
            env = dict(os.environ)
            if python == sys.executable:
                env["PYTHONPATH"] = ROOT
            else:
                env.pop("PYTHONPATH", None)  # the revision's installed package
            proc = subprocess.Popen(["valgrind", "--tool=callgrind",
                                     f"--callgrind-out-file={tmp}/callgrind.out",
                                     *_broker_argv(python, port)],
                                    cwd=tmp, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            try:
                wait_port(port, 300)
                runner = uvloop.run if uvloop is not None else asyncio.run
                counts.append(runner(asyncio.wait_for(count_all(port, proc.pid, Path(tmp)),
                                                      3000)))
            finally:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    print("\n| broker instructions | " + " | ".join(label for label, _ in sides)
          + (" | new/base |" if len(sides) > 1 else " |"))
    print("|---" * (len(sides) + 1 + (len(sides) > 1)) + "|")
    for i, (name, _, _) in enumerate(_COUNTED):
        cells = [f"{c[i]:,.0f}" for c in counts]
        if len(counts) > 1:
            cells.append(f"{counts[1][i] / counts[0][i]:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="duration of each cell (s)")
    ap.add_argument("--quick", action="store_true", help="0.5 s cells")
    ap.add_argument("--instructions", action="store_true",
                    help="count the broker's instructions per message under callgrind instead")
    ap.add_argument("--base", help="with --instructions or --ping: this git revision's broker too")
    ap.add_argument("--ping", type=int, metavar="ROUNDS",
                    help="only the PING cells, this many interleaved rounds (medians)")
    ap.add_argument("--pubsub", action="store_true", help="only the pub/sub cells")
    ap.add_argument("--sub-procs", type=int, default=0, metavar="N",
                    help="the subscribers read in N processes of their own (0: in the load "
                         "generator's process)")
    args = ap.parse_args()
    if args.instructions:
        instructions(args.base)
        return
    seconds = 0.5 if args.quick else args.seconds
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        sys.exit("redis-server not found: apt-get install -y redis-server")
    load_before = os.getloadavg()
    msip_port, redis_port = free_port(), free_port()
    brokers = [("MSIP", sys.executable, {**os.environ, "PYTHONPATH": ROOT}, msip_port)]
    if args.base is not None and args.ping:
        import ab_compare

        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mip-bench"
        python = str(ab_compare.ensure_revision(cache, args.base)[0])
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # its installed package
        brokers.insert(0, (f"MSIP {args.base}", python, env, free_port()))
    # cwd: not this checkout, whose package `python -c` would import before the installed one
    procs = [subprocess.Popen(_broker_argv(python, port), env=env, cwd=tempfile.gettempdir())
             for _, python, env, port in brokers]
    procs.append(subprocess.Popen([redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1",
                                   "--save", "", "--appendonly", "no", "--protected-mode", "no"],
                                  stdout=subprocess.DEVNULL))
    try:
        for _, _, _, port in brokers:
            wait_port(port)
        wait_port(redis_port)
        sides = [*(MsipSide(port) for _, _, _, port in brokers), RedisSide(redis_port)]
        meters = [CpuMeter(p.pid) for p in procs]
        runner = uvloop.run if uvloop is not None else asyncio.run
        if args.ping:
            names = [name for name, _, _, _ in brokers] + ["Redis"]
            runner(asyncio.wait_for(run_ping(names, sides, meters, seconds, args.ping), 3000))
        else:
            runner(asyncio.wait_for(run_all(sides, meters, seconds, args.sub_procs,
                                            args.pubsub), 600))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
    load = os.getloadavg()
    loop_name = "uvloop" if uvloop else "asyncio"
    generator = (f"one {loop_name} process" if not args.sub_procs else
                 f"one {loop_name} process publishing, the subscribers in {args.sub_procs} more")
    print(f"\n(cells of {seconds} s; load generator: {generator}; {os.cpu_count()} CPUs; "
          f"1-minute load average {load_before[0]:.1f} before the run, {load[0]:.1f} after; "
          "CPU: the server process's user + system time per delivered message or round trip; "
          "client CPU: the load generator's processes')")


if __name__ == "__main__":
    main()
