"""Hostile HTTP/2 peers against the native gRPC transport, served in its own process.

Each test runs one attack, scaled to finish in well under a minute, while a well-behaved
grpcio client calls the same server; the test asserts that client got every answer right
and that the server's RSS (/proc/PID/status) stayed within BOUND of what it was before
the attack. Timers are shortened through the GrpcLimits settings; every other limit is
the default.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

pytest.importorskip("mip.protocol._h2", reason="mip.protocol._h2 not built (no libnghttp2)")
pytest.importorskip("h2")

import grpc  # noqa: E402
from hyperframe.frame import GoAwayFrame, HeadersFrame, PingFrame, RstStreamFrame  # noqa: E402

import _grpc_echo as echo  # noqa: E402
from _wait import wait_until  # noqa: E402

BOUND = 100 << 20  # octets of RSS growth allowed
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ENHANCE_YOUR_CALM = 11

pytestmark = pytest.mark.slow


# -- raw frames ----------------------------------------------------------------------------

def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return (len(payload).to_bytes(3, "big") + bytes([kind, flags])
            + stream_id.to_bytes(4, "big") + payload)


def hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes, indexed: bool = False) -> bytes:
    """A literal header field with a new name (added to the dynamic table if ``indexed``)."""
    return (bytes([0x40 if indexed else 0x00]) + hpack_int(len(name), 7) + name
            + hpack_int(len(value), 7) + value)


def request(method: str = "Echo") -> bytes:
    """The header block of a call to ``method``: literals only, so any HPACK state takes it."""
    return b"".join(literal(n, v) for n, v in (
        (b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/test.Echo/%s" % method.encode()),
        (b":authority", b"127.0.0.1"), (b"content-type", b"application/grpc"),
        (b"te", b"trailers")))


REQUEST = request()
HEADERS, DATA, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = \
    1, 0, 3, 4, 6, 7, 8, 9
END_STREAM, END_HEADERS = 1, 4


def attacker(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
    return sock


def send(sock: socket.socket, data: bytes) -> bool:
    """Send; False once the server has closed the connection."""
    try:
        sock.sendall(data)
        return True
    except OSError:
        return False


def goaway_of(sock: socket.socket, timeout: float = 10.0):
    """The first GOAWAY the server sends on ``sock`` (None if it closes without one)."""
    frames = echo.read_frames(sock, lambda f: isinstance(f, GoAwayFrame), timeout=timeout)
    return next((f for f in frames if isinstance(f, GoAwayFrame)), None)


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """Whether the server closes ``sock`` within ``timeout`` (what it sends is read)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if not sock.recv(1 << 16):
                return True
        except socket.timeout:
            return False
        except OSError:
            return True
    return False


# -- the server and the well-behaved client -------------------------------------------------

class GoodClient:
    """A grpcio client calling Echo in a loop in a thread; counts right and wrong."""

    def __init__(self, address: str):
        self.address, self.ok, self.bad = address, 0, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = channel.unary_unary("/test.Echo/Echo")
            i = 0
            while not self.stop.is_set():
                payload = os.urandom(64) + b"%d" % i
                try:
                    reply = stub(payload, timeout=30)
                except grpc.RpcError as exc:
                    self.bad.append(f"{exc.code()}: {exc.details()}")
                else:
                    if reply == payload:
                        self.ok += 1
                    else:
                        self.bad.append("wrong reply")
                i += 1
                time.sleep(0.005)

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.bad, self.bad[:5]
        assert self.ok > 0


@pytest.fixture
def guarded():
    """``guarded(**limits)``: the server, a running GoodClient and the RSS before; at the
    end the client must have had 100 % right answers and RSS stayed within BOUND."""
    state = {}

    def start(**limits):
        server = echo.Process("native", **limits)
        client = GoodClient(server.address)
        state.update(server=server, client=client)
        assert wait_until(lambda: client.ok > 0 or client.bad, timeout=60), "no answer"
        state.update(before=server.settle_rss(0.5))
        return server

    yield start
    server, client = state["server"], state["client"]
    try:
        assert server.alive()
        after = server.rss()
        print(f"server RSS {state['before'] >> 20} MiB before, {after >> 20} MiB after")
        # served after the attack too: one more right answer
        answered = client.ok
        assert wait_until(lambda: client.ok > answered or client.bad, timeout=60)
        client.finish()
        assert after - state["before"] < BOUND, (state["before"], after)
    finally:
        server.close()


# -- the attacks ----------------------------------------------------------------------------

def hpack_bomb(address: str, streams: int, references: int) -> list:
    """One connection: a 4000-octet header put in the HPACK dynamic table, then referenced
    ``references`` times in each of ``streams`` request header blocks (each a few KiB on
    the wire, ``references`` x 4 KiB decoded). Returns the GOAWAYs received."""
    sock = attacker(address)
    big = literal(b"x-bomb", b"a" * 4000, indexed=True)
    refs = b"\xbe" * references  # dynamic-table entry 62, over and over
    goaways = []
    for i in range(streams):
        block = REQUEST + (big if i == 0 else b"") + refs
        if not send(sock, frame(HEADERS, END_HEADERS | END_STREAM, 2 * i + 1, block)):
            break
    goaway = goaway_of(sock)
    if goaway is not None:
        goaways.append(goaway)
    sock.close()
    return goaways


def test_hpack_bomb(guarded):
    server = guarded()
    for _ in range(20):
        goaways = hpack_bomb(server.address, streams=400, references=3000)
        assert [(g.error_code, g.additional_data) for g in goaways] == [
            (ENHANCE_YOUR_CALM, b"header_list_too_large")]
    # under four times the limit: every stream is answered RESOURCE_EXHAUSTED and the
    # connection goes on
    sock = attacker(server.address)
    big = literal(b"x-bomb", b"a" * 4000, indexed=True)
    frames = []
    for batch in range(4):  # 100 streams at a time, within max_concurrent_streams
        ids = range(200 * batch + 1, 200 * batch + 200, 2)
        send(sock, b"".join(frame(HEADERS, END_HEADERS | END_STREAM, i,
                                  REQUEST + (big if i == 1 else b"") + b"\xbe" * 10)
                            for i in ids))
        frames += echo.read_frames(sock, lambda f, last=ids[-1]: f.stream_id == last
                                   and "END_STREAM" in f.flags)
    sock.close()
    answered = [f for f in frames if isinstance(f, HeadersFrame)]
    assert len(answered) == 400 and not any(isinstance(f, GoAwayFrame) for f in frames)
    from hpack import Decoder

    decoder = Decoder()
    statuses = [dict(decoder.decode(f.data, raw=True)).get(b"grpc-status") for f in answered]
    assert statuses == [b"8"] * 400  # RESOURCE_EXHAUSTED


def resets(first: int, count: int) -> bytes:
    """``count`` streams from ``first`` on, each opened and reset at once."""
    return b"".join(frame(HEADERS, END_HEADERS, i, REQUEST)
                    + frame(RST_STREAM, 0, i, (8).to_bytes(4, "big"))
                    for i in range(first, first + 2 * count, 2))


FLOODS = {
    # Rapid Reset: streams opened and reset at once
    "too_many_resets": resets(1, 5000),
    "too_many_settings": frame(SETTINGS, 0, 0) * 20000,
    "too_many_pings": frame(PING, 0, 0, b"12345678") * 20000,
}


@pytest.mark.parametrize("reason", sorted(FLOODS))
def test_floods(guarded, reason):
    server = guarded()
    sock = attacker(server.address)
    send(sock, FLOODS[reason])
    goaway = goaway_of(sock)
    sock.close()
    assert goaway is not None and goaway.error_code == ENHANCE_YOUR_CALM
    assert goaway.additional_data == reason.encode()


def test_reset_limit_is_the_configured_one(guarded):
    """nghttp2 1.57 (or a backport) has a reset limiter of its own, a burst of 1000: it
    must not end the connection (GOAWAY INTERNAL_ERROR) before the configured limit."""
    server = guarded(reset_burst=3000, max_reset_rate=1)
    sock = attacker(server.address)
    send(sock, resets(1, 2000) + frame(PING, 0, 0, b"12345678"))
    frames = echo.read_frames(sock, lambda f: isinstance(f, (PingFrame, GoAwayFrame)), timeout=30)
    assert [type(f) for f in frames if isinstance(f, (PingFrame, GoAwayFrame))] == [PingFrame]
    # past the configured burst: ours, with its reason
    send(sock, resets(4001, 2000))
    goaway = goaway_of(sock)
    sock.close()
    assert goaway is not None and goaway.error_code == ENHANCE_YOUR_CALM
    assert goaway.additional_data == b"too_many_resets"


def test_continuation_flood(guarded):
    server = guarded()
    # header fields spread over endless CONTINUATION frames: the header list limit ends it
    sock = attacker(server.address)
    send(sock, frame(HEADERS, 0, 1, REQUEST))
    piece = frame(CONTINUATION, 0, 1, literal(b"x-more", b"b" * 1000))
    for _ in range(200):
        if not send(sock, piece * 10):
            break
    goaway = goaway_of(sock)
    sock.close()
    # GOAWAY ENHANCE_YOUR_CALM: header_list_too_large, or nghttp2's own CONTINUATION
    # limit where the installed library has one
    assert goaway is not None and goaway.error_code == ENHANCE_YOUR_CALM
    # empty CONTINUATION frames carry nothing to hold: bounded, whatever nghttp2 does
    sock = attacker(server.address)
    send(sock, frame(HEADERS, 0, 1, REQUEST))
    for _ in range(100):
        if not send(sock, frame(CONTINUATION, 0, 1) * 1000):
            break
    sock.close()


def test_window_overflow(guarded):
    server = guarded()
    # the connection's window over 2^31-1: a connection error
    sock = attacker(server.address)
    send(sock, frame(WINDOW_UPDATE, 0, 0, (0x7FFFFFFF).to_bytes(4, "big")) * 2)
    goaway = goaway_of(sock)
    sock.close()
    assert goaway is not None and goaway.error_code == 3  # FLOW_CONTROL_ERROR
    # a stream's window over it: that stream is reset
    sock = attacker(server.address)
    send(sock, frame(HEADERS, END_HEADERS, 1, REQUEST)
         + frame(WINDOW_UPDATE, 0, 1, (0x7FFFFFFF).to_bytes(4, "big")) * 2)
    frames = echo.read_frames(sock, lambda f: isinstance(f, RstStreamFrame), timeout=10)
    sock.close()
    assert [f.error_code for f in frames if isinstance(f, RstStreamFrame)] == [3]


def test_idle_connections_flood(guarded):
    server = guarded(idle_timeout=3)
    before = server.rss()
    socks = [attacker(server.address) for _ in range(400)]
    grown = server.settle_rss(1.0) - before
    # no receive buffer per connection: an idle one costs its nghttp2 session and a few
    # Python objects
    assert grown < 400 * (64 << 10), grown
    # the idle timeout closes every one (GOAWAY, then the close)
    assert all(closed_by_server(s, 15) for s in socks)
    for s in socks:
        s.close()


def test_slowloris(guarded):
    server = guarded(handshake_timeout=1.0)
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(200)]
    start = time.monotonic()
    closed = set()
    i = 0
    # the preface an octet at a time, for longer than the handshake timeout
    while time.monotonic() - start < 4 and len(closed) < len(socks):
        for n, s in enumerate(socks):
            if n not in closed and not send(s, PREFACE[i % len(PREFACE):][:1]):
                closed.add(n)
        i += 1
        time.sleep(0.1)
    for n, s in enumerate(socks):
        if n not in closed and closed_by_server(s, 5):
            closed.add(n)
        s.close()
    assert len(closed) == len(socks)


def test_clients_that_do_not_read_their_replies(guarded):
    import h2.config
    import h2.connection

    server = guarded()
    reply = 64 << 10
    hogs = []
    for _ in range(10):
        sock = socket.create_connection(("127.0.0.1", server.port))
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.update_settings({4: (1 << 31) - 1})  # windows wide open: only TCP pushes back
        conn.increment_flow_control_window((1 << 31) - 1 - 65535)
        sock.sendall(conn.data_to_send())
        sock.setblocking(False)
        hogs.append((sock, conn))
    pending = {id(sock): b"" for sock, _ in hogs}
    sent = 0
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        for sock, conn in hogs:
            try:
                for _ in range(20):
                    stream_id = conn.get_next_available_stream_id()
                    conn.send_headers(stream_id, [
                        (":method", "POST"), (":scheme", "http"), (":path", "/test.Echo/Big"),
                        (":authority", "x"), ("content-type", "application/grpc"),
                        ("te", "trailers")])
                    conn.send_data(stream_id, echo.message(b"%d" % reply), end_stream=True)
                    sent += 1
            except Exception:  # the server's stream limit or window: h2 will not send more
                pass
            out = pending[id(sock)] + conn.data_to_send()
            try:
                out = out[sock.send(out):]
            except BlockingIOError:
                pass
            pending[id(sock)] = out
        time.sleep(0.05)
    assert sent > 0
    for sock, _ in hogs:
        sock.close()


def test_max_connections_closes_the_longest_idle(guarded):
    server = guarded(max_connections=20)
    socks = []
    for _ in range(19):  # with the good client's, the listener is full
        socks.append(attacker(server.address))
        time.sleep(0.02)
    time.sleep(0.3)
    newcomer = attacker(server.address)
    # the first (longest idle) attacker makes room for it, with a GOAWAY that says why
    goaway = goaway_of(socks[0], timeout=5)
    assert goaway is not None and goaway.additional_data == b"max_connections"
    assert not closed_by_server(newcomer, 0.5)
    for s in socks + [newcomer]:
        s.close()


def test_unanswered_keepalive_pings_close_the_connection(guarded):
    server = guarded(keepalive_interval=0.3, keepalive_timeout=1.0)
    sock = attacker(server.address)
    # a call stays open (keepalive pings go out while calls are open); PINGs are not answered
    send(sock, frame(SETTINGS, 1, 0)
         + frame(HEADERS, END_HEADERS, 1, request("Slow"))
         + frame(DATA, END_STREAM, 1, echo.message(b"30")))
    frames = echo.read_frames(sock, lambda f: isinstance(f, GoAwayFrame), timeout=10)
    sock.close()
    goaways = [f for f in frames if isinstance(f, GoAwayFrame)]
    assert goaways and goaways[0].additional_data == b"keepalive_timeout"


def test_streaming_client_that_does_not_read(guarded):
    """One stream asking for 64 KiB replies, 2,000 times, and reading none of them: the
    handler stops producing once max_pending_reply octets wait."""
    server = guarded()
    sock = attacker(server.address)
    ask = echo.message(b"%d" % (64 << 10))
    send(sock, frame(SETTINGS, 0, 0, (4).to_bytes(2, "big") + (0x7FFFFFFF).to_bytes(4, "big"))
         + frame(WINDOW_UPDATE, 0, 0, (0x7FFFFFFF - 65535).to_bytes(4, "big"))
         + frame(HEADERS, END_HEADERS, 1, request("Fan")))
    sock.setblocking(False)
    pending = frame(DATA, 0, 1, ask * 100) * 20
    deadline = time.monotonic() + 10
    while pending and time.monotonic() < deadline:
        try:
            pending = pending[sock.send(pending):]
        except BlockingIOError:
            time.sleep(0.05)
    time.sleep(2)
    sock.close()
