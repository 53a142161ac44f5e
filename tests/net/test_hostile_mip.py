"""Hostile peers against the MIP listener of a `mip serve` subprocess.

Each test runs a well-behaved client alongside (every answer right) and bounds the
server's memory from its settings. Peers use other loopback addresses (127.0.0.2, ...)
than the well-behaved client (127.0.0.1), as other hosts would.
"""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

import mip
from mip.errors import ErrorCode
from mip.net.mip_client import Client
from mip.serving.demo import build_demo_repository

from _serve_process import (Steady, address, count_closed, exchange, garbage, idle_flood, liars,
                            peak_rss_under_flood, slowloris, start, stop)

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
    for closed, received in slowloris(host, port, REQUEST, 6 * FRAME_TIMEOUT):
        assert closed  # long before the 48 s the frame would take at this pace
        assert _error_code(received) == ErrorCode.PROTOCOL


def test_idle_flood_does_not_lock_out_a_new_client(server, good_client):
    _, host, port = server
    refusal, sockets = idle_flood(host, port, PER_PEER, between=good_client.answered)
    assert _error_code(refusal) == ErrorCode.MEMORY  # over the address's share
    # more idle connections than the listener takes: the longest-idle made room
    with Client(f"tcp://{host}:{port}") as newcomer:
        (item,) = newcomer.infer([[X]])
        np.testing.assert_array_equal(item[0], X)
    assert count_closed(sockets) >= 2 * PER_PEER + 2 - MAX_CONNECTIONS
    for sock in sockets:
        sock.close()


def test_garbage_is_answered_with_an_error_and_a_close(server, good_client):
    _, host, port = server
    for closed, received in garbage(host, port):
        assert closed and _error_code(received) is not None


def test_lying_sizes_are_bounded_and_closed(server, good_client):
    process, host, port = server
    # a frame that claims more than --max-frame-size: refused at once
    closed, received = exchange(host, port, bytes([0, 2, 0, 0]) + struct.pack("!I", 1 << 30))
    assert closed and _error_code(received) == ErrorCode.MEMORY
    # frames that claim almost the limit and stop after a few octets: closed on time
    grown, results = liars(process, host, port, bytes([0, 2, 0, 0])
                           + struct.pack("!I", MAX_FRAME - 64) + b"x" * 10, 6 * FRAME_TIMEOUT)
    assert all(closed and _error_code(received) == ErrorCode.PROTOCOL
               for closed, received in results)
    assert grown < len(results) * MAX_FRAME + (64 << 20)


def test_non_reading_clients_leave_memory_bounded_and_others_served(server, good_client):
    process, host, port = server
    grown = peak_rss_under_flood(process, host, port, REQUEST * 256)
    per_connection = PENDING_REPLY + BUFFERED_REQUEST + MAX_FRAME
    assert grown < 10 * per_connection + (64 << 20), grown


def test_the_listener_still_serves_after_all_that(server):
    _, host, port = server
    with Client(f"tcp://{host}:{port}") as client:
        (item,) = client.infer([[X]])
        np.testing.assert_array_equal(item[0], X)
    assert os.path.exists(f"/proc/{server[0].pid}")
