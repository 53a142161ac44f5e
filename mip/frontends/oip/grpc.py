"""The gRPC listener of the Open Inference Protocol: :class:`GrpcServer`.

It serves ``inference.GRPCInferenceService`` (:mod:`mip.frontends.oip.grpc_service`, with
health and reflection) on one of two transports (:data:`IMPLEMENTATIONS`): mip's own
HTTP/2 on libnghttp2 (``native``: :mod:`mip.net.grpc_server`, the default where it is
built) or grpcio's asyncio server (``grpcio``, ``mip serve --grpc-impl grpcio``). This
module is the wiring: each RPC of :func:`~mip.frontends.oip.grpc_service.methods` becomes
a handler of the transport chosen, and the listener gets its address, TLS and limits.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from mip.errors import NotAvailable, RpcError
from mip.frontends.dataplane import DataPlane
from mip.frontends.oip.grpc_service import (RPC_AREAS, STREAM_WINDOW, InferenceService, Rpc,
                                            methods, status_code)
from mip.net import tls
from mip.net.grpc_limits import GrpcLimits
from mip.net.urls import TcpAddress, tcp_address

__all__ = ["DEFAULT_MAX_MESSAGE_SIZE", "IMPLEMENTATIONS", "RPC_AREAS", "STREAM_WINDOW",
           "GrpcServer", "native_available", "native_unavailable_reason"]

log = logging.getLogger("mip.frontends.oip.grpc")

#: largest request or reply message, in octets, unless configured.
DEFAULT_MAX_MESSAGE_SIZE = 64 << 20
#: ``native``: mip's own HTTP/2 transport on libnghttp2 (the default where it is built);
#: ``grpcio``: grpcio's asyncio server.
IMPLEMENTATIONS = ("native", "grpcio")
_MAX_GRPC_LIMIT = (1 << 31) - 1


def native_available() -> bool:
    """Whether the native HTTP/2 transport (``mip.protocol.h2``, libnghttp2) can be used."""
    return native_unavailable_reason() is None


def native_unavailable_reason() -> str | None:
    """Why the native transport cannot be used here (None: it can): not built, or built
    but its run-time library (libnghttp2.so.14) is missing."""
    try:
        import mip.protocol.h2  # noqa: F401
    except ModuleNotFoundError:
        return ("mip was built without the native gRPC transport (MIP_NO_NATIVE_GRPC=1, or "
                "libnghttp2's headers were missing when it was built)")
    except ImportError as exc:  # the extension is there; a library it links is not
        return (f"the run-time library libnghttp2 is missing ({exc}): install it (Debian, "
                "Ubuntu: libnghttp2-14; Fedora: libnghttp2; Alpine: nghttp2-libs)")
    return None


# -- the native transport -----------------------------------------------------------------

def _native_methods(rpcs: list[Rpc]) -> dict:
    from mip.net.grpc_server import stream_stream, unary, unary_future

    handlers: dict[str, Callable[[Rpc], Any]] = {
        "unary": lambda rpc: unary(rpc.function, rpc.request_deserializer,
                                   rpc.response_serializer),
        "future": lambda rpc: unary_future(rpc.function),
        # on HTTP/2 a server stream is a bidirectional one that reads one request
        "server_stream": lambda rpc: stream_stream(_first_request(rpc.function),
                                                   rpc.request_deserializer,
                                                   rpc.response_serializer),
        "stream": lambda rpc: stream_stream(rpc.function, rpc.request_deserializer,
                                            rpc.response_serializer),
    }
    return {rpc.path: handlers[rpc.kind](rpc) for rpc in rpcs}


def _first_request(handler):
    """A server-streaming ``handler(request, context)`` as a streaming one."""
    async def stream(requests, context):
        async for request in requests:
            async for reply in handler(request, context):
                yield reply
            return
    return stream


# -- grpcio -----------------------------------------------------------------------------

def _grpcio_handlers(rpcs: list[Rpc]) -> list[grpc.GenericRpcHandler]:
    """grpcio's handlers of every RPC, one generic handler a service."""
    handlers: dict[str, Callable[[Rpc], Any]] = {
        "unary": lambda rpc: grpc.unary_unary_rpc_method_handler(
            rpc.function, rpc.request_deserializer, rpc.response_serializer),
        "future": lambda rpc: grpc.unary_unary_rpc_method_handler(_awaited(rpc.function)),
        "server_stream": lambda rpc: grpc.unary_stream_rpc_method_handler(
            rpc.function, rpc.request_deserializer, rpc.response_serializer),
        "stream": lambda rpc: grpc.stream_stream_rpc_method_handler(
            rpc.function, rpc.request_deserializer, rpc.response_serializer),
    }
    by_service: dict[str, dict] = {}
    for rpc in rpcs:
        name, method = rpc.path[1:].rsplit("/", 1)
        by_service.setdefault(name, {})[method] = handlers[rpc.kind](rpc)
    return [grpc.method_handlers_generic_handler(name, each)
            for name, each in by_service.items()]


def _awaited(start: Callable):
    """A ``future`` RPC (``start(bytes, context)`` returns a future of the reply, raising
    RpcError) as grpcio's coroutine handler."""
    async def handler(data: bytes | memoryview, context):
        try:
            reply = await start(data, context)
        except RpcError as exc:
            await context.abort(status_code(exc.code), exc.details, exc.trailers)
        return b"".join(reply) if isinstance(reply, list) else reply
    return handler


def _grpcio_credentials(cert: str, key: str | None, ca: str | None
                        ) -> grpc.ServerCredentials:
    """grpcio's server credentials (grpcio takes PEM octets, not an SSLContext)."""
    chain = Path(cert).read_bytes()
    private = Path(key).read_bytes() if key else None
    roots = Path(ca).read_bytes() if ca else None
    return grpc.ssl_server_credentials([(private, chain)], root_certificates=roots,
                                       require_client_auth=roots is not None)


class GrpcServer:
    """The gRPC listener of the Open Inference Protocol.

    Args:
        engine: the :class:`~mip.serving.engine.Engine` every frontend shares.
        metrics: a :class:`~mip.frontends.oip.metrics.Metrics` to count requests in.
        max_message_size: largest request and reply, in octets. Requests up to twice this
            size are read and refused with RESOURCE_EXHAUSTED naming the setting; larger
            ones are cut off by gRPC itself while they arrive.
        request_timeout: seconds a request may take, queueing included (``None``: only
            the client's own deadline applies).
        tls_cert / tls_key / tls_ca: serve TLS with this certificate and key; with
            ``tls_ca``, require client certificates signed by it.
        implementation: ``native`` (mip's HTTP/2 transport), ``grpcio``, or ``None`` for
            native where it is built and grpcio otherwise.
        limits: the connections' bounds (:class:`~mip.net.grpc_limits.GrpcLimits`); grpcio
            is given those it has a setting for.
        guard: a :class:`~mip.frontends.auth.Guard` whose protected areas need credentials
            in the call's metadata (``None``: every RPC is open).
        access_log: an :class:`~mip.frontends.access.AccessLog` for the inference
            requests, or ``None``.
        shared_memory: the :class:`~mip.frontends.oip.shm.SystemSharedMemory` regions
            (``None``: those every frontend of ``engine`` shares).
        message_memory: native transport: where large request messages are received (the
            shared arena of ``mip serve --placement shared``, so that the engine process
            reads their tensors in place; see :class:`mip.net.grpc_server.GrpcServer`).
    """

    def __init__(self, engine, *, metrics=None, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                 request_timeout: float | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, tls_ca: str | None = None,
                 implementation: str | None = None, limits: GrpcLimits | None = None,
                 guard=None, access_log=None, shared_memory=None, message_memory=None):
        if max_message_size <= 0:
            raise ValueError("max_message_size must be positive")
        if tls_cert and not tls_key:
            raise ValueError("TLS needs both a certificate and its key")
        unavailable = native_unavailable_reason()
        if implementation is None:
            implementation = "grpcio" if unavailable else "native"
            if unavailable:
                log.warning("%s: serving gRPC through grpcio", unavailable)
        elif implementation not in IMPLEMENTATIONS:
            raise ValueError(f"gRPC implementation must be one of {', '.join(IMPLEMENTATIONS)}, "
                             f"not {implementation!r}")
        elif implementation == "native" and unavailable:
            raise NotAvailable(f"the native gRPC transport cannot be used: {unavailable}; "
                               "or serve gRPC through grpcio with --grpc-impl grpcio")
        self.implementation = implementation
        self.dataplane = DataPlane(engine, metrics, request_timeout, access_log)
        self.max_message_size = max_message_size
        self.limits = limits or GrpcLimits()
        self.guard = guard
        self.shared_memory = shared_memory
        self.message_memory = message_memory
        self.tls_cert, self.tls_key, self.tls_ca = tls_cert or None, tls_key, tls_ca
        self._server: Any = None  # grpcio's aio.Server or mip.net.grpc_server.GrpcServer
        self._service: InferenceService | None = None
        self.address: str | None = None

    async def start(self, address: str, sock: socket.socket | None = None) -> str:
        """Listen on ``HOST:PORT`` (port 0: a free port), or accept on ``sock``, a listening
        socket bound to it elsewhere (native transport only); returns the bound
        ``HOST:PORT``."""
        where = tcp_address(address, "gRPC address")
        if self.implementation != "native" and sock is not None:
            raise NotAvailable("the grpcio transport binds its own sockets and cannot serve "
                               "one bound by another process (as every worker of --workers "
                               "does): use --grpc-impl native")
        self._service = InferenceService(self.dataplane, self.max_message_size, self.guard,
                                         self.shared_memory)
        rpcs = methods(self._service)
        if self.implementation == "native":
            port = await self._start_native(rpcs, where.host, where.port, sock)
        else:
            port = await self._start_grpcio(rpcs, where.hostport)
        self.address = TcpAddress(where.host, port).hostport
        return self.address

    async def _start_native(self, rpcs: list[Rpc], host: str, port: int,
                            sock: socket.socket | None) -> int:
        from mip.net.grpc_server import GrpcServer as Transport

        context = None
        if self.tls_cert is not None:
            context = tls.server_context(self.tls_cert, self.tls_key, client_ca=self.tls_ca,
                                         alpn=["h2"])
        limit = self.max_message_size
        server = Transport(
            _native_methods(rpcs), max_message_size=limit, ssl=context, limits=self.limits,
            too_large=lambda n: (f"request of {n} octets is over the gRPC message limit of "
                                 f"{limit} octets (--grpc-max-message-size)"),
            message_memory=self.message_memory)
        _, bound = await server.start(host, port, sock)
        self._server = server
        return bound

    async def _start_grpcio(self, rpcs: list[Rpc], address: str) -> int:
        limit = min(2 * self.max_message_size, _MAX_GRPC_LIMIT)
        server = aio.server(options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
            *self.limits.grpcio_options(),
        ])
        server.add_generic_rpc_handlers(_grpcio_handlers(rpcs))
        if self.tls_cert is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(
                address, _grpcio_credentials(self.tls_cert, self.tls_key, self.tls_ca))
        if not bound:
            raise OSError(f"cannot listen for gRPC on {address}")
        await server.start()
        self._server = server
        return bound

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop accepting calls; calls in progress get ``grace`` seconds to finish (health
        answers NOT_SERVING from now on, and its watchers are told so and end)."""
        if self._service is not None:
            self._service.health.close()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
