"""REST inference answered straight from the HTTP listener (mip.net.http_direct): the
HTTP/1.1 details uvicorn handles for every other request (bodies in chunks, compressed,
``Expect: 100-continue``, keep-alive, pipelining), and hostile peers (slow bodies, lying
and oversize bodies, disconnects) with a well-behaved client alongside."""

from __future__ import annotations

import gzip
import json
import logging
import socket
import time

import numpy as np
import pytest
import tritonclient.http as httpclient
from _oip_server import SLEEPY_MODEL, OipServer, add_python_model
from _serve_process import Steady, closed_within, connect
from _wait import wait_until

from mip.frontends.access import AccessLog
from mip.net.http_direct import DirectCycle
from mip.net.http_server import HttpLimits
from mip.serving.demo import build_demo_repository

LIMIT = 64 << 10  # octets: the body limit here
BODY_TIMEOUT = 2.0
X = np.arange(16, dtype=np.float32).reshape(1, 16)
BODY = json.dumps({"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32",
                               "data": X.ravel().tolist()}]}).encode()


def _post(body: bytes = BODY, model: bytes = b"identity", headers: bytes = b"",
          length: int | None = None) -> bytes:
    length = len(body) if length is None else length
    return (b"POST /v2/models/%s/infer HTTP/1.1\r\nhost: mip\r\n%scontent-length: %d\r\n\r\n%s"
            % (model, headers, length, body))


def _sleepy(seconds: float) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1],
                                   "data": [seconds]}]}).encode()


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list = []

    def emit(self, record):
        self.records.append(record.args)


@pytest.fixture(scope="module")
def records():
    logger = logging.getLogger("test.rest_direct.access")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = _Records()
    logger.addHandler(handler)
    yield handler, logger
    logger.removeHandler(handler)


@pytest.fixture(scope="module")
def server(tmp_path_factory, records):
    repo = build_demo_repository(tmp_path_factory.mktemp("direct") / "repo")
    add_python_model(repo, "sleepy", SLEEPY_MODEL, {
        "max_batch_size": 1, "dynamic_batching": {"max_queue_delay_us": 0}})
    limits = HttpLimits(header_timeout=2.0, body_timeout=BODY_TIMEOUT)
    with OipServer(repo, http_max_body_size=LIMIT, http_limits=limits,
                   access_log=AccessLog(records[1])) as served:
        yield served


@pytest.fixture
def good_client(server):
    client = httpclient.InferenceServerClient(server.http_url, connection_timeout=10,
                                              network_timeout=10)

    def infer() -> bool:
        tensor = httpclient.InferInput("input", [1, 16], "FP32")
        tensor.set_data_from_numpy(X)
        return np.array_equal(client.infer("identity", [tensor]).as_numpy("output"), X)

    with Steady(infer) as steady:
        yield steady
    client.close()
    steady.check()


def _connect(server, source: str = "127.0.0.1") -> socket.socket:
    host, port = server.http_url.rsplit(":", 1)
    return connect(host, int(port), source)


class _Reader:
    """Responses off a socket, one at a time."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = b""

    def _more(self) -> None:
        data = self.sock.recv(65536)
        assert data, f"closed with {self.buffer[:200]!r} unread"
        self.buffer += data

    def head(self) -> tuple[int, dict[str, str]]:
        while b"\r\n\r\n" not in self.buffer:
            self._more()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(lines[0].split()[1]), headers

    def response(self) -> tuple[int, dict[str, str], bytes]:
        status, headers = self.head()
        length = int(headers["content-length"])
        while len(self.buffer) < length:
            self._more()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return status, headers, body


def _output(body: bytes) -> list:
    return json.loads(body)["outputs"][0]["data"]


def _chunked(body: bytes, size: int) -> bytes:
    out = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
                   for i in range(0, len(body), size))
    return out + b"0\r\n\r\n"


def test_inference_goes_straight_from_the_listener(server):
    sock = _connect(server)
    reader = _Reader(sock)
    sock.sendall(_post(_sleepy(0.3), b"sleepy"))
    # while it runs, the connection's cycle is a direct one, and no task serves it
    assert wait_until(lambda: server.call(_direct_cycles(server)) == 1)
    status, headers, body = reader.response()
    assert status == 200 and abs(_output(body)[0] - 0.3) < 1e-6
    assert "date" in headers and headers["content-type"] == "application/json"
    sock.close()


async def _direct_cycles(server):
    return sum(isinstance(c.cycle, DirectCycle) and not c.cycle.response_complete
               and not c.tasks - {c.cycle} for c in server.http.listener.connections)


def test_pipelined_requests_of_every_kind_are_answered_in_order(server):
    sock = _connect(server)
    reader = _Reader(sock)
    sock.sendall(_post() + b"GET /v2/models/identity HTTP/1.1\r\nhost: mip\r\n\r\n"
                 + _post(b"{not json") + _post(model=b"nothing") + _post()
                 + b"GET /v2/health/live HTTP/1.1\r\nhost: mip\r\n\r\n" + _post())
    statuses = []
    for _ in range(7):
        status, _, body = reader.response()
        statuses.append(status)
        if status == 200 and b"model_version" in body:
            assert _output(body) == X.ravel().tolist()
    assert statuses == [200, 200, 400, 404, 200, 200, 200]
    sock.close()


def test_chunked_compressed_body_with_100_continue(server):
    sock = _connect(server)
    reader = _Reader(sock)
    packed = gzip.compress(BODY)
    sock.sendall(b"POST /v2/models/identity/infer HTTP/1.1\r\nhost: mip\r\n"
                 b"expect: 100-continue\r\ncontent-encoding: gzip\r\n"
                 b"transfer-encoding: chunked\r\nx-request-id: r-1\r\n\r\n")
    assert reader.head() == (100, {})
    sock.sendall(_chunked(packed, 7))
    status, headers, body = reader.response()
    assert status == 200 and headers["x-request-id"] == "r-1"
    assert _output(body) == X.ravel().tolist()
    sock.close()


def test_a_body_declared_too_large_is_refused_before_it_is_read(server):
    sock = _connect(server)
    reader = _Reader(sock)
    sock.sendall(b"POST /v2/models/identity/infer HTTP/1.1\r\nhost: mip\r\n"
                 b"expect: 100-continue\r\ncontent-length: %d\r\n\r\n" % (LIMIT + 1))
    status, _, body = reader.response()  # no 100 Continue first
    assert status == 413 and b"--http-max-body-size" in body
    sock.close()


def test_an_oversize_chunked_body_is_refused_and_the_connection_goes_on(server):
    sock = _connect(server)
    reader = _Reader(sock)
    sock.sendall(b"POST /v2/models/identity/infer HTTP/1.1\r\nhost: mip\r\n"
                 b"transfer-encoding: chunked\r\n\r\n")
    sock.sendall(_chunked(b"x" * (LIMIT + 10), 4096)[:-5])  # all but the last chunk
    status, _, body = reader.response()
    assert status == 413 and b"over the limit" in body
    sock.sendall(b"0\r\n\r\n" + _post())  # the rest is read and dropped
    status, _, body = reader.response()
    assert status == 200 and _output(body) == X.ravel().tolist()
    sock.close()


def test_a_gzip_bomb_is_refused(server):
    bomb = gzip.compress(b" " * (LIMIT * 16))
    sock = _connect(server)
    sock.sendall(_post(bomb, headers=b"content-encoding: gzip\r\n"))
    status, _, body = _Reader(sock).response()
    assert status == 413 and b"decompressed request body" in body
    sock.close()


def test_http_1_0_and_connection_close_are_answered_and_closed(server):
    for request in (_post().replace(b"HTTP/1.1", b"HTTP/1.0"),
                    _post(headers=b"connection: close\r\n")):
        sock = _connect(server)
        sock.sendall(request)
        reader = _Reader(sock)
        status, headers, body = reader.response()
        assert status == 200 and headers["connection"] == "close"
        assert closed_within(sock, 5)[0]
        sock.close()


def test_slow_lying_and_vanishing_peers_beside_a_good_client(server, good_client, records):
    handler, _ = records
    # a body one octet every 0.5 s, and a Content-Length that promises more than comes:
    # both closed at the body timeout
    slow, liar = _connect(server, "127.0.0.2"), _connect(server, "127.0.0.3")
    request = _post()
    slow.sendall(request[:request.index(b"\r\n\r\n") + 4])
    liar.sendall(_post(b'{"inputs"', length=LIMIT - 1))
    assert closed_within(slow, 6 * BODY_TIMEOUT, BODY)[0]
    assert closed_within(liar, 6 * BODY_TIMEOUT)[0]
    # a peer that leaves mid-body is recorded as gone (499), and nothing of it runs
    before = len(handler.records)
    gone = _connect(server, "127.0.0.4")
    gone.sendall(_post(b'{"inputs": [', model=b"sleepy", length=200,
                       headers=b"x-request-id: gone-1\r\n"))
    time.sleep(0.2)
    gone.close()
    assert wait_until(lambda: any(r[6] == "gone-1" for r in handler.records[before:]))
    line = next(r for r in handler.records[before:] if r[6] == "gone-1")
    assert line[4] == 499
    slow.close()
    liar.close()


def test_a_request_queued_when_its_client_leaves_is_cancelled(server, records):
    handler, _ = records

    async def depth():
        return sum(s.queue_depth for (n, _), s in server.engine.stats().items()
                   if n == "sleepy")

    def line(request_id: str):
        return next((i, r) for i, r in enumerate(handler.records) if r[6] == request_id)

    busy, queued = _connect(server), _connect(server)
    busy.sendall(_post(_sleepy(1.0), b"sleepy", headers=b"x-request-id: busy-1\r\n"))
    time.sleep(0.2)
    queued.sendall(_post(_sleepy(0.0), b"sleepy", headers=b"x-request-id: queued-1\r\n"))
    assert wait_until(lambda: server.call(depth()) == 1)
    queued.close()
    status, _, _ = _Reader(busy).response()
    assert status == 200
    busy.close()
    # it left the queue (recorded 499) while the request before it still ran
    assert wait_until(lambda: any(r[6] == "queued-1" for r in handler.records))
    (cancelled, record), (answered, _) = line("queued-1"), line("busy-1")
    assert record[4] == 499 and cancelled < answered


def test_pipelining_a_flood_without_reading_stays_bounded(server, good_client):
    sock = _connect(server, "127.0.0.5")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(0.5)
    sent = 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # until the server stops reading
        try:
            sent += sock.send(_post() * 50)
        except socket.timeout:
            break
    held = server.call(_held(server))
    assert held < 8 * LIMIT + (4 << 20), held
    sock.close()


async def _held(server):
    return max((len(c.held) for c in server.http.listener.connections), default=0)


def test_graceful_stop_answers_the_request_in_flight_and_closes(tmp_path):
    repo = build_demo_repository(tmp_path / "repo")
    add_python_model(repo, "sleepy", SLEEPY_MODEL, {"max_batch_size": 1})
    with OipServer(repo) as served:
        sock = _connect(served)
        sock.sendall(_post(_sleepy(2.0), b"sleepy"))
        assert wait_until(lambda: served.call(_direct_cycles(served)) == 1)  # it runs
        served.loop.call_soon_threadsafe(lambda: served.loop.create_task(served.http.stop()))
        status, headers, _ = _Reader(sock).response()
        assert status == 200 and headers["connection"] == "close"
        assert closed_within(sock, 5)[0]
        sock.close()


def test_keep_alive_counts_from_the_last_reply(tmp_path):
    repo = build_demo_repository(tmp_path / "repo")
    with OipServer(repo, http_idle_timeout=2.0) as served:
        sock = _connect(served)
        reader = _Reader(sock)
        for _ in range(3):  # a reply every second: more than the timeout in all
            sock.sendall(_post())
            assert reader.response()[0] == 200
            time.sleep(1.0)
        closed, received = closed_within(sock, 10)  # then idle: closed, nothing sent
        assert closed and received == b""
        sock.close()


def test_a_connection_waiting_for_its_direct_reply_is_not_idle(tmp_path):
    """A direct request being answered (its body all read, its reply not written yet)
    keeps its connection busy: neither the idle timeout nor a new connection at the
    connection limit closes it."""
    repo = build_demo_repository(tmp_path / "repo")
    add_python_model(repo, "sleepy", SLEEPY_MODEL, {
        "max_batch_size": 1, "dynamic_batching": {"max_queue_delay_us": 0}})
    limits = HttpLimits(max_connections=1, idle_timeout=0.3)
    with OipServer(repo, http_limits=limits) as served:
        sock = _connect(served)
        reader = _Reader(sock)
        sock.sendall(_post(_sleepy(1.5), b"sleepy"))
        assert wait_until(lambda: served.call(_direct_cycles(served)) == 1)
        other = _connect(served)
        refusal = _Reader(other).head()
        assert refusal[0] == 503  # none idle: the waiting connection stays
        other.close()
        status, _, body = reader.response()  # answered, past the idle timeout
        assert status == 200 and abs(_output(body)[0] - 1.5) < 1e-6
        sock.close()


# -- requests whose head is read in one call (mip.protocol._h1.parse_head) ----------------

def _httptools_read(server, sock: socket.socket) -> bool:
    """Whether httptools' callbacks read a request of the connection of `sock` (uvicorn
    makes its list of the request's headers then)."""
    async def read() -> list[bool]:
        return [c.headers is not None for c in server.http.listener.connections
                if c.client == sock.getsockname()]
    found = server.call(read())
    assert len(found) == 1
    return found[0]


def test_a_plain_head_is_read_in_one_call_and_the_others_by_httptools(server):
    sock = _connect(server)
    reader = _Reader(sock)
    for _ in range(3):
        sock.sendall(_post(headers=b"x-request-id: plain\r\n"))
        status, headers, body = reader.response()
        assert status == 200 and _output(body) == X.ravel().tolist()
        assert headers["x-request-id"] == "plain"
    assert not _httptools_read(server, sock)
    sock.sendall(_post(headers=b"connection: close\r\n"))  # left to httptools
    assert reader.response()[0] == 200
    assert closed_within(sock, 5)[0]
    sock.close()


def test_heads_and_bodies_cut_anywhere_are_answered(server, good_client):
    """Pipelined requests cut at odd places over many reads (a head one octet at a time,
    a head and the start of its body, the end of a body and the next head)."""
    sock = _connect(server)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = _Reader(sock)
    request = _post(headers=b"content-type: application/json\r\n")
    head = request.index(b"\r\n\r\n") + 4
    stream = request * 4
    cuts = [1, 2, 3, head - 1, head, head + 1, len(request) - 1, len(request),
            len(request) + head, 2 * len(request) + 5, 3 * len(request), len(stream)]
    start = 0
    for cut in cuts:
        sock.sendall(stream[start:cut])
        start = cut
        time.sleep(0.02)
    for _ in range(4):
        status, _, body = reader.response()
        assert status == 200 and _output(body) == X.ravel().tolist()
    sock.close()


def test_pipelined_plain_requests_in_one_read_are_answered_in_order(server):
    sock = _connect(server)
    reader = _Reader(sock)
    bodies = [json.dumps({"id": str(i), "inputs": [{
        "name": "input", "shape": [1, 16], "datatype": "FP32",
        "data": [float(i)] * 16}]}).encode() for i in range(20)]
    sock.sendall(b"".join(_post(body) for body in bodies))
    for i in range(20):
        status, _, body = reader.response()
        assert status == 200 and json.loads(body)["id"] == str(i)
        assert _output(body) == [float(i)] * 16
    sock.close()


def test_a_content_length_shorter_than_the_body(server, good_client):
    """The octets past the declared length are the next request: here not HTTP (400,
    closed), as httptools answers them."""
    sock = _connect(server)
    reader = _Reader(sock)
    sock.sendall(_post(BODY + b"NOT HTTP\r\n\r\n", length=len(BODY)))
    status, _, body = reader.response()
    assert status == 200 and _output(body) == X.ravel().tolist()
    assert reader.head()[0] == 400
    assert closed_within(sock, 5)[0]
    sock.close()


def test_empty_oversize_and_huge_heads(server, good_client):
    sock = _connect(server)
    reader = _Reader(sock)
    sock.sendall(_post(b""))  # no body: refused, and the connection goes on
    status, _, body = reader.response()
    assert status == 400 and b"JSON" in body
    sock.sendall(_post(b"x" * 100, length=LIMIT + 1))  # refused before it is read
    status, _, body = reader.response()
    assert status == 413 and b"--http-max-body-size" in body
    # the rest of the declared body is read and dropped, then the next request answered
    sock.sendall(b"x" * (LIMIT + 1 - 100) + _post())
    status, _, body = reader.response()
    assert status == 200 and _output(body) == X.ravel().tolist()
    # a head longer than parse_head reads: httptools reads it as it reads any other
    sock.sendall(_post(headers=b"x-big: %s\r\n" % (b"v" * (64 << 10))))
    status, _, body = reader.response()
    assert status == 200 and _output(body) == X.ravel().tolist()
    sock.close()


def _raw_reply(reader: _Reader) -> bytes:
    """The next reply's octets, its Date header left out."""
    while b"\r\n\r\n" not in reader.buffer:
        reader._more()
    head, _, rest = reader.buffer.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(rest) < length:
        reader._more()
        head, _, rest = reader.buffer.partition(b"\r\n\r\n")
    reader.buffer = rest[length:]
    lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"date:")]
    return b"\r\n".join(lines) + b"\r\n\r\n" + rest[:length]


def test_replies_are_the_same_whichever_parser_reads_the_head(server):
    """A head parse_head reads, and the same head with a field it leaves to httptools
    (obs-text in a value): the same replies, octet for octet (but the Date)."""
    header = json.dumps({"id": "b", "inputs": [{
        "name": "input", "shape": [1, 16], "datatype": "FP32",
        "parameters": {"binary_data_size": 64}}], "outputs": [{
            "name": "output", "parameters": {"binary_data": True}}]}).encode()
    binary = (header + X.tobytes(), b"inference-header-content-length: %d\r\n"
              b"content-type: application/octet-stream\r\n" % len(header))
    cases = [(BODY, b"content-type: application/json\r\n"), binary,
             (b"{not json", b""), (BODY, b"x-request-id: r-2\r\n")]
    sock = _connect(server)
    reader = _Reader(sock)
    for body, headers in cases:
        sock.sendall(_post(body, headers=headers))
        plain = _raw_reply(reader)
        sock.sendall(_post(body, headers=headers + b"x-other: \xe9\r\n"))
        assert _raw_reply(reader) == plain
    assert _httptools_read(server, sock)
    sock.close()


def test_httpx_as_the_kserve_sdk_sends(server):
    import httpx

    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 64}}]}).encode()
    with httpx.Client(base_url=f"http://{server.http_url}") as client:
        for _ in range(2):
            reply = client.post("/v2/models/identity/infer", content=BODY,
                                headers={"content-type": "application/json"})
            assert reply.status_code == 200 and _output(reply.content) == X.ravel().tolist()
            reply = client.post("/v2/models/identity/infer", content=header + X.tobytes(),
                                headers={"inference-header-content-length": str(len(header))})
            assert reply.status_code == 200
            assert reply.json()["outputs"][0]["data"] == X.ravel().tolist()
