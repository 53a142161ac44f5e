"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService``.

Two transports carry the one service (:data:`IMPLEMENTATIONS`): mip's own HTTP/2 on
libnghttp2 (``native``: :mod:`mip.net.grpc_server`, the default where it is built) and
grpcio's asyncio server (``grpcio``, ``mip serve --grpc-impl grpcio``).

All nine RPCs of the protocol and Triton's ``ModelStreamInfer``, ``ModelConfig``,
``ModelStatistics`` and ``SystemSharedMemory*`` (:mod:`mip.frontends.oip.shm`; the
``CudaSharedMemory*`` calls are answered UNIMPLEMENTED). Inference requests are
read as bytes: the raw tensor fields (``raw_input_contents``) are located in the received
message and handed to the engine as numpy views of it, and the reply's raw tensor fields
are appended to the serialized reply header, so tensor octets are not copied by protobuf.
A request that used ``raw_input_contents`` is answered with ``raw_output_contents``;
one that used typed ``contents`` is answered with typed contents (FP16/BF16 outputs, which
have no typed form, make the reply raw).

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
import socket
import time

import grpc
import numpy as np
from google.protobuf import json_format
from grpc import aio
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from mip.errors import (InvalidInput, NotAvailable, RpcError, ServingError, TooLarge,
                        TooManyAuthFailures, Unauthenticated)
from mip.frontends.oip import codec, shm
from mip.frontends.oip import inference_pb2 as pb
from mip.frontends.oip.health import HEALTH_SERVICE, REFLECTION_SERVICES, Health, reflection
from mip.frontends.dataplane import DataPlane, timeout_parameter
from mip.net.grpc_limits import GrpcLimits
from mip.net.peers import grpc_peer_host
from mip.protocol.dtypes import BY_NAME, TABLE

__all__ = ["DEFAULT_MAX_MESSAGE_SIZE", "IMPLEMENTATIONS", "RPC_AREAS", "STREAM_WINDOW",
           "GrpcServer", "native_available", "native_unavailable_reason"]

log = logging.getLogger("mip.frontends.oip.grpc")

#: largest request or reply message, in octets, unless configured.
DEFAULT_MAX_MESSAGE_SIZE = 64 << 20
#: requests of one ModelStreamInfer stream in the engine at once; the stream's next
#: request is read when one finishes.
STREAM_WINDOW = 64
_SERVICE = "inference.GRPCInferenceService"
_MAX_GRPC_LIMIT = (1 << 31) - 1

# Typed contents: the field of InferTensorContents for each datatype that has one (from
# the datatype table), and the numpy type the field's values are read as before the range
# check (None: BYTES, read as a list).
_FIELD_TYPES = {"bool_contents": np.bool_, "int_contents": np.int32,
                "int64_contents": np.int64, "uint_contents": np.uint32,
                "uint64_contents": np.uint64, "fp32_contents": np.float32,
                "fp64_contents": np.float64, "bytes_contents": None}
_CONTENTS = {d.name: (d.contents, _FIELD_TYPES[d.contents]) for d in TABLE if d.contents}
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
_RAW_INPUT_FIELD = 7  # ModelInferRequest.raw_input_contents
#: requests shorter than this are parsed whole by protobuf (copying raw contents out is
#: cheaper than locating them); longer ones have their raw contents viewed in place.
_SPLIT_ABOVE = 64 << 10
_RAW_OUTPUT_TAG = b"\x32"  # ModelInferResponse.raw_output_contents: field 6, length-delimited
_STREAM_RESPONSE_TAG = b"\x12"  # ModelStreamInferResponse.infer_response: field 2
_REQUEST_ID = "x-request-id"  # metadata: echoed in the trailing metadata, logged


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise InvalidInput("malformed ModelInferRequest: bad varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def split_raw_inputs(data: bytes) -> tuple[bytes, list[memoryview]]:
    """Separate a serialized ModelInferRequest's ``raw_input_contents`` from the rest.

    Returns ``(rest, raws)``: the message without those fields (to parse with protobuf)
    and each raw content as a view of ``data``, in order.

    Raises:
        InvalidInput: the top-level fields do not parse.
    """
    view = memoryview(data)
    end = len(data)
    pos = 0
    raws: list[memoryview] = []
    kept: list[memoryview] = []
    kept_from = 0
    while pos < end:
        start = pos
        key, pos = _read_varint(data, pos, end)
        wire = key & 7
        if wire == 0:
            _, pos = _read_varint(data, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _read_varint(data, pos, end)
            if length > end - pos:
                raise InvalidInput("malformed ModelInferRequest: a field runs past the end")
            if key >> 3 == _RAW_INPUT_FIELD:
                raws.append(view[pos:pos + length])
                kept.append(view[kept_from:start])
                kept_from = pos + length
            pos += length
        else:
            raise InvalidInput(f"malformed ModelInferRequest: wire type {wire}")
        if pos > end:
            raise InvalidInput("malformed ModelInferRequest: a field runs past the end")
    if not raws:
        return data, raws
    kept.append(view[kept_from:end])
    return b"".join(kept), raws


def _parameter(value: pb.InferParameter):
    which = value.WhichOneof("parameter_choice")
    return None if which is None else getattr(value, which)


def _plain(parameters) -> dict:
    """A protobuf map of InferParameter as name -> plain value."""
    return {key: _parameter(value) for key, value in parameters.items()}


def _extension_parameters(request, serialized: bytes) -> dict[str, int] | None:
    """:func:`codec.check_parameters` of a ModelInferRequest. Skipped when none of the
    parameter names it acts on occurs in ``serialized`` (the message without its raw
    contents): the common case, found without reading the protobuf maps (which costs
    microseconds a tensor)."""
    if (b"sequence_" not in serialized and b"priority" not in serialized
            and b"classification" not in serialized):
        return None
    tensors = [(t.name, t.parameters) for t in request.inputs if t.parameters]
    wanted = [(o.name, o.parameters) for o in request.outputs if o.parameters]
    if not (request.parameters or tensors or wanted):
        return None
    return codec.check_parameters(_plain(request.parameters),
                                  {name: _plain(p) for name, p in tensors},
                                  {name: _plain(p) for name, p in wanted})


def _from_contents(tensor) -> np.ndarray:
    name, datatype = tensor.name, tensor.datatype
    shape = codec.check_shape(tensor.shape, name)
    entry = _CONTENTS.get(datatype)
    if entry is None:
        if datatype in BY_NAME:  # a datatype without typed contents (FP16, BF16)
            raise InvalidInput(f"input {name!r}: {datatype} has no typed contents; send it "
                               "in raw_input_contents")
        codec.numpy_dtype(datatype, f"input {name!r}")  # raises for unknown names
    field, wide = entry
    values = getattr(tensor.contents, field)
    count = codec.element_count(shape)
    if len(values) != count:
        raise InvalidInput(f"input {name!r}: shape {list(shape)} holds {count} elements, "
                           f"{len(values)} were sent in {field}")
    if wide is None:
        return codec.from_list(name, datatype, shape, list(values))
    array = np.fromiter(values, dtype=wide, count=count)
    target = codec.numpy_dtype(datatype)
    if target != array.dtype:
        info = np.iinfo(target)
        if count and (array.min() < info.min or array.max() > info.max):
            raise InvalidInput(f"input {name!r}: a value does not fit {datatype}")
        array = array.astype(target)
    return array.reshape(shape)


def _typed_contents(contents: pb.InferTensorContents, datatype: str, array: np.ndarray,
                    name: str) -> None:
    field, _ = _CONTENTS[datatype]
    if datatype == "BYTES":
        contents.bytes_contents.extend(codec.bytes_elements(array, name))
    else:
        getattr(contents, field).extend(array.ravel().tolist())


class _Service:
    """The RPC implementations; each takes a request and the call's context."""

    def __init__(self, dataplane: DataPlane, max_message_size: int, guard=None,
                 shared_memory=None):
        self.guard = guard
        self.dataplane = dataplane
        self.engine = dataplane.engine
        self.shm = shm.registry_of(self.engine, shared_memory)
        self.max_message_size = max_message_size
        self.health = Health(self.engine, [_SERVICE])
        self.reflection = reflection(pb.POOL, [_SERVICE, HEALTH_SERVICE, *REFLECTION_SERVICES])

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
        parameters = {key: _parameter(value) for key, value in request.parameters.items()}
        await self._call(context, self.dataplane.load, request.model_name, parameters)
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

    async def model_infer(self, data: bytes, context) -> bytes:
        try:
            reply = await self._infer(data, context)
        except ServingError as exc:
            await self._abort(context, exc)
        return reply

    def start_infer(self, data: bytes, context) -> asyncio.Future:
        """ModelInfer without a coroutine: the request goes into the batch queue and the
        reply is encoded in a callback; a future of the reply's bytes. Errors come as
        ``mip.net.grpc_server.RpcError`` (raised at once, or set on the future)."""
        try:
            return self._submit(data, context, encode=True)[2]
        except ServingError as exc:
            raise _rpc_error(exc) from None

    def _checked_reply(self, request, result, raw: bool, join: bool = True, targets=None):
        """:meth:`_reply`, refused with TooLarge when over the message limit."""
        reply = self._reply(request, result, raw, join, targets)
        size = sum(map(len, reply)) if isinstance(reply, list) else len(reply)
        if size > self.max_message_size:
            raise TooLarge(f"reply of {size} octets is over the gRPC message limit of "
                           f"{self.max_message_size} octets (--grpc-max-message-size)")
        return reply

    def _submit(self, data: bytes, context, encode: bool = False):
        """Parse a ModelInferRequest and queue it: ``(request, raw, future of the reply)``,
        the reply encoded in the callback that completes the request: its bytes, or with
        ``encode`` a list of buffers and errors mapped to RpcError. A request refused here
        is reported to the access log. An ``x-request-id`` in the call's metadata comes
        back in its trailing metadata and names the request (else its ``id`` does)."""
        started = time.perf_counter()
        request_id = _metadata_request_id(context)
        if request_id is not None:
            context.set_trailing_metadata(((_REQUEST_ID, request_id),))
        try:
            return self._queue(data, context, encode, started, request_id)
        except Exception as exc:
            if self.dataplane.access_log is not None:
                self._refused(data, context, exc, started, request_id)
            raise

    def _refused(self, data: bytes, context, exc: Exception, started: float,
                 request_id: str | None) -> None:
        """Report a request :meth:`_queue` refused (read again for its model's name)."""
        request = None
        if len(data) <= self.max_message_size:
            try:
                request = pb.ModelInferRequest.FromString(split_raw_inputs(data)[0])
            except Exception:  # it did not parse: no model to name
                pass
        self.dataplane.refused("grpc", request and request.model_name,
                               request and request.model_version, exc, peer=context.peer(),
                               request_id=request_id or (request and request.id) or None,
                               started=started)

    def _queue(self, data: bytes, context, encode: bool, started: float,
               request_id: str | None):
        if len(data) > self.max_message_size:
            raise TooLarge(f"request of {len(data)} octets is over the gRPC message limit "
                           f"of {self.max_message_size} octets (--grpc-max-message-size)")
        try:
            if len(data) < _SPLIT_ABOVE:
                request = pb.ModelInferRequest.FromString(data)
                raws = request.raw_input_contents
                rest = data
            else:
                rest, raws = split_raw_inputs(data)
                request = pb.ModelInferRequest.FromString(rest)
        except InvalidInput:
            raise
        except Exception as exc:  # protobuf's DecodeError and friends
            raise InvalidInput(f"malformed ModelInferRequest: {exc}") from None
        if request_id is None and request.id:
            request_id = request.id
        classes = _extension_parameters(request, rest)
        shared = b"shared_memory_" in rest  # else no tensor can be in shared memory
        inputs = self._inputs(request, raws, shared)
        targets = {o.name: self.shm.output(o.name, _plain(o.parameters)) for o in request.outputs
                   if "shared_memory_region" in o.parameters} if shared else None
        outputs = [o.name for o in request.outputs] or None
        timeout = None
        if "timeout" in request.parameters:
            timeout = timeout_parameter(_parameter(request.parameters["timeout"]))
        remaining = context.time_remaining() if hasattr(context, "time_remaining") else None
        if remaining is not None:
            timeout = remaining if timeout is None else min(timeout, remaining)
        raw = bool(len(raws)) or shared and not any(t.HasField("contents")
                                                     for t in request.inputs)

        def then(result):
            return self._checked_reply(request, result, raw, join=not encode, targets=targets)

        peer = context.peer()
        work = self.dataplane.submit("grpc", request.model_name, request.model_version,
                                     inputs, outputs, timeout, then=then,
                                     error=_rpc_error if encode else None, classes=classes,
                                     source=grpc_peer_host(peer), peer=peer,
                                     request_id=request_id, started=started)
        return request, raw, work

    async def model_stream_infer(self, request_iterator, context):
        """Answer every request of the stream; requests run concurrently (up to
        :data:`STREAM_WINDOW`), so replies may come out of order (match them by ``id``)."""
        replies: asyncio.Queue = asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)
        running: set[asyncio.Task] = set()

        async def answer(data: bytes) -> None:
            try:
                reply = await self._infer(data, context)
                replies.put_nowait(_STREAM_RESPONSE_TAG + _varint(len(reply)) + reply)
            except Exception as exc:  # every request gets an answer on the stream
                said = str(exc)
                if not isinstance(exc, ServingError):
                    log.exception("stream request failed")
                    said = f"internal error: {type(exc).__name__}: {exc}"
                message = pb.ModelStreamInferResponse(error_message=said)
                message.infer_response.id = _request_id(data)
                replies.put_nowait(message.SerializeToString())
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

    async def _infer(self, data: bytes, context) -> bytes:
        return await self._submit(data, context)[2]

    def _inputs(self, request, raws: list[memoryview],
                shared: bool = False) -> dict[str, np.ndarray]:
        """The request's inputs; with ``shared``, those whose parameters name a shared
        memory region are read from it (and have no raw_input_contents entry)."""
        placed = {i for i, t in enumerate(request.inputs)
                  if "shared_memory_region" in t.parameters} if shared else ()
        sent = len(request.inputs) - len(placed)
        if raws and len(raws) != sent:
            raise InvalidInput(f"raw_input_contents has {len(raws)} entries for {sent} inputs"
                               + (" not in shared memory" if placed else ""))
        inputs: dict[str, np.ndarray] = {}
        index = 0
        for position, tensor in enumerate(request.inputs):
            name = tensor.name
            if name in inputs:
                raise InvalidInput(f"input {name!r} appears twice")
            if position in placed:
                inputs[name] = self.shm.input(name, tensor.datatype, tensor.shape,
                                              _plain(tensor.parameters))
                continue
            if raws:
                if tensor.HasField("contents"):
                    raise InvalidInput(f"input {name!r} has contents and raw_input_contents; "
                                       "send one or the other")
                inputs[name] = codec.from_raw(name, tensor.datatype, tensor.shape, raws[index])
                index += 1
            else:
                inputs[name] = _from_contents(tensor)
        return inputs

    @staticmethod
    def _reply(request, result, raw: bool, join: bool = True, targets=None):
        """The serialized ModelInferResponse: bytes, or (``join`` false, with raw outputs)
        a list of buffers whose concatenation it is, the tensors' memory not copied.
        Outputs with ``targets`` are written to shared memory and carry only parameters
        (and, in a raw reply, an empty raw_output_contents entry, so entries stay in the
        order of the outputs)."""
        response = pb.ModelInferResponse(model_name=result.model, model_version=result.version,
                                         id=request.id)
        datatypes = [codec.datatype_of(a) for a in result.outputs.values()]
        raw = raw or any(d in ("FP16", "BF16") for d in datatypes)
        in_shm = shm.SystemSharedMemory.write(targets, result.outputs) if targets else {}
        parts: list = []
        for (name, array), datatype in zip(result.outputs.items(), datatypes):
            tensor = response.outputs.add(name=name, datatype=datatype, shape=array.shape)
            if name in in_shm:
                for key, value in in_shm[name].items():
                    if isinstance(value, str):
                        tensor.parameters[key].string_param = value
                    else:
                        tensor.parameters[key].int64_param = value
                if raw:
                    parts += (_RAW_OUTPUT_TAG, b"\x00")
            elif raw:
                content = codec.to_raw(array, name)
                parts += (_RAW_OUTPUT_TAG, _varint(len(content)), content)
            else:
                _typed_contents(tensor.contents, datatype, array, name)
        header = response.SerializeToString()
        # Fields may come in any order: the raw contents follow the header as they are.
        if not parts:
            return header
        return b"".join([header, *parts]) if join else [header, *parts]

    # -- credentials --------------------------------------------------------------------

    def protects(self, path: str) -> bool:
        """Whether calls of ``path`` (``/package.Service/Method``) need credentials."""
        if self.guard is None or not path.startswith(f"/{_SERVICE}/"):
            return False
        return self.guard.protects(RPC_AREAS.get(path[len(_SERVICE) + 2:]))

    def guarded(self, kind: str, function):
        """``function`` (an RPC of ``kind``: ``unary``, ``stream`` or ``future``, the
        native transport's ModelInfer) behind the guard's check of the call's metadata."""
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
            await self._authenticate(context)
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

    async def _call(self, context, function, *args):
        try:
            result = function(*args)
            if asyncio.iscoroutine(result):
                result = await result
            return result
        except ServingError as exc:
            await self._abort(context, exc)

    @staticmethod
    async def _abort(context, exc: ServingError):
        code = getattr(grpc.StatusCode, exc.grpc_status.name)
        await context.abort(code, str(exc), _trailers(exc))


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
    """A ServingError as the native transport's RpcError with its gRPC status; others as
    they are (the transport answers INTERNAL)."""
    if not isinstance(exc, ServingError):
        return exc
    return RpcError(exc.grpc_status, str(exc), _trailers(exc))


def _metadata_request_id(context) -> str | None:
    """The call's ``x-request-id`` metadata, or ``None``."""
    for key, value in context.invocation_metadata() or ():
        if key == _REQUEST_ID:
            return value if isinstance(value, str) else None
    return None


def _request_id(data: bytes) -> str:
    try:
        return pb.ModelInferRequest.FromString(split_raw_inputs(data)[0]).id
    except Exception:
        return ""


def _methods(service: _Service) -> list[tuple]:
    """``(path, kind, function, request type, response type)`` of every RPC of the listener:
    the KServe v2 service, health and reflection. Inference works on the serialized bytes
    (see split_raw_inputs and _reply), so its types are None."""
    def kserve(name):
        return f"/{_SERVICE}/{name}"

    health, reflection = service.health, service.reflection
    methods = [
        (kserve("ServerLive"), "unary", service.server_live, pb.ServerLiveRequest,
         pb.ServerLiveResponse),
        (kserve("ServerReady"), "unary", service.server_ready, pb.ServerReadyRequest,
         pb.ServerReadyResponse),
        (kserve("ModelReady"), "unary", service.model_ready, pb.ModelReadyRequest,
         pb.ModelReadyResponse),
        (kserve("ServerMetadata"), "unary", service.server_metadata, pb.ServerMetadataRequest,
         pb.ServerMetadataResponse),
        (kserve("ModelMetadata"), "unary", service.model_metadata, pb.ModelMetadataRequest,
         pb.ModelMetadataResponse),
        (kserve("ModelInfer"), "infer", None, None, None),
        (kserve("ModelStreamInfer"), "stream", service.model_stream_infer, None, None),
        (kserve("RepositoryIndex"), "unary", service.repository_index, pb.RepositoryIndexRequest,
         pb.RepositoryIndexResponse),
        (kserve("RepositoryModelLoad"), "unary", service.repository_model_load,
         pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse),
        (kserve("RepositoryModelUnload"), "unary", service.repository_model_unload,
         pb.RepositoryModelUnloadRequest, pb.RepositoryModelUnloadResponse),
        (kserve("ModelConfig"), "unary", service.model_config, pb.ModelConfigRequest,
         pb.ModelConfigResponse),
        (kserve("ModelStatistics"), "unary", service.model_statistics, pb.ModelStatisticsRequest,
         pb.ModelStatisticsResponse),
        (kserve("SystemSharedMemoryStatus"), "unary", service.system_shared_memory_status,
         pb.SystemSharedMemoryStatusRequest, pb.SystemSharedMemoryStatusResponse),
        (kserve("SystemSharedMemoryRegister"), "unary", service.system_shared_memory_register,
         pb.SystemSharedMemoryRegisterRequest, pb.SystemSharedMemoryRegisterResponse),
        (kserve("SystemSharedMemoryUnregister"), "unary", service.system_shared_memory_unregister,
         pb.SystemSharedMemoryUnregisterRequest, pb.SystemSharedMemoryUnregisterResponse),
        *((kserve(f"CudaSharedMemory{call}"), "unary", service.cuda_shared_memory,
           getattr(pb, f"CudaSharedMemory{call}Request"),
           getattr(pb, f"CudaSharedMemory{call}Response"))
          for call in ("Status", "Register", "Unregister")),
        (f"/{HEALTH_SERVICE}/Check", "unary", health.check, health_pb2.HealthCheckRequest,
         health_pb2.HealthCheckResponse),
        (f"/{HEALTH_SERVICE}/Watch", "server_stream", health.watch,
         health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse),
        *((f"/{name}/ServerReflectionInfo", "stream", reflection.ServerReflectionInfo,
           reflection_pb2.ServerReflectionRequest, reflection_pb2.ServerReflectionResponse)
          for name in REFLECTION_SERVICES),
    ]
    # the RPCs of the areas the guard protects check the call's credentials first
    return [(path, kind, service.guarded(kind, function) if function is not None
             and service.protects(path) else function, request_type, response_type)
            for path, kind, function, request_type, response_type in methods]


def _serializers(request_type, response_type) -> dict:
    return {"request_deserializer": request_type and request_type.FromString,
            "response_serializer": response_type and response_type.SerializeToString}


def _handlers(service: _Service) -> list[grpc.GenericRpcHandler]:
    """grpcio's handlers of every RPC, one generic handler a service."""
    by_service: dict[str, dict] = {}
    for path, kind, function, request_type, response_type in _methods(service):
        name, method = path[1:].rsplit("/", 1)
        codecs = _serializers(request_type, response_type)
        if kind == "unary":
            handler = grpc.unary_unary_rpc_method_handler(function, **codecs)
        elif kind == "infer":
            handler = grpc.unary_unary_rpc_method_handler(
                service.guarded("unary", service.model_infer) if service.protects(path)
                else service.model_infer)
        elif kind == "server_stream":
            handler = grpc.unary_stream_rpc_method_handler(function, **codecs)
        else:
            handler = grpc.stream_stream_rpc_method_handler(function, **codecs)
        by_service.setdefault(name, {})[method] = handler
    return [grpc.method_handlers_generic_handler(name, handlers)
            for name, handlers in by_service.items()]


def native_available() -> bool:
    """Whether the native HTTP/2 transport (``mip.protocol._h2``, libnghttp2) can be used."""
    return native_unavailable_reason() is None


def native_unavailable_reason() -> str | None:
    """Why the native transport cannot be used here (None: it can): not built, or built
    but its run-time library (libnghttp2.so.14) is missing."""
    try:
        import mip.protocol._h2  # noqa: F401
    except ModuleNotFoundError:
        return ("mip was built without the native gRPC transport (MIP_NO_NATIVE_GRPC=1, or "
                "libnghttp2's headers were missing when it was built)")
    except ImportError as exc:  # the extension is there; a library it links is not
        return (f"the run-time library libnghttp2 is missing ({exc}): install it (Debian, "
                "Ubuntu: libnghttp2-14; Fedora: libnghttp2; Alpine: nghttp2-libs)")
    return None


#: ``native``: mip's own HTTP/2 transport on libnghttp2 (the default where it is built);
#: ``grpcio``: grpcio's asyncio server.
IMPLEMENTATIONS = ("native", "grpcio")


def _native_methods(service: _Service) -> dict:
    from mip.net.grpc_server import stream_stream, unary, unary_future

    methods = {}
    for path, kind, function, request_type, response_type in _methods(service):
        if kind == "unary":
            methods[path] = unary(function, request_type.FromString,
                                  response_type.SerializeToString)
        elif kind == "infer":
            methods[path] = unary_future(
                service.guarded("future", service.start_infer) if service.protects(path)
                else service.start_infer)
        elif kind == "server_stream":  # on HTTP/2 a bidirectional stream that reads one request
            methods[path] = stream_stream(_first_request(function), request_type.FromString,
                                          response_type.SerializeToString)
        else:
            methods[path] = stream_stream(function, **_serializers(request_type, response_type))
    return methods


def _first_request(handler):
    """A server-streaming ``handler(request, context)`` as a streaming one."""
    async def stream(requests, context):
        async for request in requests:
            async for reply in handler(request, context):
                yield reply
            return
    return stream


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
    """

    def __init__(self, engine, *, metrics=None, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                 request_timeout: float | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, tls_ca: str | None = None,
                 implementation: str | None = None, limits: GrpcLimits | None = None,
                 guard=None, access_log=None, shared_memory=None):
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
        self._tls = (tls_cert, tls_key, tls_ca) if tls_cert else None
        self._server: aio.Server | None = None
        self._service: _Service | None = None
        self.address: str | None = None

    async def start(self, address: str, sock: socket.socket | None = None) -> str:
        """Listen on ``HOST:PORT`` (port 0: a free port), or accept on ``sock``, a listening
        socket bound to it elsewhere (native transport only); returns the bound
        ``HOST:PORT``."""
        if self.implementation == "native":
            return await self._start_native(address, sock)
        if sock is not None:
            raise NotAvailable("the grpcio transport binds its own sockets and cannot serve "
                               "one bound by another process (as every worker of --workers "
                               "does): use --grpc-impl native")
        limit = min(2 * self.max_message_size, _MAX_GRPC_LIMIT)
        server = aio.server(options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
            *self.limits.grpcio_options(),
        ])
        self._service = _Service(self.dataplane, self.max_message_size, self.guard,
                                 self.shared_memory)
        server.add_generic_rpc_handlers(_handlers(self._service))
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"gRPC address must be HOST:PORT, not {address!r}")
        if self._tls is None:
            bound = server.add_insecure_port(address)
        else:
            cert, key, ca = (None if path is None else open(path, "rb").read() for path in self._tls)
            credentials = grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
            bound = server.add_secure_port(address, credentials)
        if not bound:
            raise OSError(f"cannot listen for gRPC on {address}")
        await server.start()
        self._server = server
        self.address = f"{host}:{bound}"
        return self.address

    async def _start_native(self, address: str, sock: socket.socket | None = None) -> str:
        from mip.net.grpc_server import GrpcServer as Transport
        from mip.net.grpc_server import tls_context

        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"gRPC address must be HOST:PORT, not {address!r}")
        context = None
        if self._tls is not None:
            cert, key, ca = self._tls
            context = tls_context(server=True, cert=cert, key=key, ca=ca)
        limit = self.max_message_size
        self._service = _Service(self.dataplane, limit, self.guard, self.shared_memory)
        server = Transport(
            _native_methods(self._service), max_message_size=limit, ssl=context,
            limits=self.limits,
            too_large=lambda n: (f"request of {n} octets is over the gRPC message limit of "
                                 f"{limit} octets (--grpc-max-message-size)"))
        bound_host, bound_port = await server.start(host.strip("[]"), int(port), sock)
        self._server = server
        self.address = f"{host}:{bound_port}"
        return self.address

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop accepting calls; calls in progress get ``grace`` seconds to finish (health
        answers NOT_SERVING from now on, and its watchers are told so and end)."""
        if self._service is not None:
            self._service.health.close()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
