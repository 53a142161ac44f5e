"""Shared helpers for the MSIP tests (no tests here).

``RefClient`` speaks the reference layout with ``struct`` only, straight from the spec, so
that byte-exact checks do not depend on our own codec.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
import threading
import time

from _wait import wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 3.0,
                 source: str | None = None):
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
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


def run(coro, timeout: float = 10.0):
    """Run a coroutine on a fresh event loop, bounded in time."""
    async def bounded():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


class BrokerProcess:
    """``mip broker`` in a subprocess on a free loopback port (``args``: more flags); the
    first connection is made to know it listens. ``rss_kib()``: its resident memory."""

    def __init__(self, *args: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mip.cli", "--log-level", "WARNING", "broker", "--msip",
             f"tcp://127.0.0.1:{self.port}", *args], cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def connect(self, startup: float = 30.0) -> "RefClient":
        deadline = time.monotonic() + startup
        while True:
            try:
                return RefClient(self.port)
            except OSError:
                assert self.proc.poll() is None and time.monotonic() < deadline, \
                    "the broker did not start"
                time.sleep(0.05)

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(10)


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


def wait_for(predicate, timeout: float = 3.0) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass."""
    return wait_until(predicate, timeout)


class ReferenceBroker:
    """An asyncio stand-in for the reference broker (DoctorPok42/MIP), written from the spec
    and the observed behaviour (docs/msip.md): literal topics, subscriptions kept per client
    id (events for an id go to its first connection), SUBSCRIBE/UNSUBSCRIBE without
    ACK_REQUIRED and any ACK, PONG, ERROR or EVENT from a client answered with ERROR + close,
    EVENT always flagged COMPRESSED, no PING of its own, a bad header closes silently.
    ``errors`` lists the ERROR texts it sent."""

    UNSUPPORTED = b"Invalid frame or unsupported operation"

    def __init__(self):
        self.next_id = 1
        self.conns: dict[int, asyncio.StreamWriter] = {}  # client id -> first connection
        self.subs: dict[str, set[int]] = {}  # topic -> client ids
        self.errors: list[bytes] = []
        self.writers: set[asyncio.StreamWriter] = set()
        self.server = None
        self.port = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return f"tcp://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        self.server.close()
        for wr in list(self.writers):
            wr.transport.abort()
        await self.server.wait_closed()

    def drop_all(self) -> None:
        """Cut every connection (as a broker restart would, without forgetting anything)."""
        for wr in list(self.writers):
            wr.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        client_id = None
        try:
            while True:
                head = await reader.readexactly(24)
                magic, version, flags, ft, kind, _, n, msg_id = HEADER.unpack(head)
                if magic != MAGIC or version != 1 or not 1 <= ft <= 10 or not 1 <= kind <= 5:
                    return
                payload = await reader.readexactly(n)
                if ft == HELLO:
                    if len(payload) >= 8:
                        client_id = struct.unpack_from(">Q", payload)[0]
                    else:
                        client_id = self.next_id
                        self.next_id += 1
                    self.conns.setdefault(client_id, writer)
                    writer.write(frame(ACK, struct.pack(">Q", client_id), msg_id, 0, K_STATE))
                elif ft in (SUBSCRIBE, UNSUBSCRIBE) and flags & ACK_REQUIRED:
                    topic = payload.decode("utf-8")
                    if client_id is not None:
                        if ft == SUBSCRIBE:
                            self.subs.setdefault(topic, set()).add(client_id)
                        else:
                            self.subs.get(topic, set()).discard(client_id)
                    writer.write(frame(ACK, b"", msg_id, 0, K_STATE))
                elif ft == PUBLISH and len(payload) >= 2:
                    tlen = struct.unpack_from(">H", payload)[0]
                    topic = payload[2:2 + tlen].decode("utf-8")
                    event = frame(EVENT, payload, msg_id, COMPRESSED, K_EVENT)
                    for cid in self.subs.get(topic, ()):
                        target = self.conns.get(cid)
                        if target is not None and not target.is_closing():
                            target.write(event)
                    writer.write(frame(ACK, b"", msg_id, 0, K_STATE))
                elif ft == PING:
                    writer.write(frame(PONG, b"", msg_id, 0, K_EVENT))
                elif ft == CLOSE:
                    return
                else:
                    self.errors.append(self.UNSUPPORTED)
                    writer.write(frame(ERROR, self.UNSUPPORTED, 0, 0, K_EVENT))
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            self.writers.discard(writer)
            if client_id is not None and self.conns.get(client_id) is writer:
                del self.conns[client_id]
            writer.close()
