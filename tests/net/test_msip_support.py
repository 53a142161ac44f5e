"""Shared helpers for the MSIP tests (no tests here).

``RefClient`` speaks the reference layout with ``struct`` only, straight from the spec, so
that byte-exact checks do not depend on our own codec.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time

HEADER = struct.Struct(">4sBBHHHIQ")  # magic, version, flags, frame_type, msg_kind, reserved, len, id
MAGIC = b"MSIP"
HELLO, SUBSCRIBE, UNSUBSCRIBE, PUBLISH, EVENT, ACK, ERROR, PING, PONG, CLOSE = range(1, 11)
K_EVENT, K_COMMAND, K_STATE, K_LOG, K_METRIC = range(1, 6)
ACK_REQUIRED, COMPRESSED, URGENT = 1, 2, 4
AT_LEAST_ONCE, PATTERNS, TAKEOVER = 8, 16, 32  # mip's extension bits (ignored by the reference)
CAP_AT_LEAST_ONCE, CAP_PATTERNS, CAP_TAKEOVER = 1, 2, 4  # after the client id in HELLO's ACK


def frame(frame_type, payload=b"", msg_id=0, flags=0, kind=K_EVENT, *, magic=MAGIC, version=1,
          reserved=0, length=None):
    """One frame in the reference layout; every header field can be set wrong on purpose."""
    n = len(payload) if length is None else length
    return HEADER.pack(magic, version, flags, frame_type, kind, reserved, n, msg_id) + payload


def publish_payload(topic: str, data: bytes) -> bytes:
    t = topic.encode()
    return struct.pack(">H", len(t)) + t + data


class RefClient:
    """A blocking reference-layout client over a plain socket (timeouts in seconds)."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 3.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, frame_type, payload=b"", msg_id=0, flags=0, kind=K_EVENT) -> None:
        self.sock.sendall(frame(frame_type, payload, msg_id, flags, kind))

    def _fill(self, n: int, deadline: float) -> bool:
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"waiting for {n} octets, have {len(self.buf)}")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                return False
            self.buf += chunk
        return True

    def recv_raw(self, timeout: float = 3.0) -> bytes | None:
        """The next whole frame as bytes (header + payload); None on EOF."""
        deadline = time.monotonic() + timeout
        if not self._fill(24, deadline):
            return None
        n = struct.unpack_from(">I", self.buf, 12)[0]
        if not self._fill(24 + n, deadline):
            return None
        raw = bytes(self.buf[:24 + n])
        del self.buf[:24 + n]
        return raw

    def recv(self, timeout: float = 3.0):
        """(header fields dict, payload) of the next frame; None on EOF."""
        raw = self.recv_raw(timeout)
        if raw is None:
            return None
        magic, version, flags, ft, kind, reserved, n, msg_id = HEADER.unpack_from(raw)
        return ({"magic": magic, "version": version, "flags": flags, "type": ft, "kind": kind,
                 "reserved": reserved, "len": n, "msg_id": msg_id}, raw[24:])

    def recv_until(self, frame_type, timeout: float = 3.0, limit: int = 100_000):
        for _ in range(limit):
            got = self.recv(timeout)
            if got is None or got[0]["type"] == frame_type:
                return got
        raise AssertionError("frame not seen")

    def hello(self, client_id: int | None = None, token: bytes = b"", msg_id=1, flags=0) -> int:
        """HELLO; ``flags=ACK_REQUIRED`` asks for an at-least-once session. Returns the client
        id; the capabilities granted (None: not answered) are left in ``self.caps``."""
        payload = b"" if client_id is None and not token else struct.pack(">Q", client_id or 0) + token
        self.send(HELLO, payload, msg_id, flags)
        h, p = self.recv()
        assert h["type"] == ACK, (h, p)
        assert len(p) == (12 if flags & (ACK_REQUIRED | PATTERNS | TAKEOVER) else 8), p
        self.caps = struct.unpack(">I", p[8:])[0] if len(p) == 12 else None
        return struct.unpack(">Q", p[:8])[0]

    def subscribe(self, topic: str, msg_id=2, flags=ACK_REQUIRED) -> None:
        self.send(SUBSCRIBE, topic.encode(), msg_id, flags)
        if flags & ACK_REQUIRED:
            h, _ = self.recv_until(ACK)
            assert h["msg_id"] == msg_id

    def expect_eof(self, timeout: float = 3.0) -> list:
        """Read until the broker closes; returns the frames seen before EOF."""
        seen = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                got = self.recv(max(0.01, deadline - time.monotonic()))
            except (ConnectionResetError, BrokenPipeError):
                return seen
            if got is None:
                return seen
            seen.append(got)
        raise AssertionError(f"connection still open; frames seen: {seen}")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class BrokerThread:
    """A broker running on its own event loop in a daemon thread (tests use blocking clients)."""

    def __init__(self, **options):
        from mip.net.msip_broker import Broker

        self.loop = asyncio.new_event_loop()
        self.broker = Broker(**options)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = self.call(self.broker.start("tcp://127.0.0.1:0")).port

    def call(self, coro_or_fn, timeout: float = 10.0):
        if asyncio.iscoroutine(coro_or_fn):
            return asyncio.run_coroutine_threadsafe(coro_or_fn, self.loop).result(timeout)

        async def run():
            return coro_or_fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def stop(self) -> None:
        try:
            self.call(self.broker.stop(grace=2.0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def shrink_send_buffers(bt: BrokerThread, client: RefClient, size: int = 8192) -> None:
    """Make the kernel send buffer of the broker's socket to ``client`` small, so that a
    subscriber that does not read fills it quickly and the broker's own queue takes over."""
    local = client.sock.getsockname()

    def shrink():
        for conn in bt.broker._conns:
            if conn.peer != local:
                continue
            sock = conn.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)

    bt.call(shrink)


def wait_for(predicate, timeout: float = 3.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
