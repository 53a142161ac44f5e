"""Hostile peers against a `mip broker` subprocess.

Each test runs a well-behaved client alongside (a PING and a publish to its own
subscription, every one answered) and bounds the broker's memory from its settings. Peers
use other loopback addresses (127.0.0.2, ...) than the well-behaved client (127.0.0.1).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from mip import msip
from mip.net.msip_client import Client

from _serve_process import (Steady, address, closed_within, connect, flood, in_parallel, rss,
                            start, stop)

FRAME_TIMEOUT = 2.0
MAX_CONNECTIONS = 64
PER_PEER = 40
PENDING_REPLY = 256 << 10
MAX_PAYLOAD = 1 << 20
_PUBLISH, _ERROR, _PING = 4, 7, 8
PING = msip.encode_header(_PING, 1, 0, 1, 0)


@pytest.fixture(scope="module")
def broker():
    process, out = start(["--msip", "tcp://127.0.0.1:0", "--frame-timeout", str(FRAME_TIMEOUT),
                          "--idle-timeout", "60", "--max-connections", str(MAX_CONNECTIONS),
                          "--max-connections-per-peer", str(PER_PEER),
                          "--max-pending-reply", str(PENDING_REPLY),
                          "--max-payload", str(MAX_PAYLOAD)], 1, command="broker",
                         pattern="mip: MSIP broker on")
    host, port = address(out, "MSIP broker on")
    yield process, host, port
    assert stop(process) == 0


@pytest.fixture
def good_client(broker):
    _, host, port = broker
    client = Client(f"tcp://{host}:{port}")
    client.connect()
    subscription = client.subscribe("steady.echo")
    sequence = iter(range(1 << 30))

    def call() -> bool:
        client.ping()
        text = str(next(sequence))
        client.publish("steady.echo", text, wait=True)
        return subscription.get(timeout=10).text() == text

    with Steady(call) as steady:
        yield steady
    client.close()
    steady.check()


def _error(received: bytes) -> str | None:
    """The reason of the ERROR frame among the frames in `received`, if there is one."""
    parser = msip.FrameParser(max_payload=1 << 20)
    try:
        frames = parser.feed(received)
    except Exception:
        return None
    for frame in frames:
        if frame.frame_type == _ERROR:
            return bytes(frame.payload).decode()
    return None


def test_slowloris_peers_are_closed_by_the_frame_deadline(broker, good_client):
    _, host, port = broker
    peers = [connect(host, port, "127.0.0.2") for _ in range(20)]
    results = in_parallel(lambda s: closed_within(s, 6 * FRAME_TIMEOUT, PING), peers)
    for closed, received in results:
        assert closed and "read timeout" in (_error(received) or "")
    for sock in peers:
        sock.close()


def test_idle_flood_does_not_lock_out_a_new_client(broker, good_client):
    _, host, port = broker
    first = [connect(host, port, "127.0.0.2") for _ in range(PER_PEER)]
    extra = connect(host, port, "127.0.0.2")
    closed, received = closed_within(extra, 10)
    assert closed and "too many connections from this address" in (_error(received) or "")
    second = [connect(host, port, "127.0.0.3") for _ in range(PER_PEER)]
    newcomer = Client(f"tcp://{host}:{port}")
    try:
        newcomer.connect()
        assert newcomer.ping() >= 0
    finally:
        newcomer.close()
    evicted = sum(closed_within(s, 0.05)[0] for s in first + second)
    assert evicted >= 2 * PER_PEER + 2 - MAX_CONNECTIONS
    for sock in [extra, *first, *second]:
        sock.close()


def test_garbage_is_answered_with_an_error_and_a_close(broker, good_client):
    _, host, port = broker
    rng = np.random.default_rng(7)
    for _ in range(10):
        sock = connect(host, port, "127.0.0.2")
        sock.sendall(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
        closed, received = closed_within(sock, 10)
        assert closed and _error(received)
        sock.close()


def test_lying_sizes_are_bounded_and_closed(broker, good_client):
    process, host, port = broker
    before = rss(process.pid)
    sock = connect(host, port, "127.0.0.2")
    sock.sendall(msip.encode_header(_PUBLISH, 1, 1 << 30, 1, 0) + b"x" * 10)
    closed, received = closed_within(sock, 10)
    assert closed and "too large" in (_error(received) or "")
    sock.close()
    liars = [connect(host, port, "127.0.0.3") for _ in range(30)]
    for liar in liars:
        liar.sendall(msip.encode_header(_PUBLISH, 1, MAX_PAYLOAD - 64, 1, 0) + b"x" * 10)
    grown = rss(process.pid) - before
    results = in_parallel(lambda s: closed_within(s, 6 * FRAME_TIMEOUT), liars)
    assert all(closed and "read timeout" in (_error(received) or "")
               for closed, received in results)
    assert grown < len(liars) * MAX_PAYLOAD + (64 << 20)
    for liar in liars:
        liar.close()


def test_non_reading_clients_leave_memory_bounded(broker, good_client):
    process, host, port = broker
    before = rss(process.pid)
    hogs = [connect(host, port, "127.0.0.2", rcvbuf=4096) for _ in range(10)]
    stop_flag = threading.Event()
    threads = flood(hogs, PING * 4096, stop_flag)  # every PING is answered with a PONG
    peak = before
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        time.sleep(0.5)
        peak = max(peak, rss(process.pid))
    stop_flag.set()
    for thread in threads:
        thread.join(10)
    for sock in hogs:
        sock.close()
    # per connection: the queued replies, the transport's buffer, one read's frames
    per_connection = PENDING_REPLY + (1 << 20) + (4 << 20)
    assert peak - before < len(hogs) * per_connection + (64 << 20), (before, peak)
