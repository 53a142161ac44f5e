"""An asyncio MIP server: octets from the socket straight into the codec, frames to a handler.

The server knows nothing of models: a *handler* turns each decoded request into
the buffers of its reply (``mip.frontends.mip_handler.MipHandler`` serves an engine).
Each connection receives through ``asyncio.BufferedProtocol`` into the
parser's own memory and sends replies with ``writelines`` (headers and tensor
memory, no copy).  A connection may pipeline: requests run concurrently and
replies leave in request order.  A KubeMo client (one request per connection,
then close) is served unchanged, and so is a client that half-closes after sending
(``shutdown(SHUT_WR)``, as ``nc -N`` and socat do): what it sent is answered, then the
connection closes.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import os
import socket
import ssl as _ssl
import stat
from typing import Any, Awaitable, Callable, Protocol, Sequence

import mip
from mip.errors import ErrorCode, ProtocolError, ServingError
from mip.net.peers import PeerCounts, longest_idle, sweep_timeouts
from mip.net.urls import Address, TcpAddress, UnixAddress, parse_url

__all__ = ["MipServer", "Handler", "StartHandler"]

log = logging.getLogger("mip.net.server")

Buffers = Sequence["bytes | memoryview"]
_INFERENCE, _REQUEST = mip.KIND_INFERENCE, mip.REQUEST  # (kinds 2 and 3 are inference)


class Handler(Protocol):
    """What a MIP server calls for each request frame.

    A handler may instead have ``start(message[, source]) -> asyncio.Future`` of the same
    buffers (:class:`StartHandler`); the server then uses it, no task a request.
    """

    async def __call__(self, message: mip.Message) -> Buffers:
        """Return the reply as a list of buffers (e.g. from ``mip.encode_response_buffers``).

        Raise a ``ServingError`` to answer with its MIP error code.
        """


class StartHandler(Protocol):
    """A handler's callback form: ``start(message, source)`` (``source``: the peer's
    address, for fair queueing) -> a future of the reply buffers.

    A ``start`` whose third parameter is named ``done`` is given a callable that it calls
    with the future, on the event loop, once the future is done (as a done-callback would
    be, without a pass of the loop a request): the server then adds no callback of its own.
    """

    def start(self, message: mip.Message, source: Any = None,
              done: Callable[[asyncio.Future], None] | None = None) -> asyncio.Future:
        """Start serving ``message``; errors found at once may be raised."""


class _Connection(asyncio.BufferedProtocol):
    def __init__(self, server: "MipServer"):
        self.server = server
        self.parser = mip.FrameParser(max_frame_size=server.max_frame_size)
        self.parser.frame_memory = server.frame_memory
        self.transport: asyncio.Transport | None = None
        self.pending: collections.deque[asyncio.Future] = collections.deque()
        # Request octets each pending request holds (read, not yet answered), in order.
        self.pending_octets: collections.deque[int] = collections.deque()
        self.backlog: collections.deque[mip.Message] = collections.deque()  # not started yet
        self.backlog_octets = 0  # request octets the backlog holds
        self.buffered_octets = 0  # all request octets held: pending and backlog
        self.closing = False
        self.eof = False  # the peer half-closed: answer what it sent, then close
        self.reading_paused = False
        self.writing_paused = False
        self.last_activity = 0.0
        self.frame_started: float | None = None  # when the first octet of a partial frame came
        self.discarding = False
        self.flush_scheduled = False
        self.peer: str | None = None
        self.source = None
        self.loop = asyncio.get_running_loop()
        # Read once, not a request: what _dispatch calls, and its done-callback (one
        # bound method for the connection's life).
        self.start = server.start_handler
        self.start_args = server.start_args
        self.max_pipeline = server.max_pipeline
        self.on_done = self._on_done

    # -- asyncio.BaseProtocol -------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        self.last_activity = self.loop.time()
        server = self.server
        peer = transport.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple) else None  # a Unix socket has no peer host
        refusal = server._admit(host)
        if refusal:
            log.warning("refusing a connection from %s: %s", host, refusal)
            transport.write(mip.encode_error(ErrorCode.MEMORY, refusal))
            self.closing = True
            self._linger_close()
            return
        transport.set_write_buffer_limits(high=server.max_pending_reply)
        self.peer = host
        # whose share of a model's queue: the peer's address, or for a unix socket's peer
        # a token of its own (not the connection, which would then refer to itself)
        self.source = object() if host is None else host
        server._connections.add(self)
        server._per_peer.add(host)

    def connection_lost(self, exc):
        self.closing = True
        self.server._forget(self)
        for fut in self.pending:
            if not fut.cancel():  # the client is gone: drop its queued work
                if not fut.cancelled():
                    fut.exception()  # answered, never to be sent: not an unseen error
        self.pending.clear()
        self.backlog.clear()
        self.pending_octets.clear()
        self.buffered_octets = 0
        self.on_done = _ignore  # (the bound method made a cycle: the connection is freed now)

    @property
    def idle(self) -> bool:
        """Nothing in flight and no frame started: closing it loses nothing."""
        return (not self.pending and not self.backlog and not self.parser.buffered
                and not self.closing)

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
        now = self.last_activity = self.loop.time()
        parser = self.parser
        before = parser.buffered
        try:
            messages = parser.buffer_updated(nbytes)
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        buffered = parser.buffered
        if messages:
            # The octets of the frames completed now are held until their replies are
            # written; the last request of the read carries them. Requests beyond
            # max_pipeline in flight wait, parsed, in the backlog (one read can bring
            # thousands): a connection never has more than that in the model queues.
            held = before + nbytes - buffered
            backlog, pending = self.backlog, self.pending
            limit = self.max_pipeline
            dispatch = self._dispatch
            for message in messages:
                if self.closing:
                    break
                if backlog or len(pending) >= limit:
                    backlog.append(message)
                else:
                    dispatch(message)
            if not self.closing:
                self.buffered_octets += held
                if backlog:
                    self.backlog_octets += held
                    self._pause_reading()
                elif self.pending:
                    self.pending_octets[-1] += held
                else:
                    self.buffered_octets -= held
                if self.buffered_octets >= self.server.max_buffered_octets:
                    self._pause_reading()
            # What is left over started arriving in this read.
            self.frame_started = now if buffered else None
        elif buffered and self.frame_started is None:
            self.frame_started = now

    def eof_received(self):
        # A half-close: the peer has sent all it will but may still read. The requests
        # read so far are answered in order, then _flush closes. With nothing owed (or
        # only part of a frame, which can no longer complete) the socket closes now.
        if not self.pending and not self.backlog:
            return False
        self.eof = True
        self.reading_paused = True  # nothing more can come: reading never resumes
        return True

    # -- internals ------------------------------------------------------------
    def _protocol_error(self, exc: ProtocolError) -> None:
        backlog = self.backlog
        while backlog and not self.closing:  # the requests before the error are answered
            self._dispatch(backlog.popleft())
        if self.closing:
            return
        log.info("closing a connection after a protocol error: %s", exc)
        self.closing = True
        self._pause_reading()
        reply = mip.encode_error(exc.error_code, str(exc))
        if self.pending:
            # Answer in order: the error goes after the replies still owed.
            # `closing` makes _flush close the transport once this is sent.
            fut = self.loop.create_future()
            fut.set_result([reply])
            self._append(fut)
            self._flush()
        else:
            assert self.transport is not None
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
        kind = message.kind
        if kind >= _INFERENCE and message.subtype == _REQUEST:
            start = self.start
            if start is not None:
                # The handler's callback form: no task a request.
                args = self.start_args
                try:
                    if args == 3:  # the handler calls on_done itself
                        work = start(message, self.source, self.on_done)
                    else:
                        work = start(message, self.source) if args == 2 else start(message)
                        work.add_done_callback(self.on_done)
                except Exception as exc:
                    work = self.loop.create_future()
                    work.set_exception(exc)
                    work.add_done_callback(self.on_done)
            else:
                handler = self.server.handler
                assert callable(handler)  # a handler without start is the coroutine form
                work = asyncio.ensure_future(handler(message), loop=self.loop)
                work.add_done_callback(self.on_done)
            self._append(work)
            if len(self.pending) >= self.max_pipeline:
                self._pause_reading()
            return
        if kind == mip.KIND_PING and message.is_request:
            fut = self.loop.create_future()
            fut.set_result([mip.encode_pong()])
            self._append(fut)
            self._flush()
            return
        self._protocol_error(_NotARequest())

    def _append(self, fut: asyncio.Future) -> None:
        self.pending.append(fut)
        self.pending_octets.append(0)

    def _on_done(self, _fut) -> None:
        # Replies of one batch finish in the same loop turn: flush once after all of them.
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        transport = self.transport
        ready: list = []
        pending, octets = self.pending, self.pending_octets
        freed = 0
        while pending and pending[0].done():
            fut = pending.popleft()
            freed += octets.popleft()
            try:  # (one call a reply, not three: cancelled, exception, result)
                ready += fut.result()
            except asyncio.CancelledError:
                continue
            except BaseException as exc:  # (the request's failure, as the future holds it)
                ready.append(_error_reply(exc))
        self.buffered_octets -= freed
        if ready and transport is not None and not transport.is_closing():
            # Every reply ready now leaves in one write: one system call for a whole
            # batch's worth of pipelined replies.
            transport.writelines(ready)
            self.last_activity = self.loop.time()
        if self.backlog and not self.closing:
            self._start_backlog()
        if not self.pending and self.closing and transport is not None and not transport.is_closing():
            self._linger_close()
            return
        if self.eof and not self.pending and not self.closing:
            self._close_after_eof()
            return
        self._maybe_resume_reading()

    def _close_after_eof(self) -> None:
        """Close a half-closed connection once every reply it is owed is written: the
        socket closes when they have left the send buffer. A peer that stops reading them
        is dropped after ``idle_timeout`` seconds without progress, as an idle one is."""
        self.closing = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.close()
        if self.server.idle_timeout:
            self._drop_unread(transport, transport.get_write_buffer_size())

    def _drop_unread(self, transport: asyncio.Transport, unread: int) -> None:
        if not unread:
            return  # all sent: the transport has closed, or is closing
        def check() -> None:
            left = transport.get_write_buffer_size()
            if left and left >= unread:
                log.info("dropping a half-closed connection from %s: %d reply octets "
                         "unread for %.1fs", self.peer, left, self.server.idle_timeout)
                transport.abort()
            else:
                self._drop_unread(transport, left)
        self.loop.call_later(self.server.idle_timeout, check)

    def _start_backlog(self) -> None:
        """Start waiting requests while fewer than max_pipeline are in flight."""
        backlog, limit = self.backlog, self.server.max_pipeline
        while backlog and len(self.pending) < limit and not self.closing:
            self._dispatch(backlog.popleft())
        if not backlog and self.backlog_octets:
            if self.pending:
                self.pending_octets[-1] += self.backlog_octets
            else:
                self.buffered_octets -= self.backlog_octets
            self.backlog_octets = 0

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.transport.is_closing():
            self.reading_paused = True
            self.transport.pause_reading()

    def _maybe_resume_reading(self) -> None:
        server = self.server
        if (self.reading_paused and not self.closing and not self.eof and not self.writing_paused
                and not self.backlog and len(self.pending) < server.max_pipeline
                and self.buffered_octets < server.max_buffered_octets):
            self.reading_paused = False
            if self.frame_started is not None:
                self.frame_started = self.loop.time()  # the wait was this server's own
            assert self.transport is not None
            self.transport.resume_reading()

    def check_timeouts(self, now: float) -> None:
        """Close a connection whose frame is late (counted from its first octet) or that has
        been idle too long."""
        if self.closing or self.transport is None:
            return
        server = self.server
        started = self.frame_started
        if (started is not None and server.frame_timeout and not self.reading_paused
                and now - started > server.frame_timeout):
            log.info("closing a connection from %s: a frame started %.1fs ago is not complete",
                     self.peer, now - started)
            self._protocol_error(_FrameTimeout(server.frame_timeout))
        elif self.idle and server.idle_timeout and now - self.last_activity > server.idle_timeout:
            log.debug("closing an idle connection after %.1fs", now - self.last_activity)
            self.close_idle()

    def close_idle(self) -> None:
        self.closing = True
        assert self.transport is not None
        self.transport.close()


def _start_args(start) -> int:
    """The arguments a handler's ``start`` is given: 1 (the message), 2 (and the request's
    source) or 3 (and the ``done`` callable, see :class:`StartHandler`)."""
    if start is None:
        return 1
    try:
        parameters = list(inspect.signature(start).parameters)
    except (TypeError, ValueError):
        return 1
    if len(parameters) >= 3 and parameters[2] == "done":
        return 3
    return 2 if len(parameters) >= 2 else 1


def _ignore(_fut: asyncio.Future) -> None:
    """A closed connection's done-callback: nothing is sent any more."""


def _error_reply(exc: BaseException) -> bytes:
    """The ERROR frame that answers a request that failed with `exc`."""
    if isinstance(exc, (ServingError, ProtocolError)):
        log.debug("request failed: %s", exc)
        return mip.encode_error(exc.error_code, str(exc))
    log.error("handler failed", exc_info=exc)
    return mip.encode_error(ErrorCode.INTERNAL, f"the server failed: {type(exc).__name__}")


_DISCARD = memoryview(bytearray(65536))  # where octets after an error are read and dropped


class _NotARequest(ProtocolError):
    error_code = ErrorCode.SUBTYPE

    def __init__(self):
        super().__init__("a server accepts only requests")


class _FrameTimeout(ProtocolError):
    error_code = ErrorCode.PROTOCOL

    def __init__(self, seconds: float):
        super().__init__(f"a frame was not complete {seconds:g}s after its first octet")


class MipServer:
    """Serve MIP on TCP or Unix-socket URLs.

    Args:
        handler: ``async (Message) -> list of buffers``, or an object with ``start``; see
            :class:`Handler` and :class:`StartHandler`.
        max_frame_size: largest request accepted, in octets (header included);
            a larger one is answered with ERROR/MEMORY and the connection closed.
        max_connections: connections served at once; more are answered with
            ERROR/MEMORY and closed.
            When they are all open, the longest-idle connection (nothing in flight, no
            frame started) is closed to make room; with none idle the new one is refused.
        max_connections_per_peer: connections one peer address may hold; more are
            answered with ERROR/MEMORY and closed (Unix-socket peers are not counted).
        max_pipeline: requests in flight per connection before reading pauses.
        max_buffered_octets: request octets a connection may hold unanswered (frames read
            whose replies are not written yet) before reading pauses.
        max_pending_reply: reply octets waiting in a connection's send buffer (the peer
            is not reading) before reading pauses, until they drain.
        idle_timeout: seconds a connection may stay silent with nothing in
            flight before it is closed (0 = never).
        frame_timeout: seconds a frame may take to arrive, counted from its first
            octet; a late frame is answered with ERROR/PROTOCOL and the connection
            closed (0 = never).
        ssl: an ``ssl.SSLContext`` to serve TLS.
        frame_memory: where a frame too large for a connection's receive buffer is received:
            ``frame_memory(size)`` gives an object exporting ``size`` writable octets, or
            ``None`` (then, as without it, memory of the parser's own); e.g. blocks of the
            shared arena of ``mip serve --placement shared``.
    """

    def __init__(self, handler: Callable[[mip.Message], Awaitable[Buffers]] | StartHandler, *,
                 max_frame_size: int = 64 * 1024 * 1024, max_connections: int = 1024,
                 max_connections_per_peer: int = 256, max_pipeline: int = 128,
                 max_buffered_octets: int = 128 * 1024 * 1024,
                 max_pending_reply: int = 1024 * 1024, idle_timeout: float = 300.0,
                 frame_timeout: float = 30.0, ssl: _ssl.SSLContext | None = None,
                 frame_memory: Callable[[int], Any] | None = None):
        self.handler = handler
        # A handler may also offer start(message) -> Future of the reply buffers, which
        # serves a request without a task of its own; if it takes a second argument, that
        # is the request's source (the peer address), for fair queueing.
        self.start_handler = getattr(handler, "start", None)
        self.start_args = _start_args(self.start_handler)
        self.max_frame_size = max_frame_size
        self.max_connections = max_connections
        self.max_connections_per_peer = max_connections_per_peer
        self.max_pipeline = max_pipeline
        self.max_buffered_octets = max_buffered_octets
        self.max_pending_reply = max_pending_reply
        self.idle_timeout = idle_timeout
        self.frame_timeout = frame_timeout
        self.ssl = ssl
        self.frame_memory = frame_memory
        self.linger = 1.0  # seconds a refused or failed connection drains before closing
        self._servers: list[asyncio.AbstractServer] = []
        self._connections: set[_Connection] = set()
        self._per_peer = PeerCounts()
        self._sweeper: asyncio.Task | None = None
        self._unix_paths: list[str] = []
        self.addresses: list[Address] = []

    async def start(self, url: str, sock: socket.socket | None = None) -> Address:
        """Listen on `url` (``tcp://HOST:PORT``, port 0 picks one, or ``unix:///PATH``), or
        accept on `sock`, a listening socket bound to `url` elsewhere (whose unix path, if
        any, stop leaves to its owner).

        Returns the bound address.
        """
        loop = asyncio.get_running_loop()
        addr = parse_url(url)
        factory = lambda: _Connection(self)  # noqa: E731
        if sock is not None:
            server = await loop.create_server(factory, sock=sock, ssl=self.ssl, backlog=1024)
            bound = addr if isinstance(addr, UnixAddress) else TcpAddress(
                addr.host, sock.getsockname()[1])
        elif isinstance(addr, UnixAddress):
            _remove_stale_socket(addr.path)
            server = await loop.create_unix_server(factory, addr.path, ssl=self.ssl, backlog=1024)
            self._unix_paths.append(addr.path)
            bound = addr
        else:
            server = await loop.create_server(factory, addr.host, addr.port, ssl=self.ssl,
                                              backlog=1024, reuse_address=True)
            host, port = server.sockets[0].getsockname()[:2]
            bound = TcpAddress(host, port)
        self._servers.append(server)
        self.addresses.append(bound)
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep())
        log.info("MIP listening on %s", bound)
        return bound

    def _admit(self, host: str | None) -> str:
        """Why a new connection from `host` is refused ("" = admitted): its address holds
        too many, or every connection is busy. An idle one is closed to make room."""
        if self._per_peer.full(host, self.max_connections_per_peer):
            return f"max_connections_per_peer={self.max_connections_per_peer} reached"
        if len(self._connections) < self.max_connections:
            return ""
        oldest = longest_idle(self._connections)
        if oldest is None:
            return f"max_connections={self.max_connections} reached, none idle"
        log.info("closing the longest-idle connection (from %s) to make room", oldest.peer)
        self._forget(oldest)
        oldest.close_idle()
        return ""

    def _forget(self, conn: "_Connection") -> None:
        if conn in self._connections:
            self._connections.discard(conn)
            self._per_peer.remove(conn.peer)

    async def _sweep(self) -> None:
        timeouts = [t for t in (self.idle_timeout, self.frame_timeout) if t]
        if not timeouts:
            return
        await sweep_timeouts(self._connections, max(0.02, min(1.0, min(timeouts) / 4)))

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
