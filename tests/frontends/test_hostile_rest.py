"""Hostile peers against the REST listener of a `mip serve` subprocess.

Each test runs a well-behaved tritonclient alongside (every answer right) and bounds the
server's memory from its settings. Peers use other loopback addresses (127.0.0.2, ...)
than the well-behaved client (127.0.0.1), as other hosts would.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import tritonclient.http as httpclient

from mip.serving.demo import build_demo_repository

from _serve_process import (Steady, address, connect, count_closed, exchange, garbage,
                            idle_flood, in_parallel, liars, peak_rss_under_flood, rss,
                            slowloris, start, stop)

HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 3.0
MAX_CONNECTIONS = 64
PER_PEER = 40
PENDING_REPLY = 256 << 10
MAX_BODY = 1 << 20
MAX_HEADER = 16 << 10
X = np.arange(16, dtype=np.float32).reshape(1, 16)
BODY = json.dumps({"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32",
                               "data": X.ravel().tolist()}]}).encode()
REQUEST = (b"POST /v2/models/identity/infer HTTP/1.1\r\nhost: mip\r\n"
           b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
           % (len(BODY), BODY))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = build_demo_repository(tmp_path_factory.mktemp("repo") / "demo")
    process, out = start(["--model-repository", str(repo), "--mip", "none", "--grpc", "none",
                          "--http", "127.0.0.1:0", "--http-idle-timeout", "30",
                          "--http-header-timeout", str(HEADER_TIMEOUT),
                          "--http-body-timeout", str(BODY_TIMEOUT),
                          "--max-connections", str(MAX_CONNECTIONS),
                          "--max-connections-per-peer", str(PER_PEER),
                          "--max-pending-reply", str(PENDING_REPLY),
                          "--http-max-body-size", str(MAX_BODY),
                          "--http-max-header-size", str(MAX_HEADER)], 1)
    host, port = address(out, "REST and /metrics on")
    yield process, host, port
    assert stop(process) == 0


def _infer(client) -> bool:
    tensor = httpclient.InferInput("input", [1, 16], "FP32")
    tensor.set_data_from_numpy(X)
    return np.array_equal(client.infer("identity", [tensor]).as_numpy("output"), X)


@pytest.fixture
def good_client(server):
    _, host, port = server
    client = httpclient.InferenceServerClient(f"{host}:{port}")
    with Steady(lambda: _infer(client)) as steady:
        yield steady
    client.close()
    steady.check()


def _status(received: bytes) -> int | None:
    """The status of the first response in `received`."""
    if not received.startswith(b"HTTP/1.1 "):
        return None
    return int(received[9:12])


def test_slowloris_headers_and_bodies_are_closed_on_time(server, good_client):
    _, host, port = server
    for closed, received in slowloris(host, port, REQUEST, 6 * HEADER_TIMEOUT):
        assert closed and _status(received) == 408
    # a body sent one octet at a time after complete headers
    results = slowloris(host, port, BODY, 6 * BODY_TIMEOUT, count=10, source="127.0.0.3",
                        first=REQUEST[:REQUEST.index(b"\r\n\r\n") + 4])
    assert all(closed for closed, _ in results)


def test_idle_flood_does_not_lock_out_a_new_client(server, good_client):
    _, host, port = server

    # The well-behaved client's keep-alive connection is used after the listener has the
    # first connections, so they, not it, are the longest idle when room is made. (Its POSTs
    # are not retried on a connection closed while idle: they would fail, as the documented
    # policy allows.)
    refusal, sockets = idle_flood(host, port, PER_PEER, between=good_client.answered)
    assert _status(refusal) == 503 and b"max_connections_per_peer" in refusal
    newcomer = httpclient.InferenceServerClient(f"{host}:{port}")
    try:
        assert _infer(newcomer)
    finally:
        newcomer.close()
    assert count_closed(sockets) >= 2 * PER_PEER + 1 - MAX_CONNECTIONS
    for sock in sockets:
        sock.close()


def test_garbage_is_answered_400_and_closed(server, good_client):
    _, host, port = server
    for closed, received in garbage(host, port):
        assert closed and _status(received) == 400


def test_lying_content_lengths_are_bounded_and_closed(server, good_client):
    process, host, port = server
    closed, received = exchange(host, port, b"POST /v2/models/identity/infer HTTP/1.1\r\n"
                                b"host: mip\r\ncontent-length: %d\r\n\r\n{}" % (1 << 30))
    assert _status(received) == 413 and b"--http-max-body-size" in received
    grown, results = liars(process, host, port,
                           b"POST /v2/models/identity/infer HTTP/1.1\r\nhost: mip\r\n"
                           b"content-length: %d\r\n\r\n{\"inputs\"" % (MAX_BODY - 64),
                           6 * BODY_TIMEOUT)
    assert all(closed for closed, _ in results)
    assert grown < len(results) * MAX_BODY + (64 << 20)


def test_non_reading_pipelining_clients_leave_memory_bounded(server, good_client):
    process, host, port = server
    grown = peak_rss_under_flood(process, host, port, REQUEST * 200)
    # per connection: unread replies and one read held back, times the heap the server
    # takes while it answers that many small requests and queues their replies (measured
    # at up to about 16 times their octets); without backpressure it grows without end
    per_connection = 16 * (PENDING_REPLY + (256 << 10))
    assert grown < 10 * per_connection + (64 << 20), grown


def test_pipelined_requests_are_answered_in_order(server):
    _, host, port = server
    sock = connect(host, port)
    requests = b"".join(b"GET /v2/models/%s HTTP/1.1\r\nhost: mip\r\n\r\n" % name
                        for name in [b"identity", b"mlp"] * 50)
    sock.sendall(requests)
    received, names = b"", []
    while len(names) < 100:
        data = sock.recv(65536)
        assert data, received[-200:]
        received += data
        while b"\r\n\r\n" in received:  # take every complete response
            head, _, rest = received.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            if len(rest) < length:
                break
            names.append(json.loads(rest[:length])["name"])
            received = rest[length:]
    sock.close()
    assert names == ["identity", "mlp"] * 50


def _endless_head(host: str, port: int, start: bytes) -> tuple[int | None, int]:
    """From 127.0.0.4: `start`, then octets that never end the head (up to 8 MiB, until
    the server closes); the status it answered and the octets sent."""
    sock = connect(host, port, "127.0.0.4")
    sock.sendall(start)
    sent, chunk = 0, b"a" * (64 << 10)
    try:
        while sent < (8 << 20):
            sock.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass  # closed by the server, as it should
    received = b""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            received += data
    except OSError:
        pass
    sock.close()
    return _status(received), sent


def test_endless_heads_are_answered_431_and_bounded(server, good_client):
    process, host, port = server
    starts = [b"POST /v2/models/identity/infer HTTP/1.1\r\nhost: mip\r\nx-long: ",
              b"POST /v2/models/identity/infer?",  # a target that never ends
              b"GET /v2/health/ready HTTP/1.1\r\nhost: mip\r\n"]  # fields without end
    before = rss(process.pid)
    results = in_parallel(lambda start: _endless_head(host, port, start), starts * 4)
    grown = rss(process.pid) - before
    for status, sent in results:
        # refused at most one read (64K) past the limit: the rest was never read
        assert status == 431 and sent < (8 << 20), (status, sent)
    # each head held at most MAX_HEADER + one read while it grew
    assert grown < 12 * 4 * (MAX_HEADER + (64 << 10)) + (32 << 20), grown
    # a head within the limit is served
    closed, received = exchange(host, port, b"GET /v2/health/ready HTTP/1.1\r\nhost: mip\r\n"
                                b"x-fine: %s\r\nconnection: close\r\n\r\n"
                                % (b"b" * (MAX_HEADER // 2)))
    assert _status(received) == 200


def _cache_filler(i: int) -> bytes:
    """Request ``i`` of a peer that makes every request new to the listener's caches: its own
    target, and a binary-extension JSON header of about 2K of its own (an id as long as the
    header allows, or as many outputs named as it holds: refused, once parsed)."""
    doc: dict = {"id": f"{i:0>1900}", "inputs": [{
        "name": "input", "shape": [1, 16], "datatype": "FP32",
        "parameters": {"binary_data_size": X.nbytes}}]}
    if i % 2:
        doc["id"], doc["outputs"] = i, [{"name": f"{i}-{k}"} for k in range(130)]
    header = json.dumps(doc).encode()
    return (b"POST /v2/models/identity/infer?n=%d HTTP/1.1\r\nhost: mip\r\n"
            b"content-length: %d\r\ninference-header-content-length: %d\r\n\r\n%s%s"
            % (i, len(header) + X.nbytes, len(header), header, X.tobytes()))


def test_a_new_header_and_target_every_request_leave_the_caches_bounded(server, good_client):
    process, host, port = server
    sock = connect(host, port, "127.0.0.2", timeout=30)
    replies = b""
    rounds, each = 100, 50  # 5000 requests

    def run(first: int, count: int) -> None:
        nonlocal replies
        sock.sendall(b"".join(_cache_filler(i) for i in range(first, first + count)))
        while replies.count(b"HTTP/1.1 ") < count:
            data = sock.recv(1 << 16)
            assert data, replies[-200:]
            replies += data
        statuses = [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3})", replies)]
        assert statuses == [200, 400] * (count // 2), statuses
        replies = b""

    run(0, 2 * each)  # the caches filled once
    before = rss(process.pid)
    for n in range(1, rounds):
        run(n * each + each, each)
    grown = rss(process.pid) - before
    sock.close()
    # docs/limits.md: under 4M of plans, 1M of reply templates, 256 targets (here 40 octets
    # each), once filled
    assert grown < 8 << 20, grown  # (17M measured with the bounds lifted)
