"""The MSIP broker's publish path without sockets: parse, route, queue, write, timed.

One publisher's PUBLISH frames are handed to the broker as a socket would (``get_buffer`` /
``buffer_updated``, 64 KiB at a time); subscribers' transports only count the octets written
to them. This times what the broker itself spends per delivered message, with no syscall and
no client in the measure, in CPU time of the process (steadier than wall time on a busy
machine). ``--baseline FILE`` times another version of ``msip_broker.py``
(e.g. ``git show main:mip/net/msip_broker.py > /tmp/base.py``) in the same run, rounds
interleaved (order alternated); the median of the rounds is printed, with the ratio.

    python bench/msip_routing.py [--messages 20000] [--rounds 5] [--baseline FILE]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import statistics
import struct
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without installing

from mip.net import msip_broker  # noqa: E402

HDR = struct.Struct(">4sBBHHHIQ")


def frame(frame_type: int, payload: bytes, msg_id: int = 0, flags: int = 0) -> bytes:
    return HDR.pack(b"MSIP", 1, flags, frame_type, 1, 0, len(payload), msg_id) + payload


class CountingTransport:
    """What the broker writes to is counted, not sent."""

    def __init__(self, port: int):
        self.port = port
        self.octets = 0

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", self.port) if name == "peername" else default

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def write(self, data):
        self.octets += len(data)

    def writelines(self, chunks):
        for c in chunks:
            self.octets += len(c)

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def close(self):
        pass

    def abort(self):
        pass


def feed(conn, data: bytes) -> None:
    view = memoryview(data)
    while view:
        buf = conn.get_buffer(len(view))
        n = min(len(buf), len(view), 65536)
        buf[:n] = view[:n]
        conn.buffer_updated(n)
        view = view[n:]


def one_round(module, fanout: int, size: int, messages: int) -> float:
    """CPU seconds the broker of ``module`` takes to route ``messages`` publishes to ``fanout``."""
    broker = module.Broker(max_connections=fanout + 10)
    subs = []
    for i in range(fanout):
        conn = module._Connection(broker)
        conn.connection_made(CountingTransport(10000 + i))
        feed(conn, frame(2, b"bench.topic", 1))  # SUBSCRIBE
        subs.append(conn)
    pub = module._Connection(broker)
    pub.connection_made(CountingTransport(9999))
    body = struct.pack(">H", 11) + b"bench.topic" + b"\x07" * size
    stream = b"".join(frame(4, body, i + 1) for i in range(messages))
    t0 = time.process_time()
    feed(pub, stream)
    elapsed = time.process_time() - t0
    expected = messages * (24 + len(body))
    assert all(c.transport.octets == expected for c in subs), "not every event was written"
    return elapsed


def load(path: str):
    spec = importlib.util.spec_from_file_location("msip_broker_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=20000, help="publishes per cell")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per cell (median printed)")
    ap.add_argument("--baseline", help="another msip_broker.py to time in the same run")
    args = ap.parse_args()
    brokers = [("this", msip_broker)]
    if args.baseline:
        brokers.insert(0, ("baseline", load(args.baseline)))
    cells = [(1, 64), (10, 64), (100, 64), (10, 4096)]
    print("| fan-out | payload | " + " | ".join(f"{n}: delivered per CPU-s" for n, _ in brokers)
          + (" | this / baseline |" if args.baseline else " |"))
    print("|---" * (2 + len(brokers) + bool(args.baseline)) + "|")
    for fanout, size in cells:
        messages = max(1000, args.messages // max(1, fanout // 10))
        times = {n: [] for n, _ in brokers}
        for i in range(args.rounds):  # interleaved: every broker once a round, order alternated
            for name, module in (brokers if i % 2 else brokers[::-1]):
                gc.collect()
                times[name].append(one_round(module, fanout, size, messages))
        rates = [messages * fanout / statistics.median(times[n]) for n, _ in brokers]
        row = f"| 1→{fanout} | {size} B | " + " | ".join(f"{r:,.0f}" for r in rates)
        if args.baseline:
            row += f" | {rates[1] / rates[0]:.2f}"
        print(row + " |")


if __name__ == "__main__":
    main()
