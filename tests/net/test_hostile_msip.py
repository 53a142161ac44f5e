"""Hostile peers against a `mip broker` subprocess.

Each test runs a well-behaved client alongside (a PING and a publish to its own
subscription, every one answered) and bounds the broker's memory from its settings. Peers
use other loopback addresses (127.0.0.2, ...) than the well-behaved client (127.0.0.1).
"""

from __future__ import annotations

import pytest

from mip import msip
from mip.net.msip_client import Client

from _serve_process import (Steady, address, count_closed, exchange, garbage, idle_flood, liars,
                            peak_rss_under_flood, slowloris, start, stop)

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
    for closed, received in slowloris(host, port, PING, 6 * FRAME_TIMEOUT):
        assert closed and "read timeout" in (_error(received) or "")


def test_idle_flood_does_not_lock_out_a_new_client(broker, good_client):
    _, host, port = broker
    refusal, sockets = idle_flood(host, port, PER_PEER, between=good_client.answered)
    assert "too many connections from this address" in (_error(refusal) or "")
    newcomer = Client(f"tcp://{host}:{port}")
    try:
        newcomer.connect()
        assert newcomer.ping() >= 0
    finally:
        newcomer.close()
    assert count_closed(sockets) >= 2 * PER_PEER + 2 - MAX_CONNECTIONS
    for sock in sockets:
        sock.close()


def test_garbage_is_answered_with_an_error_and_a_close(broker, good_client):
    _, host, port = broker
    for closed, received in garbage(host, port):
        assert closed and _error(received)


def test_lying_sizes_are_bounded_and_closed(broker, good_client):
    process, host, port = broker
    closed, received = exchange(host, port, msip.encode_header(_PUBLISH, 1, 1 << 30, 1, 0))
    assert closed and "too large" in (_error(received) or "")
    grown, results = liars(process, host, port, msip.encode_header(
        _PUBLISH, 1, MAX_PAYLOAD - 64, 1, 0) + b"x" * 10, 6 * FRAME_TIMEOUT)
    assert all(closed and "read timeout" in (_error(received) or "")
               for closed, received in results)
    assert grown < len(results) * MAX_PAYLOAD + (64 << 20)


def test_non_reading_clients_leave_memory_bounded(broker, good_client):
    process, host, port = broker
    grown = peak_rss_under_flood(process, host, port, PING * 4096)  # each PING gets a PONG
    # per connection: the queued replies, the transport's buffer, one read's frames
    per_connection = PENDING_REPLY + (1 << 20) + (4 << 20)
    assert grown < 10 * per_connection + (64 << 20), grown
