"""An asyncio MIP server: octets from the socket straight into the codec, frames to a handler.

The server knows nothing of models: a *handler* turns each decoded request into
the buffers of its reply (``mip.frontends.mip.MipHandler`` serves an engine).
Each connection receives through ``asyncio.BufferedProtocol`` into the
parser's own memory and sends replies with ``writelines`` (headers and tensor
memory, no copy).  A connection may pipeline: requests run concurrently and
replies leave in request order.  A KubeMo client (one request per connection,
then close) is served unchanged.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import ssl as _ssl
import stat
from typing import Awaitable, Callable, Protocol, Sequence

import mip
from mip.errors import ErrorCode, ProtocolError, ServingError
from mip.net.urls import Address, parse_url

__all__ = ["MipServer", "Handler"]

log = logging.getLogger("mip.net.server")

Buffers = Sequence["bytes | memoryview"]


class Handler(Protocol):
    """What a MIP server calls for each request frame.

    A handler may also have ``start(message) -> asyncio.Future`` of the same buffers; the
    server then uses it instead of running the coroutine as a task.
    """

    async def __call__(self, message: mip.Message) -> Buffers:
        """Return the reply as a list of buffers (e.g. from ``mip.encode_response_buffers``).

        Raise a ``ServingError`` to answer with its MIP error code.
        """


class _Connection(asyncio.BufferedProtocol):
    def __init__(self, server: "MipServer"):
        self.server = server
        self.parser = mip.FrameParser(max_frame_size=server.max_frame_size)
        self.transport: asyncio.Transport | None = None
        self.pending: collections.deque[asyncio.Future] = collections.deque()
        self.closing = False
        self.reading_paused = False
        self.writing_paused = False
        self.last_activity = 0.0
        self.discarding = False
        self.flush_scheduled = False
        self.loop = asyncio.get_running_loop()

    # -- asyncio.BaseProtocol -------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        self.last_activity = self.loop.time()
        server = self.server
        if len(server._connections) >= server.max_connections:
            log.warning("refusing a connection: max_connections=%d reached", server.max_connections)
            transport.write(mip.encode_error(ErrorCode.MEMORY))
            self.closing = True
            self._linger_close()
            return
        server._connections.add(self)

    def connection_lost(self, exc):
        self.closing = True
        self.server._connections.discard(self)
        for fut in self.pending:
            fut.cancel()  # the client is gone: drop its queued work
        self.pending.clear()

    def pause_writing(self):
        self.writing_paused = True
        self._pause_reading()

    def resume_writing(self):
        self.writing_paused = False
        self._maybe_resume_reading()

    # -- asyncio.BufferedProtocol -----------------------------------------------
    def get_buffer(self, sizehint):
        if self.discarding:
            return _DISCARD
        return self.parser.get_buffer(sizehint)

    def buffer_updated(self, nbytes):
        if self.discarding:
            return
        self.last_activity = self.loop.time()
        try:
            messages = self.parser.buffer_updated(nbytes)
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        for message in messages:
            if self.closing:
                break
            self._dispatch(message)

    def eof_received(self):
        # A peer that stops sending is taken as gone (as HTTP servers do): its
        # queued work is dropped in connection_lost and the socket closes.
        return False

    # -- internals ------------------------------------------------------------
    def _protocol_error(self, exc: ProtocolError) -> None:
        log.info("closing a connection after a protocol error: %s", exc)
        self.closing = True
        self._pause_reading()
        reply = mip.encode_error(exc.error_code)
        if self.pending:
            # Answer in order: the error goes after the replies still owed.
            # `closing` makes _flush close the transport once this is sent.
            fut = self.loop.create_future()
            fut.set_result([reply])
            self.pending.append(fut)
            self._flush()
        else:
            self.transport.write(reply)
            self._linger_close()

    def _linger_close(self) -> None:
        """Close after a refusal or an error reply without losing that reply.

        Closing a socket with unread octets makes the kernel send a reset, which
        can destroy the reply before the peer reads it.  So: stop sending, read
        and discard what still comes for a moment, then close.
        """
        transport = self.transport
        if transport is None or transport.is_closing() or self.discarding:
            return
        self.discarding = True
        if transport.can_write_eof():
            transport.write_eof()
        if self.reading_paused:
            self.reading_paused = False
            transport.resume_reading()
        self.loop.call_later(self.server.linger, transport.close)

    def _dispatch(self, message: mip.Message) -> None:
        if message.kind == mip.KIND_PING:
            if message.is_request:
                fut = self.loop.create_future()
                fut.set_result([mip.encode_pong()])
                self.pending.append(fut)
                self._flush()
                return
        if message.kind == mip.KIND_ERROR or not message.is_request:
            self._protocol_error(_NotARequest())
            return
        start = self.server.start_handler
        if start is not None:
            # The handler's callback form: no task a request.
            try:
                work = start(message)
            except Exception as exc:
                work = self.loop.create_future()
                work.set_exception(exc)
        else:
            work = self.loop.create_task(self.server.handler(message))
        self.pending.append(work)
        work.add_done_callback(self._on_done)
        if len(self.pending) >= self.server.max_pipeline:
            self._pause_reading()

    def _on_done(self, _fut) -> None:
        # Replies of one batch finish in the same loop turn: flush once after all of them.
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        transport = self.transport
        ready = []
        while self.pending and self.pending[0].done():
            fut = self.pending.popleft()
            if fut.cancelled():
                continue
            exc = fut.exception()
            if exc is None:
                ready.extend(fut.result())
            else:
                ready.append(_error_reply(exc))
        if ready and transport is not None and not transport.is_closing():
            # Every reply ready now leaves in one write: one system call for a whole
            # batch's worth of pipelined replies.
            transport.writelines(ready)
            self.last_activity = self.loop.time()
        if not self.pending and self.closing and transport is not None and not transport.is_closing():
            self._linger_close()
            return
        self._maybe_resume_reading()

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.transport.is_closing():
            self.reading_paused = True
            self.transport.pause_reading()

    def _maybe_resume_reading(self) -> None:
        if (self.reading_paused and not self.closing and not self.writing_paused
                and len(self.pending) < self.server.max_pipeline):
            self.reading_paused = False
            self.transport.resume_reading()

    def check_timeouts(self, now: float) -> None:
        """Close a connection that has been silent (idle) or stuck mid-frame (read) too long."""
        if self.closing or self.transport is None:
            return
        quiet = now - self.last_activity
        server = self.server
        if self.parser.buffered and server.read_timeout and quiet > server.read_timeout:
            log.info("closing a connection: no octets for %.1fs in the middle of a frame", quiet)
            self._protocol_error(_ReadTimeout())
        elif (not self.pending and not self.parser.buffered and server.idle_timeout
              and quiet > server.idle_timeout):
            log.debug("closing an idle connection after %.1fs", quiet)
            self.closing = True
            self.transport.close()


def _error_reply(exc: BaseException) -> bytes:
    """The ERROR frame that answers a request that failed with `exc`."""
    if isinstance(exc, (ServingError, ProtocolError)):
        log.debug("request failed: %s", exc)
        return mip.encode_error(exc.error_code)
    log.error("handler failed", exc_info=exc)
    return mip.encode_error(ErrorCode.INTERNAL)


_DISCARD = memoryview(bytearray(65536))  # where octets after an error are read and dropped


class _NotARequest(ProtocolError):
    error_code = ErrorCode.SUBTYPE

    def __init__(self):
        super().__init__("a server accepts only requests")


class _ReadTimeout(ProtocolError):
    error_code = ErrorCode.PROTOCOL

    def __init__(self):
        super().__init__("read timeout in the middle of a frame")


class MipServer:
    """Serve MIP on TCP or Unix-socket URLs.

    Args:
        handler: ``async (Message) -> list of buffers``; see :class:`Handler`.
        max_frame_size: largest request accepted, in octets (header included);
            a larger one is answered with ERROR/MEMORY and the connection closed.
        max_connections: connections served at once; more are answered with
            ERROR/MEMORY and closed.
        max_pipeline: requests in flight per connection before reading pauses.
        idle_timeout: seconds a connection may stay silent with nothing in
            flight before it is closed (0 = never).
        read_timeout: seconds a partly received frame may wait for its next
            octets before the connection is closed (0 = never).
        ssl: an ``ssl.SSLContext`` to serve TLS.
    """

    def __init__(self, handler: Callable[[mip.Message], Awaitable[Buffers]], *,
                 max_frame_size: int = 64 * 1024 * 1024, max_connections: int = 1024,
                 max_pipeline: int = 128, idle_timeout: float = 300.0, read_timeout: float = 30.0,
                 ssl: _ssl.SSLContext | None = None):
        self.handler = handler
        # A handler may also offer start(message) -> Future of the reply buffers, which
        # serves a request without a task of its own.
        self.start_handler = getattr(handler, "start", None)
        self.max_frame_size = max_frame_size
        self.max_connections = max_connections
        self.max_pipeline = max_pipeline
        self.idle_timeout = idle_timeout
        self.read_timeout = read_timeout
        self.ssl = ssl
        self.linger = 1.0  # seconds a refused or failed connection drains before closing
        self._servers: list[asyncio.AbstractServer] = []
        self._connections: set[_Connection] = set()
        self._sweeper: asyncio.Task | None = None
        self._unix_paths: list[str] = []
        self.addresses: list[Address] = []

    async def start(self, url: str) -> Address:
        """Listen on `url` (``tcp://HOST:PORT``, port 0 picks one, or ``unix:///PATH``).

        Returns the bound address.
        """
        loop = asyncio.get_running_loop()
        addr = parse_url(url)
        factory = lambda: _Connection(self)  # noqa: E731
        if addr.scheme == "unix":
            _remove_stale_socket(addr.path)
            server = await loop.create_unix_server(factory, addr.path, ssl=self.ssl, backlog=1024)
            self._unix_paths.append(addr.path)
            bound = addr
        else:
            server = await loop.create_server(factory, addr.host, addr.port, ssl=self.ssl,
                                              backlog=1024, reuse_address=True)
            host, port = server.sockets[0].getsockname()[:2]
            bound = Address("tcp", host=host, port=port)
        self._servers.append(server)
        self.addresses.append(bound)
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep())
        log.info("MIP listening on %s", bound)
        return bound

    async def _sweep(self) -> None:
        timeouts = [t for t in (self.idle_timeout, self.read_timeout) if t]
        if not timeouts:
            return
        interval = max(0.02, min(1.0, min(timeouts) / 4))
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for conn in list(self._connections):
                conn.check_timeouts(now)

    @property
    def connections(self) -> int:
        """Connections currently open."""
        return len(self._connections)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let in-flight requests finish (up to `grace` seconds), close."""
        for server in self._servers:
            server.close()
        pending = [f for c in self._connections for f in c.pending if not f.done()]
        if pending:
            await asyncio.wait(pending, timeout=grace)
        for conn in list(self._connections):
            conn.closing = True
            conn._flush()
            if conn.transport is not None:
                conn.transport.close()
        for server in self._servers:
            await server.wait_closed()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for path in self._unix_paths:
            _remove_stale_socket(path)
        self._servers.clear()


def _remove_stale_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def set_nodelay(sock: socket.socket) -> None:
    """Disable Nagle's algorithm on a TCP socket (small replies leave at once)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
