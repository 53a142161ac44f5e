"""A gRPC server on asyncio and :class:`mip.protocol.h2.GrpcConnection` (libnghttp2).

The server knows methods, not services: a dict from ``/package.Service/Method`` to a
:class:`Method`, each a unary or a bidirectional-streaming handler written like a
grpc.aio one (``async def handler(request, context)``; a streaming handler is an async
generator over an async iterator of requests). Handlers that take and return ``bytes``
(no serializers) see the received message as one ``bytes`` object, so tensor fields can be
numpy views of it.

A call whose client resets its stream (a cancelled call) or whose ``grpc-timeout``
passes has its handler task cancelled; a deadline ends the call with DEADLINE_EXCEEDED.
Messages over ``max_message_size`` are refused with RESOURCE_EXHAUSTED before their
memory is taken. Replies finished in one pass of the event loop leave in one write.

What a connection may hold and how long it may idle is bounded by
:class:`~mip.net.grpc_limits.GrpcLimits` (docs/grpc.md lists each limit). Connections
read into one receive buffer per server (the data is copied out before the next read),
so an idle connection costs its nghttp2 session and a few Python objects.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl as _ssl
import zlib
from dataclasses import dataclass
from functools import partial
from collections.abc import Sequence
from typing import Any, Callable

from mip.errors import GrpcStatus, H2Error, RpcError
from mip.net.grpc_limits import GrpcLimits
import mip.protocol.h2 as _h2
from mip.protocol.h2 import (Call, Event, MessageReceived, MessageTooLarge, RequestReceived,
                             StreamClosed, StreamEnded, UnaryReceived)

__all__ = ["Context", "GrpcLimits", "GrpcServer", "H2Protocol", "Method",
           "stream_stream", "unary", "unary_future"]

log = logging.getLogger("mip.net.grpc_server")

_RECEIVE_BUFFER = 256 << 10
_STREAM_QUEUE = 4096  # messages of one streaming call waiting for its handler
_EOF = object()


@dataclass(frozen=True, slots=True)
class Method:
    """One RPC: its handler, its (de)serializers (``None``: bytes) and whether it streams."""

    handler: Callable
    streaming: bool = False
    request_deserializer: Callable[[bytes], Any] | None = None
    response_serializer: Callable[[Any], bytes] | None = None
    returns_future: bool = False


def unary(handler, request_deserializer=None, response_serializer=None) -> Method:
    """A unary-unary method: ``await handler(request, context)`` returns the response."""
    return Method(handler, False, request_deserializer, response_serializer)


def unary_future(handler) -> Method:
    """A unary-unary method without a coroutine: ``handler(request_bytes, context)`` returns
    an :class:`asyncio.Future` of the reply's bytes (or raises :class:`RpcError`), and the
    reply is sent from the future's callback: no task a call. Cancelling the call cancels
    the future."""
    return Method(handler, False, None, None, True)


def stream_stream(handler, request_deserializer=None, response_serializer=None) -> Method:
    """A bidirectional-streaming method: ``handler(requests, context)`` is an async
    generator of responses; ``requests`` is an async iterator."""
    return Method(handler, True, request_deserializer, response_serializer)


class Context:
    """What a handler knows of its call (a subset of grpc.aio's ``ServicerContext``)."""

    __slots__ = ("_call", "_deadline", "_loop", "_peer", "_trailers")

    def __init__(self, call, deadline: float | None, loop, peer: str = ""):
        self._call = call
        self._deadline = deadline
        self._loop = loop
        self._peer = peer
        self._trailers = ()

    async def abort(self, code, details: str = "", trailing_metadata=()):
        """End the call with ``code`` (a :class:`~mip.errors.GrpcStatus`, its name or
        number, or a ``grpc.StatusCode``)."""
        raise RpcError(code, details, trailing_metadata)

    def time_remaining(self) -> float | None:
        """Seconds left before the client's deadline, or ``None`` without one."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - self._loop.time())

    def invocation_metadata(self) -> tuple:
        """The call's request headers other than HTTP/2's and gRPC's own."""
        return tuple(self._call.metadata)

    def peer(self) -> str:
        """The client's address as grpc.aio writes it: ``ipv4:HOST:PORT``,
        ``ipv6:[HOST]:PORT`` or ``unix:PATH``."""
        return self._peer

    def set_trailing_metadata(self, metadata) -> None:
        self._trailers = tuple(metadata)

    def cancelled(self) -> bool:
        return self._call.finished and self._call.tag is None


def _decompress(data: bytes | memoryview, encoding: str | None, limit: int) -> bytes:
    if encoding == "gzip":
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif encoding == "deflate":
        inflater = zlib.decompressobj()
    else:
        raise RpcError(GrpcStatus.UNIMPLEMENTED,
                       f"compressed message with grpc-encoding {encoding or 'identity'!r}; "
                       "this server reads identity, gzip and deflate")
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise RpcError(GrpcStatus.INTERNAL, f"bad {encoding} message: {exc}") from None
    if len(out) > limit:
        raise RpcError(GrpcStatus.RESOURCE_EXHAUSTED,
                       f"decompressed message is over the limit of {limit} octets")
    return out


class _State:
    """Per call: the method, its one request (unary) or queue (streaming), its task."""

    __slots__ = ("method", "message", "queue", "task", "timer", "queued")

    def __init__(self, method: Method):
        self.method = method
        self.message: bytes | memoryview | None = None
        self.queue: asyncio.Queue | None = None  # streaming calls only
        self.task: asyncio.Future | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.queued = 0


class H2Protocol(asyncio.BufferedProtocol):
    """What both ends of a :class:`~mip.protocol.h2.GrpcConnection` do on asyncio: the
    socket reads into a reused buffer, TCP_NODELAY, and what the connection wants to send
    leaves at the end of the event loop's pass in one write (none while the transport's
    write buffer is full: what waits stays in the connection, counted against its
    limits). ``h2`` and ``buffer`` are set by the subclass before :meth:`connection_made`
    runs."""

    h2: _h2.GrpcConnection
    buffer: memoryview
    parked: Sequence[Call | asyncio.Future] = ()  # server: calls waiting for replies to
    # drain (see _Connection._unpark)

    def __init__(self, loop):
        self.loop = loop
        self.transport = None
        self.flush_scheduled = False
        self.closed = False
        self.paused = False
        self.peer = ""  # the client's address, grpc.aio style (Context.peer())

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        name = transport.get_extra_info("peername")
        if isinstance(name, tuple) and sock is not None and sock.family == socket.AF_INET6:
            self.peer = f"ipv6:[{name[0]}]:{name[1]}"
        elif isinstance(name, tuple):
            self.peer = f"ipv4:{name[0]}:{name[1]}"
        else:
            self.peer = f"unix:{name or ''}"
        self.flush()

    def get_buffer(self, sizehint: int):
        return self.buffer

    def flush(self) -> None:
        """Send what is pending at the end of this pass of the event loop."""
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self.flush_scheduled = False
        if self.paused or self.closed or self.transport is None or self.transport.is_closing():
            return
        try:
            out = self.h2.data_to_send()
        except H2Error as exc:
            log.warning("HTTP/2 connection failed: %s", exc)
            self.transport.close()
            return
        if out:
            if len(out) == 1:
                self.transport.write(out[0])
            else:
                self.transport.writelines(out)
        if not self.h2.want_read and not self.h2.want_write:
            self.transport.close()
        elif (self.parked and not self.paused
              and self.h2.pending_out <= self.h2.max_pending_out // 2):
            self._unpark()

    def _unpark(self) -> None:
        """Take up what waited for this end's replies to drain (the server's calls)."""

    def pause_writing(self) -> None:
        """The socket's write buffer is full: hand nothing more to the transport until it
        drains (what waits stays in the connection, counted against its limits).

        Reading goes on. Both ends of a connection may be writing at once (requests one
        way, replies the other); an end that stopped reading while its own writes are
        blocked would leave the other end's writes blocked too, and two such ends wait for
        each other forever. What a peer that does not read may make this end hold is
        bounded by HTTP/2 flow control and the connection's limits instead: nothing is
        sent while paused, WINDOW_UPDATEs included, so the peer can send no more than the
        window it has; the server parks new calls meanwhile, and holds back request DATA
        past ``max_pending_out``."""
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._flush_now()


class _Connection(H2Protocol):
    def __init__(self, server: GrpcServer):
        super().__init__(server._loop)
        self.server = server
        self.h2 = server._new_h2()
        self.buffer = server._buffer
        now = server._loop.time()
        self.accepted = self.idle_since = self.ping_sent = now
        self.streams_seen = 0
        # unary calls (and futures of streaming handlers) waiting for this connection's
        # replies to drain
        self.parked: list[Call | asyncio.Future] = []

    # -- asyncio -----------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        s = self.server
        if len(s._connections) >= s.limits.max_connections and not s._make_room():
            log.warning("gRPC connection refused: %d connections open (max_connections)",
                        len(s._connections))
            self.closed = True
            transport.abort()
            return
        s._connections.add(self)
        super().connection_made(transport)

    def close(self, reason: bytes = b"") -> None:
        """GOAWAY (NO_ERROR, ``reason`` as debug data), then close once it is written."""
        if self.closed:
            return
        try:
            self.h2.goaway(0, reason)
            self.paused = False
            self._flush_now()
        except H2Error:
            pass
        self.closed = True
        self.server._connections.discard(self)
        self.transport.close()

    def check(self, now: float) -> None:
        """The server's periodic look: handshake, idle and keepalive timers."""
        h2, limits = self.h2, self.server.limits
        if not h2.handshaken:
            if limits.handshake_timeout and now - self.accepted >= limits.handshake_timeout:
                log.debug("gRPC connection closed: no HTTP/2 preface within %gs",
                          limits.handshake_timeout)
                self.closed = True
                self.server._connections.discard(self)
                self.transport.abort()
            return
        started = h2.streams_started
        if h2.open_calls or started != self.streams_seen:
            self.idle_since = now
            self.streams_seen = started
        elif limits.idle_timeout and now - self.idle_since >= limits.idle_timeout:
            self.close(b"max_idle")
            return
        if limits.keepalive_interval:
            if h2.ping_pending:
                if now - self.ping_sent >= limits.keepalive_timeout:
                    log.debug("gRPC connection closed: keepalive PING not answered")
                    self.close(b"keepalive_timeout")
            elif h2.open_calls and now - self.ping_sent >= limits.keepalive_interval:
                h2.ping()
                self.ping_sent = now
                self.flush()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            events = self.h2.receive(self.buffer[:nbytes])
        except H2Error as exc:
            log.debug("HTTP/2 error from the peer: %s", exc)
            self.paused = False
            self._flush_now()
            self.transport.close()
            return
        for event in events:
            try:
                if type(event) is UnaryReceived:
                    self._unary_received(event.call, event.data)
                elif type(event) is StreamClosed and event.call.finished:  # _event's, in short
                    state = event.call.tag
                    if state is not None and state.timer is not None:
                        state.timer.cancel()
                else:
                    self._event(event)
            except Exception:  # one call's problem must not end the connection
                call = event.call
                log.exception("gRPC call %r failed", call)
                if not call.finished:
                    self.h2.finish(call, GrpcStatus.INTERNAL, "internal error")
        h2 = self.h2
        if h2.want_write or h2.reading_held or not h2.want_read:
            # frames to send (ACKs, WINDOW_UPDATEs, refusals), DATA held back for the
            # replies to drain, or the connection is done; replies are flushed by flush()
            self._flush_now()

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.server._connections.discard(self)
        self.h2.let_go()  # partial messages (their memory may be the shared arena's)
        for call in self.h2.live_calls():
            if not call.finished:
                self._cancel(call)

    # -- calls -------------------------------------------------------------------------

    def _unary_received(self, call: Call, data: bytes | memoryview) -> None:
        """A plain unary call's whole request (its path is one of the server's unary
        methods; _h2 checked the method and content type)."""
        state = call.tag = _State(self.server.methods[call.path])  # type: ignore[index]
        state.message = data
        if self.paused or self.h2.pending_out > self.h2.max_pending_out:
            self.parked.append(call)  # replies are not being read: see _event
        elif state.method.returns_future:
            self._start_future(call, state)
        else:
            state.task = self.loop.create_task(self._unary(call, state))

    def _event(self, event: Event) -> None:
        call = event.call
        state = call.tag
        match event:
            case RequestReceived():
                self._begin(call)
            case StreamClosed():
                if state is not None and not call.finished:
                    self._cancel(call)
                elif state is not None and state.timer is not None:
                    state.timer.cancel()
            case _ if state is None or call.finished:
                pass
            case MessageReceived():
                self._message(call, state, event)
            case StreamEnded():
                if state.queue is not None:  # a streaming call
                    state.queue.put_nowait(_EOF)
                elif state.message is None:
                    self._end(call, GrpcStatus.UNIMPLEMENTED,
                              "the call carries no request message")
                elif self.paused or self.h2.pending_out > self.h2.max_pending_out:
                    # replies are not being read (the socket's write buffer is full, or
                    # max_pending_out octets wait): start no more work until they drain
                    self.parked.append(call)
                else:
                    self._run(call, state)
            case MessageTooLarge(length=length):
                self._end(call, GrpcStatus.RESOURCE_EXHAUSTED, self.server.too_large(length)
                          if not event.over_buffered
                          else f"message of {length} octets: {self.h2.buffered} octets of "
                               f"other requests are being received on this connection, and "
                               f"the limit is {self.h2.max_buffered} (max_buffered, "
                               f"--grpc-max-buffered)")

    def _message(self, call: Call, state: _State, event: MessageReceived) -> None:
        data = event.data
        if event.compressed:
            data = _decompress(data, call.encoding, self.server.max_message_size)
        if state.queue is not None:  # a streaming call
            state.queued += 1
            if state.queued > _STREAM_QUEUE:
                self._end(call, GrpcStatus.RESOURCE_EXHAUSTED,
                          f"more than {_STREAM_QUEUE} stream messages wait for the server")
                return
            state.queue.put_nowait(data)
        elif state.message is not None:
            self._end(call, GrpcStatus.UNIMPLEMENTED, "a unary call carries one request message")
        else:
            state.message = data

    def _run(self, call, state: _State) -> None:
        """Start a unary call's handler."""
        if state.method.returns_future:
            self._start_future(call, state)
        else:
            state.task = self.loop.create_task(self._unary(call, state))

    def _unpark(self) -> None:
        """Start the calls (and wake the streaming handlers) that waited for this
        connection's replies to drain."""
        parked, self.parked = self.parked, []
        for item in parked:
            if isinstance(item, asyncio.Future):
                if not item.done():
                    item.set_result(None)
            elif item.tag is not None and not item.finished:
                self._run(item, item.tag)

    def _begin(self, call) -> None:
        # as grpc-core: 405 for a method other than POST, 415 for another content type
        if call.method != "POST":
            self.h2.refuse(call, 405, GrpcStatus.INTERNAL,
                           f"a gRPC call is a POST, not a {call.method}")
            return
        content_type = call.content_type or ""
        if not (content_type == "application/grpc"
                or content_type.startswith(("application/grpc+", "application/grpc;"))):
            self.h2.refuse(call, 415, GrpcStatus.INTERNAL,
                           f"a gRPC call carries application/grpc, not {content_type!r}")
            return
        method = self.server.methods.get(call.path)
        if method is None:
            self._end(call, GrpcStatus.UNIMPLEMENTED, f"unknown method {call.path}")
            return
        state = call.tag = _State(method)
        if call.timeout is not None:
            state.timer = self.loop.call_later(call.timeout, self._deadline, call)
        if method.streaming:
            state.queue = asyncio.Queue()
            state.task = self.loop.create_task(self._streaming(call, state))

    def _deadline(self, call) -> None:
        if not call.finished:
            state = call.tag
            self._end(call, GrpcStatus.DEADLINE_EXCEEDED, "deadline exceeded")
            if state is not None and state.task is not None:
                state.task.cancel()

    def _cancel(self, call) -> None:
        state = call.tag
        call.tag = None
        if state is not None:
            if state.timer is not None:
                state.timer.cancel()
            if state.task is not None:
                state.task.cancel()

    def _end(self, call, code: int, details: str = "", trailers=()) -> None:
        self.h2.finish(call, int(code), details, trailers)
        state = call.tag
        if state is not None and state.timer is not None:
            state.timer.cancel()
        self.flush()

    def _context(self, call) -> Context:
        timeout = call.timeout
        return Context(call, None if timeout is None else self.loop.time() + timeout, self.loop,
                       self.peer)

    def _failed(self, call, error: BaseException, trailers=()) -> None:
        """End ``call`` for a handler's exception: an RpcError's status, else INTERNAL."""
        if isinstance(error, RpcError):
            self._end(call, error.code, error.details, error.trailers or trailers)
            return
        log.error("gRPC handler for %s failed", call.path, exc_info=error)
        self._end(call, GrpcStatus.INTERNAL, f"internal error: {type(error).__name__}: {error}")

    def _answer(self, call, state: _State, response, trailers=()) -> None:
        """A unary call's reply with status OK (and the handler's trailing metadata)."""
        if trailers:
            self.h2.send_message(call, response)
            self._end(call, GrpcStatus.OK, "", trailers)
            return
        self.h2.unary(call, response)
        if state.timer is not None:
            state.timer.cancel()
        self.flush()

    def _start_future(self, call, state: _State) -> None:
        request, state.message = state.message, None
        timeout = call.timeout
        context = Context(call, None if timeout is None else self.loop.time() + timeout,
                          self.loop, self.peer)
        try:
            future = state.method.handler(request, context)
        except Exception as exc:
            self._failed(call, exc, context._trailers)
            return
        state.task = future
        future.add_done_callback(partial(self._future_done, call, state, context))

    def _future_done(self, call, state: _State, context: Context,
                     future: asyncio.Future) -> None:
        if future.cancelled() or call.finished:
            return  # reset by the client, or past its deadline: answered already
        error = future.exception()
        if error is not None:
            self._failed(call, error, context._trailers)
        elif context._trailers:
            self._answer(call, state, future.result(), context._trailers)
        else:  # _answer's common case, inline
            self.h2.unary(call, future.result())
            if state.timer is not None:
                state.timer.cancel()
            if not self.flush_scheduled:  # flush(), inline
                self.flush_scheduled = True
                self.loop.call_soon(self._flush_now)

    async def _unary(self, call, state: _State) -> None:
        method = state.method
        context = self._context(call)
        try:
            request: Any = state.message
            state.message = None
            if method.request_deserializer is not None:
                try:
                    request = method.request_deserializer(request)
                except Exception as exc:
                    raise RpcError(GrpcStatus.INTERNAL, f"cannot parse the request: {exc}") from None
            response = await method.handler(request, context)
            if method.response_serializer is not None:
                response = method.response_serializer(response)
        except asyncio.CancelledError:
            return  # reset by the client, or past its deadline: answered already
        except Exception as exc:
            self._failed(call, exc, context._trailers)
            return
        self._answer(call, state, response, context._trailers)

    async def _streaming(self, call, state: _State) -> None:
        method = state.method
        context = self._context(call)
        deserialize = method.request_deserializer
        serialize = method.response_serializer

        queue = state.queue
        assert queue is not None  # a streaming call has one

        async def requests():
            while True:
                item = await queue.get()
                if item is _EOF:
                    return
                state.queued -= 1
                if deserialize is not None:
                    try:
                        item = deserialize(item)
                    except Exception as exc:
                        raise RpcError(GrpcStatus.INTERNAL, f"cannot parse a request: {exc}") from None
                yield item

        try:
            async for response in method.handler(requests(), context):
                if call.finished:
                    return
                self.h2.send_message(call, serialize(response) if serialize else response)
                self.flush()
                if self.h2.pending_out > self.h2.max_pending_out:
                    # the replies are not being read: produce no more until they drain
                    drained = self.loop.create_future()
                    self.parked.append(drained)
                    await drained
        except asyncio.CancelledError:
            return
        except Exception as exc:
            self._failed(call, exc, context._trailers)
            return
        self._end(call, GrpcStatus.OK, "", context._trailers)


class GrpcServer:
    """A gRPC server for the methods given.

    Args:
        methods: ``{"/package.Service/Method": Method}``.
        max_message_size: largest request message, in octets (larger ones are refused
            with RESOURCE_EXHAUSTED before they are buffered).
        limits: what a connection may hold and how long it may idle
            (:class:`~mip.net.grpc_limits.GrpcLimits`; its defaults when ``None``).
        ssl: a server-side :class:`ssl.SSLContext` offering ALPN ``h2``
            (:func:`mip.net.tls.server_context` with ``alpn=["h2"]`` makes one), or ``None``.
        too_large: the RESOURCE_EXHAUSTED message for a request of N octets.
        message_memory: where a large uncompressed request message is received
            (``message_memory(size)`` gives an object exporting ``size`` writable octets,
            or ``None`` for a ``bytes`` object as without it): the shared arena of
            ``mip serve --placement shared``, the receive memory of its MIP frames too
            (:meth:`RemoteEngine.frame_memory <mip.serving.remote.RemoteEngine.frame_memory>`).
    """

    def __init__(self, methods: dict[str, Method], *, max_message_size: int = 4 << 20,
                 limits: GrpcLimits | None = None, ssl: _ssl.SSLContext | None = None,
                 too_large: Callable[[int], str] | None = None,
                 message_memory: Callable[[int], Any] | None = None):
        self.methods = dict(methods)
        self._unary_paths = frozenset(path for path, method in self.methods.items()
                                      if not method.streaming)
        self.max_message_size = max_message_size
        self.limits = limits = limits or GrpcLimits()
        self.ssl = ssl
        self.message_memory = message_memory
        self.too_large = too_large or (
            lambda n: f"message of {n} octets is over the limit of {max_message_size} octets")
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop  # set by start()
        self._sweeper: asyncio.TimerHandle | None = None
        # every connection reads into this buffer: asyncio hands it to buffer_updated
        # right after the read, and receive() copies what it keeps
        self._buffer = memoryview(bytearray(_RECEIVE_BUFFER))
        timers = [t for t in (limits.handshake_timeout, limits.idle_timeout,
                              limits.keepalive_interval, limits.keepalive_timeout) if t]
        self._sweep_every = max(0.05, min([1.0] + [t / 4 for t in timers]))

    def _new_h2(self) -> _h2.GrpcConnection:
        limits = self.limits
        return _h2.GrpcConnection(
            max_message_size=self.max_message_size,
            max_concurrent_streams=limits.max_concurrent_streams,
            max_header_list_size=limits.max_header_list_size,
            header_table_size=limits.header_table_size,
            max_buffered=limits.max_buffered or max(4 * self.max_message_size, 64 << 20),
            max_pending_out=limits.max_pending_reply,
            min_ping_interval=limits.min_ping_interval,
            max_ping_strikes=limits.max_ping_strikes,
            reset_burst=limits.reset_burst, reset_rate=limits.max_reset_rate,
            unary_paths=self._unary_paths, message_memory=self.message_memory)

    def _make_room(self) -> bool:
        """At max_connections: close the longest-idle connection; False if all are busy."""
        now = self._loop.time()
        idle = []
        for c in self._connections:
            if c.h2.streams_started != c.streams_seen:  # calls since the last sweep
                c.idle_since, c.streams_seen = now, c.h2.streams_started
            if not c.h2.open_calls:
                idle.append(c)
        if not idle:
            return False
        victim = min(idle, key=lambda c: c.idle_since)
        log.info("gRPC: closing the longest-idle connection for a new one (max_connections)")
        victim.close(b"max_connections")
        return True

    def _sweep(self) -> None:
        now = self._loop.time()
        for connection in list(self._connections):
            if not connection.closed:
                connection.check(now)
        self._sweeper = self._loop.call_later(self._sweep_every, self._sweep)

    async def start(self, host: str, port: int,
                    sock: socket.socket | None = None) -> tuple[str, int]:
        """Listen on ``host:port`` (port 0: a free one), or accept on ``sock``, a listening
        socket bound elsewhere; returns the bound address."""
        self._loop = asyncio.get_running_loop()
        handshake = self.limits.handshake_timeout
        where = {"sock": sock} if sock is not None else {
            "host": host, "port": port, "reuse_address": True}
        self._server = await self._loop.create_server(
            lambda: _Connection(self), ssl=self.ssl, backlog=1024, **where,
            ssl_handshake_timeout=(handshake or None) if self.ssl is not None else None)
        self._sweeper = self._loop.call_later(self._sweep_every, self._sweep)
        bound = self._server.sockets[0].getsockname()
        return bound[0], bound[1]

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop accepting; then the two-phase GOAWAY: a notice (last stream 2^31-1) and a
        PING, the final GOAWAY once the PING is answered (or after a second); calls in
        progress get ``grace`` seconds, then connections close."""
        if self._server is None:
            return
        self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        loop = self._loop

        def each(step):
            for connection in list(self._connections):
                try:
                    step(connection.h2)
                    connection.flush()
                except Exception:
                    pass

        each(_h2.GrpcConnection.shutdown_notice)
        deadline = loop.time() + min(1.0, grace or 1.0)
        while (any(c.h2.shutdown_state == 1 for c in self._connections)
               and loop.time() < deadline):
            await asyncio.sleep(0.01)
        each(_h2.GrpcConnection.goaway)
        if grace:
            deadline = loop.time() + grace
            while (any(c.h2.open_calls for c in self._connections)
                   and loop.time() < deadline):
                await asyncio.sleep(0.01)
        for connection in list(self._connections):
            connection.transport.close()
        await self._server.wait_closed()
        self._server = None
