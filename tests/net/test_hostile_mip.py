"""Hostile peers against the MIP listener of a `mip serve` subprocess.

Each test runs a well-behaved client alongside (every answer right) and bounds the
server's memory from its settings. Peers use other loopback addresses (127.0.0.2, ...)
than the well-behaved client (127.0.0.1), as other hosts would.
"""

from __future__ import annotations

import os
import struct
import threading
import time

import numpy as np
import pytest

import mip
from mip.errors import ErrorCode
from mip.net.mip_client import Client
from mip.serving.demo import build_demo_repository

from _serve_process import (Steady, address, closed_within, connect, flood, in_parallel, rss,
                            start, stop)

FRAME_TIMEOUT = 2.0
MAX_CONNECTIONS = 64
PER_PEER = 40
PENDING_REPLY = 256 << 10
BUFFERED_REQUEST = 1 << 20
MAX_FRAME = 1 << 20
X = np.arange(16, dtype=np.float32).reshape(1, 16)
REQUEST = b"".join(bytes(b) for b in mip.encode_request_buffers([[X]]))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = build_demo_repository(tmp_path_factory.mktemp("repo") / "demo")
    process, out = start(["--model-repository", str(repo), "--mip", "tcp://127.0.0.1:0",
                          "--mip-model", "identity", "--http", "none", "--grpc", "none",
                          "--frame-timeout", str(FRAME_TIMEOUT), "--idle-timeout", "60",
                          "--max-connections", str(MAX_CONNECTIONS),
                          "--max-connections-per-peer", str(PER_PEER),
                          "--max-pending-reply", str(PENDING_REPLY),
                          "--max-buffered-request", str(BUFFERED_REQUEST),
                          "--max-frame-size", str(MAX_FRAME)], 1)
    host, port = address(out, "serving MIP on")
    yield process, host, port
    assert stop(process) == 0


@pytest.fixture
def good_client(server):
    _, host, port = server
    client = Client(f"tcp://{host}:{port}")

    def call() -> bool:
        (item,) = client.infer([[X]])
        return np.array_equal(item[0], X)

    with Steady(call) as steady:
        yield steady
    client.close()
    steady.check()


def _error_code(received: bytes) -> int | None:
    """The code of the ERROR frame among the replies in `received`, if there is one."""
    for message in mip.FrameParser().feed(received):
        if message.kind == mip.KIND_ERROR:
            return message.error_code
    return None


def test_slowloris_peers_are_closed_by_the_frame_deadline(server, good_client):
    _, host, port = server
    peers = [connect(host, port, "127.0.0.2") for _ in range(20)]
    results = in_parallel(lambda s: closed_within(s, 6 * FRAME_TIMEOUT, REQUEST), peers)
    for closed, received in results:
        assert closed  # long before the 48 s the frame would take at this pace
        assert _error_code(received) == ErrorCode.PROTOCOL
    for sock in peers:
        sock.close()


def test_idle_flood_does_not_lock_out_a_new_client(server, good_client):
    _, host, port = server
    first = [connect(host, port, "127.0.0.2") for _ in range(PER_PEER)]
    # one address may not hold more than its share
    extra = connect(host, port, "127.0.0.2")
    closed, received = closed_within(extra, 10)
    assert closed and _error_code(received) == ErrorCode.MEMORY
    # more idle connections than the listener takes: the longest-idle make room
    second = [connect(host, port, "127.0.0.3") for _ in range(PER_PEER)]
    with Client(f"tcp://{host}:{port}") as newcomer:
        (item,) = newcomer.infer([[X]])
        np.testing.assert_array_equal(item[0], X)
    evicted = sum(closed_within(s, 0.05)[0] for s in first + second)
    assert evicted >= 2 * PER_PEER + 2 - MAX_CONNECTIONS
    for sock in [extra, *first, *second]:
        sock.close()


def test_garbage_is_answered_with_an_error_and_a_close(server, good_client):
    _, host, port = server
    rng = np.random.default_rng(7)
    peers = [connect(host, port, "127.0.0.2") for _ in range(10)]
    for sock in peers:
        sock.sendall(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    for sock in peers:
        closed, received = closed_within(sock, 10)
        assert closed and _error_code(received) is not None
        sock.close()


def test_lying_sizes_are_bounded_and_closed(server, good_client):
    process, host, port = server
    before = rss(process.pid)
    # a frame that claims more than --max-frame-size: refused at once
    sock = connect(host, port, "127.0.0.2")
    sock.sendall(bytes([0, 2, 0, 0]) + struct.pack("!I", 1 << 30) + b"x" * 10)
    closed, received = closed_within(sock, 10)
    assert closed and _error_code(received) == ErrorCode.MEMORY
    sock.close()
    # frames that claim almost the limit and stop after a few octets: closed on time
    liars = [connect(host, port, "127.0.0.3") for _ in range(30)]
    for liar in liars:
        liar.sendall(bytes([0, 2, 0, 0]) + struct.pack("!I", MAX_FRAME - 64) + b"x" * 10)
    grown = rss(process.pid) - before
    results = in_parallel(lambda s: closed_within(s, 6 * FRAME_TIMEOUT), liars)
    assert all(closed and _error_code(received) == ErrorCode.PROTOCOL
               for closed, received in results)
    assert grown < len(liars) * MAX_FRAME + (64 << 20)
    for liar in liars:
        liar.close()


def test_non_reading_clients_leave_memory_bounded_and_others_served(server, good_client):
    process, host, port = server
    before = rss(process.pid)
    hogs = [connect(host, port, "127.0.0.2", rcvbuf=4096) for _ in range(10)]
    stop_flag = threading.Event()
    threads = flood(hogs, REQUEST * 256, stop_flag)
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
    per_connection = PENDING_REPLY + BUFFERED_REQUEST + MAX_FRAME
    assert peak - before < len(hogs) * per_connection + (64 << 20), (before, peak)


def test_the_listener_still_serves_after_all_that(server):
    _, host, port = server
    with Client(f"tcp://{host}:{port}") as client:
        (item,) = client.infer([[X]])
        np.testing.assert_array_equal(item[0], X)
    assert os.path.exists(f"/proc/{server[0].pid}")
