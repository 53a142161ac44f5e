"""MIP clients: blocking ``Client`` with a connection pool, and pipelining ``AsyncClient``.

Both send headers and tensor memory as one scatter-gather write (no copy of
large tensors) and decode replies with tensors as numpy views of the memory
the socket wrote.  A named model travels as a routed request (kind 3);
``model=None`` sends a plain KubeMo request (kind 2) to the server's default
model.  An ERROR reply raises ``mip.RemoteError`` carrying its code.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import queue
import select
import socket
import ssl as _ssl
import struct
import threading
import time
from typing import Sequence

import mip
from mip.errors import ProtocolError, RemoteError
from mip.net.urls import parse_url

__all__ = ["Client", "AsyncClient"]


def _connect(url: str, timeout: float | None, ssl: _ssl.SSLContext | None,
             server_hostname: str | None) -> socket.socket:
    addr = parse_url(url)
    if addr.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(addr.path)
    else:
        sock = socket.create_connection((addr.host, addr.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if ssl is not None:
        sock = ssl.wrap_socket(sock, server_hostname=server_hostname or addr.host)
    return sock


MIP_HEADER = 8


class _ClosedBeforeReply(ConnectionError):
    """The connection ended before the first octet of a reply."""


def _reply(message: mip.Message) -> mip.Message:
    if message.kind == mip.KIND_ERROR:
        raise RemoteError(message.error_code, message.error_message)
    if not message.is_response:
        raise ProtocolError("the peer sent a request where a response was expected")
    return message


class _BlockingConnection:
    def __init__(self, sock: socket.socket, max_frame_size: int):
        self.sock = sock
        self.max_frame_size = max_frame_size
        self.header = bytearray(8)

    def _recv_exactly(self, view: memoryview, first: bool = False) -> None:
        while view:
            n = self.sock.recv_into(view)
            if n == 0:
                if first and len(view) == MIP_HEADER:
                    raise _ClosedBeforeReply("the server closed the connection before replying")
                raise ConnectionError("the server closed the connection")
            view = view[n:]
            first = False

    def roundtrip(self, buffers: Sequence) -> mip.Message:
        if isinstance(self.sock, _ssl.SSLSocket):
            self.sock.sendall(b"".join(buffers))
        else:
            _sendall_buffers(self.sock, buffers)
        self._recv_exactly(memoryview(self.header), first=True)
        remaining = int.from_bytes(self.header[4:8], "big")
        total = remaining + 8
        if total > self.max_frame_size:
            raise mip.FrameTooLarge(f"reply of {total} octets exceeds max_frame_size="
                                    f"{self.max_frame_size}", 4)
        frame = bytearray(total)  # its own memory: the reply's tensors are views of it
        frame[:8] = self.header
        self._recv_exactly(memoryview(frame)[8:])
        return mip.decode(frame)

    def dropped(self) -> bool:
        """Whether an idle pooled connection was closed by the server (or sent garbage).

        KubeMo's server closes after each reply: such a connection is readable
        (EOF) before any new request, and must not be reused.
        """
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _sendall_buffers(sock: socket.socket, buffers: Sequence) -> None:
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    while views:
        sent = sock.sendmsg(views[:512])  # IOV_MAX is 1024 on Linux
        while sent:
            first = views[0]
            if sent >= len(first):
                sent -= len(first)
                views.pop(0)
            else:
                views[0] = first[sent:]
                sent = 0


class Client:
    """A blocking MIP client with a pool of persistent connections (thread-safe).

    Args:
        url: ``tcp://HOST:PORT`` or ``unix:///PATH``.
        pool_size: connections kept open for reuse.
        timeout: seconds to wait on connect and on each socket operation (None = forever).
        max_frame_size: largest reply accepted, in octets.
        ssl: an ``ssl.SSLContext`` for TLS.
    """

    def __init__(self, url: str, *, pool_size: int = 4, timeout: float | None = 30.0,
                 max_frame_size: int = 1 << 30, ssl: _ssl.SSLContext | None = None,
                 server_hostname: str | None = None):
        parse_url(url)  # fail early on a bad URL
        self.url = url
        self.timeout = timeout
        self.max_frame_size = max_frame_size
        self.ssl = ssl
        self.server_hostname = server_hostname
        self._idle: queue.LifoQueue[_BlockingConnection] = queue.LifoQueue(maxsize=pool_size)
        self._closed = False
        self._lock = threading.Lock()

    def _acquire(self) -> tuple[_BlockingConnection, bool]:
        """A connection, and whether it was reused from the pool."""
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                return self._acquire_new()
            if not conn.dropped():
                return conn, True
            conn.close()


    def _acquire_new(self) -> tuple[_BlockingConnection, bool]:
        sock = _connect(self.url, self.timeout, self.ssl, self.server_hostname)
        return _BlockingConnection(sock, self.max_frame_size), False

    def _release(self, conn: _BlockingConnection) -> None:
        if self._closed:
            conn.close()
            return
        try:
            self._idle.put_nowait(conn)
        except queue.Full:
            conn.close()

    def _call(self, buffers: Sequence) -> mip.Message:
        conn, reused = self._acquire()
        try:
            message = conn.roundtrip(buffers)
        except (ConnectionResetError, BrokenPipeError, _ClosedBeforeReply):
            conn.close()
            if not reused:
                raise
            # A pooled connection the server closed just before we used it (KubeMo's
            # server closes after every reply): the server never read the request.
            conn, _ = self._acquire_new()
            try:
                message = conn.roundtrip(buffers)
            except BaseException:
                conn.close()
                raise
        except BaseException:
            conn.close()  # its stream state is unknown
            raise
        if message.kind == mip.KIND_ERROR:
            # Servers close the connection after a protocol error: do not reuse it.
            conn.close()
        else:
            self._release(conn)
        return _reply(message)

    def ping(self) -> float:
        """Send a PING; return the round trip in seconds."""
        start = time.perf_counter()
        self._call([mip.encode_ping()])
        return time.perf_counter() - start

    def infer(self, batch, model: str | None = None, version: str | None = None) -> list[tuple]:
        """Run `batch` (items of values) on `model`; return the reply's items."""
        return self.infer_message(batch, model, version).batch

    def infer_message(self, batch, model: str | None = None, version: str | None = None) -> mip.Message:
        """Like :meth:`infer`, returning the whole reply ``Message``."""
        return self._call(mip.encode_request_buffers(batch, model=model, version=version))

    def close(self) -> None:
        """Close every pooled connection."""
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                break

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _AsyncConnection(asyncio.BufferedProtocol):
    def __init__(self, max_frame_size: int):
        self.parser = mip.FrameParser(max_frame_size=max_frame_size)
        self.waiters: collections.deque[asyncio.Future] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.replies = 0            # complete replies received
        self.received = 0           # octets received since the last complete reply
        self.closed_after_reply = False  # the server ended it cleanly after replying
        self.closed_here = False    # this side closed it: nothing is sent again

    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, sizehint):
        return self.parser.get_buffer(sizehint)

    def buffer_updated(self, nbytes):
        try:
            messages = self.parser.buffer_updated(nbytes)
        except ProtocolError as exc:
            self._fail(exc)
            self.transport.close()
            return
        self.received = 0 if messages else self.received + nbytes
        for message in messages:
            if not self.waiters:
                self._fail(ProtocolError("the server sent a reply nobody asked for"))
                self.transport.close()
                return
            self.replies += 1
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(message)

    def pause_writing(self):
        self.can_write.clear()

    def resume_writing(self):
        self.can_write.set()

    def connection_lost(self, exc):
        if self.closed_here:
            exc = ConnectionError("the client closed the connection")
        elif exc is None and self.replies:
            # as KubeMo's server does after every reply: it reads no further request
            self.closed_after_reply = True
        self._fail(exc or ConnectionError("the server closed the connection"))
        self.can_write.set()

    def _fail(self, exc: BaseException) -> None:
        self.lost = exc
        first = True
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                if (isinstance(exc, ConnectionError) and not self.closed_here
                        and not (first and self.received)):
                    # no octet of this reply arrived: the request can go again elsewhere
                    fut.set_exception(_ClosedBeforeReply(str(exc)))
                else:
                    fut.set_exception(exc)
            first = False


def _reset(transport: asyncio.Transport) -> None:
    """Drop a connection whose replies are no longer wanted with a TCP reset: a server
    takes a plain close (FIN) for a half-close and still answers, a reset makes it drop
    the work in hand."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


_LINGER_RESET = struct.pack("ii", 1, 0)  # struct linger: on, 0 seconds: close sends a reset


class AsyncClient:
    """An asyncio MIP client pipelining requests over a few persistent connections.

    Requests are spread over `connections` connections; on each, replies come
    back in request order.  Use ``async with AsyncClient(url) as c`` or call
    :meth:`close`.

    A request whose connection ends before any octet of its reply arrived is sent once more
    on a new connection. A server seen to close connections after replying (KubeMo's server
    closes after every reply) gets one connection per request from then on, never a pipeline.

    Args:
        url: ``tcp://HOST:PORT`` or ``unix:///PATH``.
        connections: connections opened lazily and used round-robin.
        timeout: seconds to wait for each reply (None = forever).
        max_frame_size: largest reply accepted, in octets.
        ssl: an ``ssl.SSLContext`` for TLS.
    """

    def __init__(self, url: str, *, connections: int = 1, timeout: float | None = 30.0,
                 max_frame_size: int = 1 << 30, ssl: _ssl.SSLContext | None = None,
                 server_hostname: str | None = None):
        self.address = parse_url(url)
        self.timeout = timeout
        self.max_frame_size = max_frame_size
        self.ssl = ssl
        self.server_hostname = server_hostname
        self._conns: list[_AsyncConnection | None] = [None] * max(1, connections)
        self._next = 0
        self._connect_lock = asyncio.Lock()
        self._one_shot = False  # one request per connection: the server closes after replies

    async def _open(self) -> _AsyncConnection:
        loop = asyncio.get_running_loop()
        factory = lambda: _AsyncConnection(self.max_frame_size)  # noqa: E731
        addr = self.address
        if addr.scheme == "unix":
            _, conn = await loop.create_unix_connection(
                factory, addr.path, ssl=self.ssl,
                server_hostname=self.server_hostname if self.ssl else None)
        else:
            _, conn = await loop.create_connection(
                factory, addr.host, addr.port, ssl=self.ssl,
                server_hostname=(self.server_hostname or addr.host) if self.ssl else None)
        return conn

    async def _connection(self) -> _AsyncConnection:
        i = self._next
        self._next = (i + 1) % len(self._conns)
        conn = self._conns[i]
        if conn is not None and conn.lost is None:
            return conn
        async with self._connect_lock:
            conn = self._conns[i]
            if conn is not None and conn.lost is None:
                return conn
            if conn is not None and conn.closed_after_reply:
                self._one_shot = True
            conn = await self._open()
            if not self._one_shot:
                self._conns[i] = conn
            return conn

    async def _call(self, buffers: Sequence) -> mip.Message:
        retried = False
        while True:
            conn = await (self._open() if self._one_shot else self._connection())
            try:
                return _reply(await self._roundtrip(conn, buffers))
            except _ClosedBeforeReply as exc:
                if conn.closed_after_reply:
                    self._one_shot = True
                if retried:
                    raise ConnectionError(
                        f"the server closed the connection before replying: {exc}") from exc
                retried = True
            finally:
                if self._one_shot and conn.transport is not None:
                    conn.transport.close()

    async def _roundtrip(self, conn: _AsyncConnection, buffers: Sequence) -> mip.Message:
        if not conn.can_write.is_set():
            await conn.can_write.wait()
        if conn.lost is not None:
            raise _ClosedBeforeReply(f"connection lost: {conn.lost}")
        fut = asyncio.get_running_loop().create_future()
        conn.waiters.append(fut)
        conn.transport.writelines(buffers)
        try:
            return await asyncio.wait_for(fut, self.timeout) if self.timeout else await fut
        except asyncio.TimeoutError:
            # The stream is now out of step with its waiters: drop the connection.
            _reset(conn.transport)
            raise

    async def ping(self) -> float:
        """Send a PING; return the round trip in seconds."""
        start = time.perf_counter()
        await self._call([mip.encode_ping()])
        return time.perf_counter() - start

    async def infer(self, batch, model: str | None = None, version: str | None = None) -> list[tuple]:
        """Run `batch` (items of values) on `model`; return the reply's items."""
        return (await self.infer_message(batch, model, version)).batch

    async def infer_message(self, batch, model: str | None = None,
                            version: str | None = None) -> mip.Message:
        """Like :meth:`infer`, returning the whole reply ``Message``."""
        return await self._call(mip.encode_request_buffers(batch, model=model, version=version))

    async def close(self) -> None:
        """Close every connection; calls still waiting fail with ConnectionError."""
        for conn in self._conns:
            if conn is not None and conn.transport is not None:
                conn.closed_here = True
                if conn.waiters:
                    _reset(conn.transport)
                else:
                    conn.transport.close()
        self._conns = [None] * len(self._conns)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
