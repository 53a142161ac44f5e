"""``inference.GRPCInferenceService``: the RPCs of the Open Inference Protocol over gRPC.

All nine RPCs of the protocol and Triton's ``ModelStreamInfer``, ``ModelConfig``,
``ModelStatistics`` and ``SystemSharedMemory*`` (:mod:`mip.frontends.oip.shm`; the
``CudaSharedMemory*`` calls are answered UNIMPLEMENTED), with ``grpc.health.v1`` and
reflection beside them. :func:`methods` lists them for a transport to serve
(:mod:`mip.frontends.oip.grpc` wires them to either); the messages of inference are read
and written by :mod:`mip.frontends.oip.grpc_codec`.

Errors: a :class:`~mip.errors.ServingError` ends the call with its ``grpc_status`` (a
:class:`~mip.errors.GrpcStatus`, the same on either transport: NOT_FOUND, INVALID_ARGUMENT,
UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ...).
A cancelled call cancels its engine request, which leaves the batch queue.

Credentials: with a :class:`~mip.frontends.auth.Guard`, the RPCs of the areas it protects
(:data:`RPC_AREAS`) read ``authorization: Bearer KEY`` or ``x-api-key: KEY`` from the call's
metadata and end with UNAUTHENTICATED without credentials that verify, or with
RESOURCE_EXHAUSTED (trailing metadata ``retry-after``, in seconds) from an address past
its failure budget. Liveness, readiness, ``grpc.health.v1`` and reflection never ask.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from mip.errors import (GrpcStatus, RpcError, ServingError, TooLarge, TooManyAuthFailures,
                        Unauthenticated)
from mip.frontends.dataplane import DataPlane, timeout_parameter
from mip.frontends.oip import grpc_codec as wire
from mip.frontends.oip import inference_pb2 as pb
from mip.frontends.oip import shm
from mip.frontends.oip.health import HEALTH_SERVICE, REFLECTION_SERVICES, Health, reflection
from mip.protocol.oip import write_infer_reply
from mip.net.peers import grpc_peer_host

__all__ = ["RPC_AREAS", "SERVICE", "STREAM_WINDOW", "InferenceService", "Rpc", "methods"]

log = logging.getLogger("mip.frontends.oip.grpc")

SERVICE = "inference.GRPCInferenceService"
#: requests of one ModelStreamInfer stream in the engine at once; the stream's next
#: request is read when one finishes.
STREAM_WINDOW = 64
#: the area (see mip.frontends.auth.AREAS) of each RPC of the KServe v2 service that may
#: need credentials; ServerLive, ServerReady, ModelReady, health and reflection are open.
RPC_AREAS = {
    "ModelInfer": "inference", "ModelStreamInfer": "inference",
    "ServerMetadata": "metadata", "ModelMetadata": "metadata", "ModelConfig": "metadata",
    "RepositoryIndex": "control", "RepositoryModelLoad": "control",
    "RepositoryModelUnload": "control", "ModelStatistics": "metrics",
    **{f"{kind}SharedMemory{call}": "inference" for kind in ("System", "Cuda")
       for call in ("Status", "Register", "Unregister")},
}
_REQUEST_ID = "x-request-id"  # metadata: echoed in the trailing metadata, logged


class InferenceService:
    """The RPC implementations; each takes a request and the call's context (grpc.aio's,
    or :class:`mip.net.grpc_server.Context`, which has the same methods).

    Args:
        dataplane: what every frontend's requests go through.
        max_message_size: largest request and reply, in octets.
        guard: a :class:`~mip.frontends.auth.Guard`, or ``None``: every RPC is open.
        shared_memory: the :class:`~mip.frontends.oip.shm.SystemSharedMemory` regions
            (``None``: those every frontend of the engine shares).
    """

    def __init__(self, dataplane: DataPlane, max_message_size: int, guard=None,
                 shared_memory: shm.SystemSharedMemory | None = None):
        self.guard = guard
        self.dataplane = dataplane
        self.engine = dataplane.engine
        self.shm = shm.registry_of(self.engine, shared_memory)
        self.max_message_size = max_message_size
        self.health = Health(self.engine, [SERVICE])
        self.reflection = reflection(pb.POOL, [SERVICE, HEALTH_SERVICE, *REFLECTION_SERVICES])

    # -- health and metadata ------------------------------------------------------------

    async def server_live(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request, context):
        return pb.ServerReadyResponse(ready=self.engine.ready())

    async def model_ready(self, request, context):
        return pb.ModelReadyResponse(ready=self.engine.model_ready(request.name,
                                                                   request.version or None))

    async def server_metadata(self, request, context):
        return pb.ServerMetadataResponse(**self.dataplane.server_metadata())

    async def model_metadata(self, request, context):
        meta = await self._call(context, self.engine.model_metadata, request.name,
                                request.version or None)
        response = pb.ModelMetadataResponse(name=meta.name, versions=meta.versions,
                                            platform=meta.platform)
        for specs, target in ((meta.inputs, response.inputs), (meta.outputs, response.outputs)):
            for spec in specs:
                target.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        return response

    # -- repository ---------------------------------------------------------------------

    async def repository_index(self, request, context):
        response = pb.RepositoryIndexResponse()
        for entry in self.engine.index():
            if request.ready and str(entry.state) != "READY":
                continue
            response.models.add(name=entry.name, version=entry.version, state=str(entry.state),
                                reason=entry.reason)
        return response

    async def repository_model_load(self, request, context):
        await self._call(context, self.dataplane.load, request.model_name,
                         wire.plain(request.parameters))
        return pb.RepositoryModelLoadResponse()

    async def repository_model_unload(self, request, context):
        await self._call(context, self.engine.unload, request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # -- Triton's configuration and statistics extensions --------------------------------

    async def model_config(self, request, context):
        config = await self._call(context, self.dataplane.model_config, request.name,
                                  request.version)
        response = pb.ModelConfigResponse()
        response.config.CopyFrom(config)
        return response

    async def model_statistics(self, request, context):
        stats = await self._call(context, self.dataplane.statistics, request.name,
                                 request.version)
        return json_format.ParseDict(stats, pb.ModelStatisticsResponse())

    # -- Triton's shared-memory extensions ----------------------------------------------

    async def system_shared_memory_register(self, request, context):
        await self._call(context, self.shm.register, request.name, request.key, request.offset,
                         request.byte_size, grpc_peer_host(context.peer()))
        return pb.SystemSharedMemoryRegisterResponse()

    async def system_shared_memory_unregister(self, request, context):
        await self._call(context, self.shm.unregister, request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def system_shared_memory_status(self, request, context):
        response = pb.SystemSharedMemoryStatusResponse()
        for region in await self._call(context, self.shm.status, request.name):
            response.regions[region["name"]].MergeFrom(
                pb.SystemSharedMemoryStatusResponse.RegionStatus(**region))
        return response

    async def cuda_shared_memory(self, request, context):
        await self._abort(context, shm.cuda_unsupported())

    # -- inference ----------------------------------------------------------------------

    def model_infer(self, data: bytes | memoryview, context) -> asyncio.Future:
        """ModelInfer, on either transport: the serialized request goes into the batch
        queue and the reply is encoded in the callback that completes it; returns a future
        of the serialized reply (bytes, or a list of buffers whose concatenation it is).
        Errors come as :class:`~mip.errors.RpcError` with the gRPC status of the
        :class:`~mip.errors.ServingError` (raised at once, or set on the future).

        A request refused here is reported to the access log. An ``x-request-id`` in the
        call's metadata comes back in its trailing metadata and names the request (else
        its ``id`` does)."""
        started = time.perf_counter()
        metadata = context.invocation_metadata()
        request_id = _metadata_request_id(metadata) if metadata else None
        if request_id is not None:
            context.set_trailing_metadata(((_REQUEST_ID, request_id),))
        try:
            return self._queue(data, context, started, request_id)
        except Exception as exc:
            if self.dataplane.access_log is not None:
                self._refused(data, context, exc, started, request_id)
            if isinstance(exc, ServingError):
                raise _rpc_error(exc) from None
            raise

    def _refused(self, data: bytes | memoryview, context, exc: Exception, started: float,
                 request_id: str | None) -> None:
        """Report a request :meth:`_queue` refused (read again for its model's name)."""
        request = wire.parse_request_header(data) if len(data) <= self.max_message_size else None
        self.dataplane.refused("grpc", request and request.model_name,
                               request and request.model_version, exc, peer=context.peer(),
                               request_id=request_id or (request and request.id) or None,
                               started=started)

    def _queue(self, data: bytes | memoryview, context, started: float,
               request_id: str | None) -> asyncio.Future:
        limit = self.max_message_size
        if len(data) > limit:
            raise TooLarge(f"request of {len(data)} octets is over the gRPC message limit "
                           f"of {limit} octets (--grpc-max-message-size)")
        plain = wire.read_plain_request(data)
        if plain is None:
            return self._queue_parsed(data, context, started, request_id)
        # the common request: raw tensors, no parameters (no protobuf on either side)
        model, version, rid, inputs, outputs = plain

        def then(result):
            reply = write_infer_reply(result.model, result.version, rid, result.outputs)
            if reply is None:  # an output it does not write (BYTES, BF16, strided): protobuf
                reply = wire.encode_reply(pb.ModelInferRequest(id=rid), result, True)
            return reply if type(reply) is bytes and len(reply) <= limit else _within(reply, limit)

        peer = context.peer()
        return self.dataplane.submit("grpc", model, version, inputs, outputs,
                                     context.time_remaining(), then=then, error=_rpc_error,
                                     source=grpc_peer_host(peer), peer=peer,
                                     request_id=rid if request_id is None and rid else request_id,
                                     started=started)

    def _queue_parsed(self, data: bytes | memoryview, context, started: float,
                      request_id: str | None) -> asyncio.Future:
        """:meth:`_queue` for every other request: read with protobuf."""
        request, rest, raws = wire.parse_request(data)
        if request_id is None and request.id:
            request_id = request.id
        classes = wire.extension_parameters(request, rest)
        shared = b"shared_memory_" in rest  # else no tensor can be in shared memory
        inputs = wire.read_inputs(request, raws, self.shm if shared else None)
        targets = {o.name: self.shm.output(o.name, wire.plain(o.parameters))
                   for o in request.outputs
                   if "shared_memory_region" in o.parameters} if shared else None
        outputs = [o.name for o in request.outputs] or None
        timeout = None
        if "timeout" in request.parameters:
            timeout = timeout_parameter(wire.parameter(request.parameters["timeout"]))
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = remaining if timeout is None else min(timeout, remaining)
        raw = bool(len(raws)) or shared and not any(t.HasField("contents")
                                                     for t in request.inputs)
        limit = self.max_message_size

        def then(result):
            return _within(wire.encode_reply(request, result, raw, targets), limit)

        peer = context.peer()
        return self.dataplane.submit("grpc", request.model_name, request.model_version,
                                     inputs, outputs, timeout, then=then, error=_rpc_error,
                                     classes=classes, source=grpc_peer_host(peer), peer=peer,
                                     request_id=request_id, started=started)

    async def model_stream_infer(self, request_iterator: AsyncIterator[bytes], context):
        """Answer every request of the stream; requests run concurrently (up to
        :data:`STREAM_WINDOW`), so replies may come out of order (match them by ``id``)."""
        replies: asyncio.Queue = asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)
        running: set[asyncio.Future] = set()

        async def answer(data: bytes | memoryview) -> None:
            try:
                replies.put_nowait(wire.stream_reply(await self.model_infer(data, context)))
            except Exception as exc:  # every request gets an answer on the stream
                said = str(exc)
                if not isinstance(exc, RpcError):
                    log.exception("stream request failed")
                    said = f"internal error: {type(exc).__name__}: {exc}"
                replies.put_nowait(wire.stream_error(said, data))
            finally:
                window.release()

        async def read() -> None:
            async for data in request_iterator:
                await window.acquire()
                task = asyncio.ensure_future(answer(data))
                running.add(task)
                task.add_done_callback(running.discard)
            if running:
                await asyncio.gather(*list(running), return_exceptions=True)

        reader = asyncio.ensure_future(read())
        reader.add_done_callback(lambda _: replies.put_nowait(None))
        try:
            while True:
                reply = await replies.get()
                if reply is None:
                    break
                yield reply
            reader.result()  # re-raise a read error, if any
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    # -- credentials --------------------------------------------------------------------

    def protects(self, path: str) -> bool:
        """Whether calls of ``path`` (``/package.Service/Method``) need credentials."""
        if self.guard is None or not path.startswith(f"/{SERVICE}/"):
            return False
        return self.guard.protects(RPC_AREAS.get(path[len(SERVICE) + 2:]))

    def guarded(self, kind: str, function: Callable) -> Callable:
        """``function`` (an RPC of ``kind``: ``unary``, ``stream`` or ``future``, as
        :func:`methods` names them) behind the guard's check of the call's metadata."""
        if kind == "unary":
            async def unary(request, context):
                await self._authenticate(context)
                return await function(request, context)
            return unary
        if kind == "stream":
            async def stream(requests, context):
                await self._authenticate(context)
                async for reply in function(requests, context):
                    yield reply
            return stream
        guard = self.guard

        async def checked_first(data, context):
            try:
                await guard.authenticate(*_credentials(context))
            except (Unauthenticated, TooManyAuthFailures) as exc:
                raise _rpc_error(exc) from None
            return await function(data, context)

        def start(data, context):
            if not guard.immediate:
                return asyncio.ensure_future(checked_first(data, context))
            try:
                guard.authenticate_now(*_credentials(context))
            except (Unauthenticated, TooManyAuthFailures) as exc:
                raise _rpc_error(exc) from None
            return function(data, context)
        return start

    async def _authenticate(self, context) -> None:
        """End the call (UNAUTHENTICATED, or RESOURCE_EXHAUSTED with ``retry-after``) unless
        its metadata carries credentials the guard accepts."""
        guard = self.guard
        try:
            if guard.immediate:
                guard.authenticate_now(*_credentials(context))
            else:
                await guard.authenticate(*_credentials(context))
        except (Unauthenticated, TooManyAuthFailures) as exc:
            await self._abort(context, exc)

    # -- errors -------------------------------------------------------------------------

    async def _call(self, context, function, *args) -> Any:
        try:
            result = function(*args)
            if asyncio.iscoroutine(result):
                result = await result
            return result
        except ServingError as exc:
            await self._abort(context, exc)

    @staticmethod
    async def _abort(context, exc: ServingError) -> None:
        await context.abort(status_code(exc.grpc_status), str(exc), _trailers(exc))


def status_code(code: GrpcStatus | int) -> grpc.StatusCode:
    """grpcio's ``StatusCode`` of a gRPC status (either transport's ``context.abort`` takes
    it)."""
    return getattr(grpc.StatusCode, GrpcStatus.of(code).name)


def _trailers(exc: ServingError) -> tuple:
    """The trailing metadata of an error: ``retry-after`` (seconds) when it has one."""
    retry_after = getattr(exc, "retry_after", None)
    return () if retry_after is None else (("retry-after", str(retry_after)),)


def _credentials(context) -> tuple[dict, str | None]:
    """``(headers, host)`` for :meth:`Guard.authenticate`: the call's ``authorization``
    and ``x-api-key`` metadata and the client's address."""
    headers = {}
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" or key == "x-api-key":
            headers[key] = value
    return headers, grpc_peer_host(context.peer())


def _rpc_error(exc: BaseException) -> BaseException:
    """A ServingError as an RpcError with its gRPC status; others as they are (the
    transport answers INTERNAL)."""
    if not isinstance(exc, ServingError):
        return exc
    return RpcError(exc.grpc_status, str(exc), _trailers(exc))


def _within(reply: bytes | list, limit: int) -> bytes | list:
    """``reply`` (bytes, or a list of buffers), refused when over ``limit`` octets."""
    size = len(reply) if type(reply) is bytes else sum(map(len, reply))
    if size > limit:
        raise TooLarge(f"reply of {size} octets is over the gRPC message limit of "
                       f"{limit} octets (--grpc-max-message-size)")
    return reply


def _metadata_request_id(metadata) -> str | None:
    """The ``x-request-id`` of a call's metadata, or ``None``."""
    for key, value in metadata:
        if key == _REQUEST_ID:
            return value if isinstance(value, str) else None
    return None


class Rpc(NamedTuple):
    """One RPC of the listener, for a transport to serve.

    ``kind``: ``unary`` (``await function(request, context)``), ``future`` (ModelInfer:
    ``function(bytes, context)`` returns a future of the reply, see
    :meth:`InferenceService.model_infer`), ``server_stream`` (an async generator of replies
    to one request) or ``stream`` (an async generator of replies over an async iterator
    of requests). ``request_deserializer`` / ``response_serializer``: ``None`` for bytes.
    """

    path: str
    kind: str
    function: Callable
    request_deserializer: Callable[[bytes], Any] | None
    response_serializer: Callable[[Any], bytes] | None


def methods(service: InferenceService) -> list[Rpc]:
    """Every RPC of the listener: the KServe v2 service, health and reflection; those of
    the areas the service's guard protects check the call's credentials first."""
    def kserve(name: str, function: Callable, request_type=None, response_type=None,
               kind: str = "unary") -> tuple:
        return f"/{SERVICE}/{name}", kind, function, request_type, response_type

    health, reflector = service.health, service.reflection
    table = [
        kserve("ServerLive", service.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
        kserve("ServerReady", service.server_ready, pb.ServerReadyRequest,
               pb.ServerReadyResponse),
        kserve("ModelReady", service.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
        kserve("ServerMetadata", service.server_metadata, pb.ServerMetadataRequest,
               pb.ServerMetadataResponse),
        kserve("ModelMetadata", service.model_metadata, pb.ModelMetadataRequest,
               pb.ModelMetadataResponse),
        kserve("ModelInfer", service.model_infer, kind="future"),
        kserve("ModelStreamInfer", service.model_stream_infer, kind="stream"),
        kserve("RepositoryIndex", service.repository_index, pb.RepositoryIndexRequest,
               pb.RepositoryIndexResponse),
        kserve("RepositoryModelLoad", service.repository_model_load,
               pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse),
        kserve("RepositoryModelUnload", service.repository_model_unload,
               pb.RepositoryModelUnloadRequest, pb.RepositoryModelUnloadResponse),
        kserve("ModelConfig", service.model_config, pb.ModelConfigRequest,
               pb.ModelConfigResponse),
        kserve("ModelStatistics", service.model_statistics, pb.ModelStatisticsRequest,
               pb.ModelStatisticsResponse),
        *(kserve(f"SystemSharedMemory{call}", function,
                 getattr(pb, f"SystemSharedMemory{call}Request"),
                 getattr(pb, f"SystemSharedMemory{call}Response"))
          for call, function in (("Status", service.system_shared_memory_status),
                                 ("Register", service.system_shared_memory_register),
                                 ("Unregister", service.system_shared_memory_unregister))),
        *(kserve(f"CudaSharedMemory{call}", service.cuda_shared_memory,
                 getattr(pb, f"CudaSharedMemory{call}Request"),
                 getattr(pb, f"CudaSharedMemory{call}Response"))
          for call in ("Status", "Register", "Unregister")),
        (f"/{HEALTH_SERVICE}/Check", "unary", health.check, health_pb2.HealthCheckRequest,
         health_pb2.HealthCheckResponse),
        (f"/{HEALTH_SERVICE}/Watch", "server_stream", health.watch,
         health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse),
        *((f"/{name}/ServerReflectionInfo", "stream", reflector.ServerReflectionInfo,
           reflection_pb2.ServerReflectionRequest, reflection_pb2.ServerReflectionResponse)
          for name in REFLECTION_SERVICES),
    ]
    return [Rpc(path, kind, service.guarded(kind, function) if service.protects(path)
                else function,
                request_type and request_type.FromString,
                response_type and response_type.SerializeToString)
            for path, kind, function, request_type, response_type in table]
