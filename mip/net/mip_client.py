"""MIP clients: blocking ``Client`` with a connection pool, and pipelining ``AsyncClient``.

Both send headers and tensor memory as one scatter-gather write (no copy of
large tensors) and decode replies with tensors as numpy views of the memory
the socket wrote.  A named model travels as a routed request (kind 3);
``model=None`` sends a plain KubeMo request (kind 2) to the server's default
model.  An ERROR reply raises ``mip.RemoteError`` carrying its code.

Several servers: both clients take a URL, or a list of URLs, whose host names may each
resolve to several addresses (a Kubernetes headless Service, a DNS round robin). Requests go
to the addresses in turn; an address that refuses a connection (or whose connection fails) is
skipped for a second while the request goes to the next one. Names are looked up again every
``resolve_every`` seconds and after such a failure, so replicas that come and go are followed.
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
from typing import Any, Sequence

import mip
from mip.errors import ProtocolError, RemoteError
from mip.net.framing import FramedProtocol
from mip.net.urls import Address, TcpAddress, UnixAddress, parse_url

__all__ = ["Client", "AsyncClient"]

#: seconds an address that failed is skipped (unless every address has failed)
_SKIP_FAILED = 1.0


class _Balancer:
    """The addresses a client takes in turn: every address each TCP URL's host resolves to
    (in the resolver's order, duplicates dropped) and the unix URLs as given. Names are
    looked up again once the last look-up is ``resolve_every`` seconds old, or after a
    connection failed; a failed address goes last for :data:`_SKIP_FAILED` seconds."""

    def __init__(self, urls: str | Sequence[str], resolve_every: float):
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ValueError("no server URL")
        self.urls = [parse_url(url) for url in urls]  # fail early on a bad URL
        self.resolve_every = resolve_every
        #: (address to connect to, host name for TLS) pairs
        self.addresses: list[tuple[Address, str | None]] = []
        self._expires = 0.0
        self._turn = 0
        self._failed: dict[Address, float] = {}
        #: addresses the last look-up no longer gave (their idle connections are closed)
        self.removed: set[Address] = set()

    def stale(self) -> bool:
        return time.monotonic() >= self._expires

    def lookups(self) -> list[tuple[Address, tuple[str, int] | None]]:
        """``(url, (host, port) to look up)`` for each URL; ``None`` for a unix URL."""
        return [(url, (url.host, url.port) if isinstance(url, TcpAddress) else None)
                for url in self.urls]

    def update(self, results: list) -> None:
        """Take the look-ups' results (a getaddrinfo list, or the exception it raised, per
        URL). A URL whose look-up failed keeps its former addresses; when no URL has any,
        the first failure is raised."""
        found: list[tuple[Address, str | None]] = []
        errors = []
        for url, result in zip(self.urls, results):
            if isinstance(url, UnixAddress):
                found.append((url, None))
            elif isinstance(result, BaseException):
                errors.append(result)
                found += [pair for pair in self.addresses if pair[1] == url.host]
            else:
                for *_, sockaddr in result:
                    pair: tuple[Address, str | None] = (
                        TcpAddress(sockaddr[0], sockaddr[1]), url.host)
                    if pair not in found:
                        found.append(pair)
        if not found:
            raise errors[0]
        current = {address for address, _ in found}
        self.removed = {address for address, _ in self.addresses} - current
        self._failed = {a: t for a, t in self._failed.items() if a in current}
        self.addresses = found
        self._expires = time.monotonic() + self.resolve_every

    def order(self) -> list[tuple[Address, str | None]]:
        """Every address, from the next one in turn on; those that failed lately last."""
        n = len(self.addresses)
        if n == 1:
            return self.addresses
        start, self._turn = self._turn % n, self._turn + 1
        turn = self.addresses[start:] + self.addresses[:start]
        now = time.monotonic()
        return ([pair for pair in turn if self._failed.get(pair[0], 0.0) <= now]
                + [pair for pair in turn if self._failed.get(pair[0], 0.0) > now])

    def failed(self, address: Address) -> None:
        self._failed[address] = time.monotonic() + _SKIP_FAILED
        self._expires = 0.0  # look the names up again: the servers may have moved

    def several(self) -> bool:
        return len(self.addresses) > 1


def _resolve(balancer: _Balancer) -> None:
    """Look ``balancer``'s names up (blocking) when they are stale."""
    if not balancer.stale():
        return
    results: list[Any] = []  # per URL: getaddrinfo's list, the OSError it raised, or None
    for _, args in balancer.lookups():
        try:
            results.append(socket.getaddrinfo(*args, type=socket.SOCK_STREAM) if args else None)
        except OSError as exc:
            results.append(exc)
    balancer.update(results)


def _connect(url: str | Address, timeout: float | None, ssl: _ssl.SSLContext | None,
             server_hostname: str | None) -> socket.socket:
    addr = parse_url(url) if isinstance(url, str) else url
    host = None
    if isinstance(addr, UnixAddress):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(addr.path)
    else:
        host = addr.host
        sock = socket.create_connection((host, addr.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if ssl is not None:
        sock = ssl.wrap_socket(sock, server_hostname=server_hostname or host)
    return sock


MIP_HEADER = 8


class _ClosedBeforeReply(ConnectionError):
    """The connection ended before the first octet of a reply."""


def _reply(message: mip.Message) -> mip.Message:
    if message.kind == mip.KIND_ERROR:
        assert message.error_code is not None  # an ERROR frame's subtype
        raise RemoteError(message.error_code, message.error_message)
    if not message.is_response:
        raise ProtocolError("the peer sent a request where a response was expected")
    return message


class _BlockingConnection:
    def __init__(self, sock: socket.socket, max_frame_size: int, address: Address):
        self.sock = sock
        self.address = address
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


def _close_idle(pool: queue.Queue) -> None:
    while True:
        try:
            pool.get_nowait().close()
        except queue.Empty:
            return


class Client:
    """A blocking MIP client with a pool of persistent connections (thread-safe).

    Args:
        url: ``tcp://HOST:PORT`` or ``unix:///PATH``, or a list of them: requests go to
            every address of every URL in turn (see the module's documentation).
        pool_size: connections kept open for reuse, per address.
        timeout: seconds to wait on connect and on each socket operation (None = forever).
        max_frame_size: largest reply accepted, in octets.
        ssl: an ``ssl.SSLContext`` for TLS.
        server_hostname: the name TLS checks (default: the URL's host).
        resolve_every: seconds between look-ups of the URLs' host names.
        retry: send a request once more when its connection ends before any octet of its
            reply arrived (below); ``False`` raises ``ConnectionError`` instead.

    A request whose connection ends before any octet of its reply arrived is sent once more
    on a new connection: when the connection came from the pool (the server closed it while
    idle), or when there are several addresses (to the next one in turn). A server that died
    after running the request but before replying then runs it twice: harmless for a model
    without side effects; give ``retry=False`` for one with them.
    """

    def __init__(self, url: str | Sequence[str], *, pool_size: int = 4,
                 timeout: float | None = 30.0, max_frame_size: int = 1 << 30,
                 ssl: _ssl.SSLContext | None = None, server_hostname: str | None = None,
                 resolve_every: float = 30.0, retry: bool = True):
        self._balancer = _Balancer(url, resolve_every)
        self.retry = retry
        self.url = url
        self.timeout = timeout
        self.max_frame_size = max_frame_size
        self.ssl = ssl
        self.server_hostname = server_hostname
        self.pool_size = pool_size
        self._idle: dict[Address, queue.LifoQueue[_BlockingConnection]] = {}
        self._closed = False
        self._lock = threading.Lock()

    def _order(self) -> list[tuple[Address, str | None]]:
        with self._lock:
            _resolve(self._balancer)
            gone = [self._idle.pop(a) for a in self._balancer.removed if a in self._idle]
            self._balancer.removed = set()
            order = self._balancer.order()
        for pool in gone:
            _close_idle(pool)
        return order

    def _pool(self, address: Address) -> queue.LifoQueue:
        pool = self._idle.get(address)
        if pool is None:
            with self._lock:
                pool = self._idle.setdefault(address, queue.LifoQueue(maxsize=self.pool_size))
        return pool

    def _acquire(self, fresh: bool = False) -> tuple[_BlockingConnection, bool]:
        """A connection to the next address in turn (past those that refuse one), and
        whether it was reused from the pool; ``fresh``: a new connection."""
        error: OSError | None = None
        for address, name in self._order():
            pool = self._pool(address)
            while not fresh:
                try:
                    conn = pool.get_nowait()
                except queue.Empty:
                    break
                if not conn.dropped():
                    return conn, True
                conn.close()
            try:
                sock = _connect(address, self.timeout, self.ssl, self.server_hostname or name)
            except OSError as exc:
                error = exc
                with self._lock:
                    self._balancer.failed(address)
                continue
            return _BlockingConnection(sock, self.max_frame_size, address), False
        raise error or ConnectionError("no address to connect to")

    def _release(self, conn: _BlockingConnection) -> None:
        if self._closed:
            conn.close()
            return
        try:
            self._pool(conn.address).put_nowait(conn)
        except queue.Full:
            conn.close()

    def _call(self, buffers: Sequence) -> mip.Message:
        conn, reused = self._acquire()
        try:
            message = conn.roundtrip(buffers)
        except (ConnectionResetError, BrokenPipeError, _ClosedBeforeReply):
            conn.close()
            if not self.retry or not (reused or self._balancer.several()):
                raise
            # A pooled connection the server closed just before we used it (KubeMo's
            # server closes after every reply), or a server that went away: no reply came.
            if not reused:
                with self._lock:
                    self._balancer.failed(conn.address)
            conn, _ = self._acquire(fresh=True)
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
        with self._lock:
            pools = list(self._idle.values())
        for pool in pools:
            _close_idle(pool)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _AsyncConnection(FramedProtocol["mip.Message"]):
    def __init__(self, max_frame_size: int, address: Address):
        self.address = address
        self.parser = mip.FrameParser(max_frame_size=max_frame_size)
        self.waiters: collections.deque[asyncio.Future] = collections.deque()
        self.lost: BaseException | None = None
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.replies = 0            # complete replies received
        self.received = 0           # octets received since the last complete reply
        self.closed_after_reply = False  # the server ended it cleanly after replying
        self.closed_here = False    # this side closed it: nothing is sent again

    def frames_received(self, messages, nbytes):
        self.received = 0 if messages else self.received + nbytes
        for message in messages:
            if not self.waiters:
                raise ProtocolError("the server sent a reply nobody asked for")
            self.replies += 1
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(message)

    def bad_frames(self, exc):
        self._fail(exc)
        self.transport.close()

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
    on a new connection (with several addresses, to the next one in turn); ``retry=False``
    raises ``ConnectionError`` instead (a server that died after running the request but
    before replying would run it twice). A server seen to close connections after replying
    (KubeMo's server closes after every reply) gets one connection per request from then on,
    never a pipeline.

    Args:
        url: ``tcp://HOST:PORT`` or ``unix:///PATH``, or a list of them: requests go to
            every address of every URL in turn (see the module's documentation).
        connections: connections opened lazily and used round-robin, per address.
        timeout: seconds to wait for each reply (None = forever).
        max_frame_size: largest reply accepted, in octets.
        ssl: an ``ssl.SSLContext`` for TLS.
        server_hostname: the name TLS checks (default: the URL's host).
        resolve_every: seconds between look-ups of the URLs' host names.
        retry: send a request once more when its connection ends before any octet of its
            reply arrived.
    """

    def __init__(self, url: str | Sequence[str], *, connections: int = 1,
                 timeout: float | None = 30.0, max_frame_size: int = 1 << 30,
                 ssl: _ssl.SSLContext | None = None, server_hostname: str | None = None,
                 resolve_every: float = 30.0, retry: bool = True):
        self._balancer = _Balancer(url, resolve_every)
        self.address = self._balancer.urls[0]
        self.timeout = timeout
        self.max_frame_size = max_frame_size
        self.ssl = ssl
        self.server_hostname = server_hostname
        self.connections = max(1, connections)
        self.retry = retry
        #: per address: its connections (None: not opened yet) and the next one's index
        self._conns: dict[Address, list[_AsyncConnection | None]] = {}
        self._next: dict[Address, int] = {}
        self._connect_lock = asyncio.Lock()
        self._one_shot = False  # one request per connection: the server closes after replies

    async def _order(self) -> list[tuple[Address, str | None]]:
        balancer = self._balancer
        if balancer.stale():
            loop = asyncio.get_running_loop()
            results = await asyncio.gather(
                *(loop.getaddrinfo(*args, type=socket.SOCK_STREAM)
                  for _, args in balancer.lookups() if args),
                return_exceptions=True)
            found = iter(results)
            balancer.update([next(found) if args else None
                             for _, args in balancer.lookups()])
            for address in balancer.removed:
                self._next.pop(address, None)
                for conn in self._conns.pop(address, ()):
                    if conn is not None and conn.transport is not None and not conn.waiters:
                        conn.closed_here = True
                        conn.transport.close()
            balancer.removed = set()
        return balancer.order()

    async def _open(self, address: Address, name: str | None) -> _AsyncConnection:
        loop = asyncio.get_running_loop()
        factory = lambda: _AsyncConnection(self.max_frame_size, address)  # noqa: E731
        if isinstance(address, UnixAddress):
            _, conn = await loop.create_unix_connection(
                factory, address.path, ssl=self.ssl,
                server_hostname=self.server_hostname if self.ssl else None)
        else:
            hostname = (self.server_hostname or name or address.host) if self.ssl else None
            _, conn = await loop.create_connection(
                factory, address.host, address.port, ssl=self.ssl, server_hostname=hostname)
        return conn

    async def _connection(self) -> _AsyncConnection:
        """A connection to the next address in turn, past those that refuse one: one of
        its pipelines, or a new connection of its own (one request a connection)."""
        error: OSError | None = None
        for address, name in await self._order():
            try:
                if self._one_shot:
                    return await self._open(address, name)
                slots = self._conns.setdefault(address, [None] * self.connections)
                i = self._next.get(address, 0)
                self._next[address] = (i + 1) % len(slots)
                conn = slots[i]
                if conn is not None and conn.lost is None:
                    return conn
                async with self._connect_lock:
                    conn = slots[i]
                    if conn is not None and conn.lost is None:
                        return conn
                    if conn is not None and conn.closed_after_reply:
                        self._one_shot = True
                    conn = await self._open(address, name)
                    if not self._one_shot:
                        slots[i] = conn
                    return conn
            except OSError as exc:
                error = exc
                self._balancer.failed(address)
        raise error or ConnectionError("no address to connect to")

    async def _call(self, buffers: Sequence) -> mip.Message:
        retried = False
        while True:
            conn = await self._connection()
            try:
                return _reply(await self._roundtrip(conn, buffers))
            except _ClosedBeforeReply as exc:
                if conn.closed_after_reply:
                    self._one_shot = True
                elif self._balancer.several():
                    self._balancer.failed(conn.address)
                if retried or not self.retry:
                    raise ConnectionError(
                        f"the server closed the connection before replying: {exc}") from exc
                retried = True
            finally:
                if self._one_shot and conn.transport is not None:
                    conn.transport.close()

    async def _roundtrip(self, conn: _AsyncConnection, buffers: Sequence) -> mip.Message:
        if not conn.can_write.is_set():
            await conn.can_write.wait()
        transport = conn.transport
        if conn.lost is not None or transport is None:
            raise _ClosedBeforeReply(f"connection lost: {conn.lost}")
        fut = asyncio.get_running_loop().create_future()
        conn.waiters.append(fut)
        transport.writelines(buffers)
        try:
            return await asyncio.wait_for(fut, self.timeout) if self.timeout else await fut
        except asyncio.TimeoutError:
            # The stream is now out of step with its waiters: drop the connection.
            _reset(transport)
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
        for slots in self._conns.values():
            for conn in slots:
                if conn is not None and conn.transport is not None:
                    conn.closed_here = True
                    if conn.waiters:
                        _reset(conn.transport)
                    else:
                        conn.transport.close()
        self._conns = {}

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
