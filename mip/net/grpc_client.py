"""A gRPC client channel on asyncio and :class:`mip.protocol.h2.GrpcConnection`.

One connection, any number of calls multiplexed on it; unary calls only, bytes in and
bytes out (serialize with protobuf yourself). It costs a fraction of grpc.aio's CPU per
call, which is what ``mip bench`` needs to load a server without becoming the bottleneck::

    async with GrpcChannel("127.0.0.1:8001") as channel:
        reply = await channel.unary("/inference.GRPCInferenceService/ModelInfer", payload)
"""

from __future__ import annotations

import asyncio
import ssl as _ssl

from mip.errors import GrpcStatus, H2Error, RpcError
from mip.net import tls
from mip.net.grpc_server import _RECEIVE_BUFFER, H2Protocol
from mip.net.urls import tcp_address
import mip.protocol.h2 as _h2
from mip.protocol.h2 import Call, MessageReceived, MessageTooLarge, StreamClosed

__all__ = ["GrpcChannel"]


class _ClientProtocol(H2Protocol):
    def __init__(self, channel: GrpcChannel):
        super().__init__(channel._loop)
        self.channel = channel
        self.buffer = memoryview(bytearray(_RECEIVE_BUFFER))
        self.h2 = _h2.GrpcConnection(client=True, max_message_size=channel.max_message_size,
                                     scheme=b"https" if channel.ssl is not None else b"http")
        self.lost: Exception | None = None

    def buffer_updated(self, nbytes: int) -> None:
        try:
            events = self.h2.receive(self.buffer[:nbytes])
        except H2Error as exc:
            self._fail(ConnectionError(f"HTTP/2 error: {exc}"))
            self.transport.close()
            return
        for event in events:
            call = event.call
            future = call.tag
            if future is None:
                continue
            match event:
                case MessageReceived():
                    call.data = event.data
                case StreamClosed(error_code=code):
                    call.tag = None
                    if not future.done():
                        _settle(future, call, code)
                case MessageTooLarge(length=length):
                    call.tag = None
                    if not future.done():
                        future.set_exception(RpcError(
                            GrpcStatus.RESOURCE_EXHAUSTED,
                            f"reply of {length} octets is over the limit"))
                    self.h2.reset(call)
        self._flush_now()

    def connection_lost(self, exc) -> None:
        self._fail(ConnectionError(f"connection lost: {exc}" if exc else "connection closed"))

    def _fail(self, exc: Exception) -> None:
        self.lost = exc
        for call in self.h2.live_calls():
            future, call.tag = call.tag, None
            if future is not None and not future.done():
                future.set_exception(exc)


def _settle(future: asyncio.Future, call: Call, error_code: int) -> None:
    """Complete a unary call's future when its stream closed (with ``error_code``)."""
    status = call.grpc_status
    if status is None:
        future.set_exception(RpcError(  # NO_ERROR or REFUSED_STREAM: UNAVAILABLE
            GrpcStatus.UNAVAILABLE if error_code in (0, 7) else GrpcStatus.CANCELLED,
            f"stream closed without a status (HTTP/2 error {error_code}, "
            f"HTTP status {call.http_status})"))
    elif status != 0:
        future.set_exception(RpcError(status, call.grpc_message or ""))
    elif call.incomplete:
        future.set_exception(RpcError(
            GrpcStatus.INTERNAL, "the reply's stream ended inside a message"))
    else:
        future.set_result(call.data if call.data is not None else b"")


class GrpcChannel:
    """A client connection to a gRPC server at ``HOST:PORT``.

    Args:
        address: ``HOST:PORT``.
        ssl: ``True`` for TLS with the system's CAs, a client :class:`ssl.SSLContext`
            offering ALPN ``h2`` (:func:`mip.net.tls.client_context` with ``alpn=["h2"]``
            makes one), or ``None``; requests over TLS carry ``:scheme https``.
        max_message_size: largest reply message accepted, in octets.
    """

    def __init__(self, address: str, *, ssl: _ssl.SSLContext | bool | None = None,
                 max_message_size: int = 1 << 30):
        where = tcp_address(address, "gRPC address")
        self.host, self.port = where.host, where.port
        self.authority = where.hostport.encode()
        self.ssl = tls.client_context(alpn=["h2"]) if ssl is True else (ssl or None)
        self.max_message_size = max_message_size
        self._protocol: _ClientProtocol | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def connect(self) -> None:
        self._loop = loop = asyncio.get_running_loop()
        _, self._protocol = await loop.create_connection(
            lambda: _ClientProtocol(self), self.host, self.port, ssl=self.ssl)

    async def __aenter__(self) -> GrpcChannel:
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def unary(self, path: bytes | str, payload, *, timeout: float | None = None,
              metadata=()) -> asyncio.Future:
        """Call ``path`` with one request message; the future gives the reply's bytes or
        raises :class:`RpcError` with the server's status."""
        protocol = self._protocol
        if protocol is None:
            raise RuntimeError("the channel is not connected")
        if protocol.lost is not None:
            raise protocol.lost
        if isinstance(path, str):
            path = path.encode()
        future = protocol.loop.create_future()
        try:
            call = protocol.h2.start_call(path, self.authority, payload, metadata, timeout)
        except H2Error as exc:  # e.g. the server has sent GOAWAY: no new streams
            raise RpcError(GrpcStatus.UNAVAILABLE, f"cannot start a call: {exc}") from None
        call.tag = future
        protocol.flush()
        return future

    async def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None
