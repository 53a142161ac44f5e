"""The Open Inference Protocol over HTTP/1.1: a Starlette app served by uvicorn.

Endpoints (``{v}`` parts optional)::

    GET  /v2/health/live                     200 {"live": true}
    GET  /v2/health/ready                    200 {"ready": true}, 503 while not ready
    GET  /v2                                 server metadata
    GET  /v2/models/{name}[/versions/{v}]    model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready   200, 503 when not ready, 404 unknown
    POST /v2/models/{name}[/versions/{v}]/infer   JSON tensors and binary tensor data
    GET  /v2/models/{name}[/versions/{v}]/config  the configuration (Triton's ModelConfig)
    GET  /v2/models[/{name}[/versions/{v}]]/stats  statistics: {"model_stats": [...]}
    POST /v2/repository/index                [{"name", "version", "state", "reason"}]
    POST /v2/repository/models/{name}/load
    POST /v2/repository/models/{name}/unload
    POST /v2/systemsharedmemory/region/{region}/register   {"key", "offset", "byte_size"}
    POST /v2/systemsharedmemory[/region/{region}]/unregister
    GET  /v2/systemsharedmemory[/region/{region}]/status   [{"name", "key", "offset", "byte_size"}]
    *    /v2/cudasharedmemory/...            400: CUDA shared memory is not supported
    GET  /metrics                            Prometheus text format

Binary tensor data extension: a request whose ``Inference-Header-Content-Length`` header is
N carries N octets of JSON followed by the raw data of every input whose parameters hold
``binary_data_size``, in input order; those inputs become numpy views of the body. Outputs
asked for with the ``binary_data`` output parameter (or all of them, with the request
parameter ``binary_data_output``) are sent the same way after the JSON header.

Errors answer ``{"error": "..."}`` with the ``http_status`` of the
:class:`~mip.errors.ServingError`. With a :class:`~mip.frontends.auth.Guard`, the areas it
protects (:func:`area_of`) answer 401 (``WWW-Authenticate: Bearer``) without credentials
that verify, and 429 (``Retry-After``) to an address past its failure budget; health
endpoints never ask. A client that disconnects while its request waits has
the request cancelled, so it leaves the batch queue.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import socket
import ssl
import time
import zlib
from collections.abc import Sequence

import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from mip.errors import (Cancelled, InvalidInput, ModelNotFound, ServingError, TooLarge,
                        TooManyAuthFailures, Unauthenticated)
from mip.frontends.oip import codec, shm
from mip.frontends.oip._http_protocol import HttpLimits, Listener
from mip.frontends.dataplane import DataPlane, timeout_parameter
from mip.protocol._jsonnum import PLACEHOLDER, parse_numbers, split_numeric_arrays

__all__ = ["DEFAULT_MAX_BODY_SIZE", "HttpLimits", "HttpServer", "area_of", "build_app"]

log = logging.getLogger("mip.frontends.oip.rest")

#: largest request body, in octets (after decompression), unless configured.
DEFAULT_MAX_BODY_SIZE = 64 << 20
#: JSON request headers from this many octets on have their large numeric arrays parsed
#: straight into numpy (mip.protocol._jsonnum) instead of into Python numbers.
_SPLIT_JSON_ABOVE = 64 << 10
#: JSON request headers from this many octets on are parsed in a worker thread
_THREAD_ABOVE = 512 << 10
_DECODE_THREADS = 2
#: replies whose binary parts add up to less than this many octets are sent in one write.
_JOIN_BELOW = 64 << 10
_JSON_TYPE = "application/json"
# orjson writes these numpy dtypes itself; others go through tolist().
_ORJSON_KINDS = {np.dtype(t) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64,
                                       np.uint8, np.uint16, np.uint32, np.uint64,
                                       np.float16, np.float32, np.float64)}


class _Json(Response):
    media_type = _JSON_TYPE

    def render(self, content) -> bytes:
        return orjson.dumps(content)


def _error(message: str, status: int) -> Response:
    return _Json({"error": message}, status_code=status)


class _PartsResponse(Response):
    """A reply written as several buffers (JSON header, then tensor octets), no join."""

    def __init__(self, parts: list, header_length: int, headers: Sequence = ()):
        total = sum(len(p) for p in parts)
        if total < _JOIN_BELOW:
            parts = [b"".join(parts)]
        self.parts = parts
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (b"content-type", b"application/octet-stream"),
            (b"content-length", str(total).encode()),
            (b"inference-header-content-length", str(header_length).encode()),
            *headers,
        ]

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        last = len(self.parts) - 1
        for index, part in enumerate(self.parts):
            await send({"type": "http.response.body", "body": part, "more_body": index < last})


def _json_data(array: np.ndarray, name: str):
    if array.dtype == object or array.dtype.kind in "SU":
        try:
            return [e.decode("utf-8") for e in codec.bytes_elements(array, name)]
        except UnicodeDecodeError:
            raise InvalidInput(f"output {name!r} holds BYTES that are not UTF-8: ask for it "
                               "with the binary_data output parameter") from None
    flat = np.ascontiguousarray(array).reshape(-1)
    if flat.dtype in _ORJSON_KINDS:
        return flat  # orjson serializes it (OPT_SERIALIZE_NUMPY)
    return flat.astype(np.float32).tolist() if flat.dtype.name == "bfloat16" else flat.tolist()


def _object(value, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return value


class _Endpoints:
    def __init__(self, dataplane: DataPlane, max_body_size: int, metrics, shared_memory=None):
        self._decoder: concurrent.futures.ThreadPoolExecutor | None = None
        self.shm = shm.registry_of(dataplane.engine, shared_memory)
        self.dataplane = dataplane
        self.engine = dataplane.engine
        self.max_body_size = max_body_size
        self.metrics = metrics

    # -- health and metadata ------------------------------------------------------------

    async def live(self, request: Request) -> Response:
        return _Json({"live": True})

    async def ready(self, request: Request) -> Response:
        ready = self.engine.ready()
        return _Json({"ready": ready}, status_code=200 if ready else 503)

    async def server_metadata(self, request: Request) -> Response:
        return _Json(self.dataplane.server_metadata())

    async def model_metadata(self, request: Request) -> Response:
        params = request.path_params
        meta = self.engine.model_metadata(params["name"], params.get("version"))
        return _Json({
            "name": meta.name, "versions": list(meta.versions), "platform": meta.platform,
            "inputs": [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)}
                       for s in meta.inputs],
            "outputs": [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)}
                        for s in meta.outputs],
        })

    async def model_ready(self, request: Request) -> Response:
        name, version = request.path_params["name"], request.path_params.get("version")
        if self.engine.model_ready(name, version):
            return _Json({"name": name, "ready": True})
        try:
            self.engine.resolve(name, version)
        except ModelNotFound as exc:
            return _error(str(exc), exc.http_status)
        except ServingError:
            pass
        return _Json({"name": name, "ready": False}, status_code=503)

    async def model_config(self, request: Request) -> Response:
        from mip.serving.triton import message_to_json

        params = request.path_params
        return _Json(message_to_json(self.dataplane.model_config(params["name"],
                                                                 params.get("version"))))

    async def model_stats(self, request: Request) -> Response:
        params = request.path_params
        return _Json(self.dataplane.statistics(params.get("name"), params.get("version")))

    async def metrics_text(self, request: Request) -> Response:
        from mip.frontends.oip.metrics import CONTENT_TYPE

        if self.metrics is None:
            return _error("metrics are off", 404)
        await self.metrics.sample()  # what is read from elsewhere (the job queue's depth)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    # -- repository ---------------------------------------------------------------------

    async def repository_index(self, request: Request) -> Response:
        body = await self._body(request)
        options = _object(orjson.loads(body) if body.strip() else None, "the request body")
        ready_only = bool(options.get("ready", False))
        return _Json([{"name": e.name, "version": e.version, "state": str(e.state),
                       "reason": e.reason}
                      for e in self.engine.index()
                      if not ready_only or str(e.state) == "READY"])

    async def repository_load(self, request: Request) -> Response:
        body = await self._body(request)
        options = _object(orjson.loads(body) if body.strip() else None, "the request body")
        parameters = _object(options.get("parameters"), "parameters")
        await self.dataplane.load(request.path_params["name"], parameters)
        return Response(b"", media_type=_JSON_TYPE)

    async def repository_unload(self, request: Request) -> Response:
        await self._body(request)
        await self.engine.unload(request.path_params["name"])
        return Response(b"", media_type=_JSON_TYPE)

    # -- Triton's shared-memory extensions ----------------------------------------------

    async def shm_register(self, request: Request) -> Response:
        body = await self._body(request)
        options = _object(orjson.loads(body) if body.strip() else None, "the request body")
        relayed = self.shm.register(request.path_params["region"], options.get("key"),
                                    options.get("offset", 0), options.get("byte_size"),
                                    request.client.host if request.client else None)
        if relayed is not None:  # --workers N: made on every worker
            await relayed
        return Response(b"", media_type=_JSON_TYPE)

    async def shm_unregister(self, request: Request) -> Response:
        await self._body(request)
        relayed = self.shm.unregister(request.path_params.get("region"))
        if relayed is not None:  # --workers N: made on every worker
            await relayed
        return Response(b"", media_type=_JSON_TYPE)

    async def shm_status(self, request: Request) -> Response:
        return _Json(self.shm.status(request.path_params.get("region")))

    async def cuda_shm(self, request: Request) -> Response:
        raise shm.cuda_unsupported()

    # -- inference ----------------------------------------------------------------------

    async def _parse_off_loop(self, body: bytes, header_length: str | None):
        """:meth:`_parse`; for a JSON header of :data:`_THREAD_ABOVE` octets or more, in a
        worker thread: its numbers are read without the GIL, so the event loop and other
        requests go on meanwhile (and two large bodies parse on two cores)."""
        size = len(body) if header_length is None or not header_length.isdigit() else min(
            len(body), int(header_length))
        if size < _THREAD_ABOVE:
            return self._parse(body, header_length)
        if self._decoder is None:
            self._decoder = concurrent.futures.ThreadPoolExecutor(
                _DECODE_THREADS, thread_name_prefix="mip-json")
        return await asyncio.get_running_loop().run_in_executor(
            self._decoder, self._parse, body, header_length)

    def _parse(self, body: bytes, header_length: str | None):
        """A request body: ``(doc, inputs, wanted outputs, binary_data_output, timeout,
        classification, outputs to shared memory)``."""
        if header_length is None:
            header_end = len(body)
        else:
            if not header_length.isdigit() or int(header_length) > len(body):
                raise InvalidInput(f"Inference-Header-Content-Length {header_length!r} does not "
                                   f"fit a body of {len(body)} octets")
            header_end = int(header_length)
        view = memoryview(body)
        text = view[:header_end] if header_end != len(body) else body
        spans: list = []
        if header_end >= _SPLIT_JSON_ABOVE:
            # Large numeric arrays are read straight into numpy memory, not Python floats.
            text, spans = split_numeric_arrays(text, _SPLIT_JSON_ABOVE // 4)
        try:
            doc = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"the request is not valid JSON: {exc}") from None
        doc = _object(doc, "the request")
        classes = _extension_parameters(doc)
        inputs = self._inputs(doc, view, header_end, spans)
        parameters = doc.get("parameters")
        binary_default = False
        timeout = None
        if parameters is not None:
            parameters = _object(parameters, "parameters")
            binary_default = bool(parameters.get("binary_data_output", False))
            timeout = timeout_parameter(parameters.get("timeout"))
        wanted: dict[str, bool] = {}
        targets: dict[str, shm.OutputTarget] = {}
        for output in doc.get("outputs") or ():
            output = _object(output, "an output")
            output_name = output.get("name")
            if not isinstance(output_name, str):
                raise InvalidInput("every requested output needs a name")
            output_params = _object(output.get("parameters"), f"output {output_name!r} parameters")
            wanted[output_name] = bool(output_params.get("binary_data", binary_default))
            if "shared_memory_region" in output_params:
                targets[output_name] = self.shm.output(output_name, output_params)
        return doc, inputs, wanted, binary_default, timeout, classes, targets

    # -- the inference fast path: plain ASGI, no Starlette request or response objects ----

    async def fast_infer(self, scope, receive, send, name: str, version: str | None) -> None:
        """``POST /v2/models/{name}[/versions/{v}]/infer`` straight on ASGI: body, checks,
        errors (``{"error": ...}`` with the ServingError's status) and cancellation, without
        the framework's per-request objects. An ``X-Request-ID`` header is answered with
        the same header, and names the request in the access log (else its ``id`` does)."""
        started = time.perf_counter()
        client = scope.get("client")
        request_id = work = None
        echo = ()
        try:
            length = encoding = header_length = None
            for key, value in scope["headers"]:
                if key == b"content-length":
                    length = value
                elif key == b"inference-header-content-length":
                    header_length = value.decode("latin-1")
                elif key == b"content-encoding":
                    encoding = value.decode("latin-1")
                elif key == b"x-request-id":
                    request_id = value.decode("latin-1")
                    echo = ((b"x-request-id", value),)
            body = await self._receive_body(receive, length, encoding)
            doc, inputs, wanted, binary_default, timeout, classes, targets = (
                await self._parse_off_loop(body, header_length))
            oip_id = doc.get("id")
            if request_id is None and oip_id is not None and oip_id != "":
                request_id = str(oip_id)

            def reply(result):
                return self._reply_parts(oip_id, result, wanted, binary_default, targets)

            work = self.dataplane.submit("http", name, version, inputs, list(wanted) or None,
                                         timeout, then=reply, classes=classes,
                                         source=client[0] if client else None, peer=client,
                                         request_id=request_id, started=started)
            header, parts = await _unless_disconnected(receive, work)
        except Cancelled as exc:
            if work is None:
                self.dataplane.refused("http", name, version, exc, peer=client,
                                       request_id=request_id, started=started)
            return  # the client is gone: nobody to answer
        except ServingError as exc:
            if work is None:
                self.dataplane.refused("http", name, version, exc, peer=client,
                                       request_id=request_id, started=started)
            await _send_error(send, str(exc), exc.http_status, echo)
            return
        except Exception as exc:
            if work is None:
                self.dataplane.refused("http", name, version, exc, peer=client,
                                       request_id=request_id, started=started)
            log.error("POST %s failed", scope.get("path"), exc_info=exc)
            await _send_error(send, f"internal error: {type(exc).__name__}: {exc}", 500, echo)
            return
        if not parts:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(header)).encode()), *echo]})
            await send({"type": "http.response.body", "body": header})
            return
        await _PartsResponse([header, *parts], len(header), echo)(scope, receive, send)

    async def _receive_body(self, receive, length: bytes | None, encoding: str | None) -> bytes:
        limit = self.max_body_size
        if length is not None and length.isdigit() and int(length) > limit:
            raise _too_large(int(length), limit)
        message = await receive()
        body = message.get("body", b"")
        if message.get("more_body", False):
            chunks, size = [body], len(body)
            while message.get("more_body", False):
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise Cancelled("the client disconnected")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise _too_large(size, limit)
                chunks.append(chunk)
            body = b"".join(chunks)
        elif message["type"] == "http.disconnect":
            raise Cancelled("the client disconnected")
        if len(body) > limit:
            raise _too_large(len(body), limit)
        return _decompress(body, (encoding or "identity").lower(), limit)

    def _inputs(self, doc: dict, view: memoryview, position: int,
                spans: Sequence = ()) -> dict[str, np.ndarray]:
        specs = doc.get("inputs")
        if not isinstance(specs, list):
            raise InvalidInput("the request needs an 'inputs' list")
        inputs: dict[str, np.ndarray] = {}
        for spec in specs:
            spec = _object(spec, "an input")
            name = spec.get("name")
            if not isinstance(name, str):
                raise InvalidInput("every input needs a name")
            if name in inputs:
                raise InvalidInput(f"input {name!r} appears twice")
            datatype = spec.get("datatype")
            shape = spec.get("shape")
            if not isinstance(datatype, str) or not isinstance(shape, list):
                raise InvalidInput(f"input {name!r} needs a datatype and a shape")
            parameters = _object(spec.get("parameters"), f"input {name!r} parameters")
            size = parameters.get("binary_data_size")
            if "shared_memory_region" in parameters:
                inputs[name] = self.shm.input(name, datatype, shape, parameters)
            elif size is not None:
                if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                    raise InvalidInput(f"input {name!r}: binary_data_size must be an octet count")
                if size > len(view) - position:
                    raise InvalidInput(f"input {name!r}: binary_data_size {size} runs past the "
                                       f"end of the body ({len(view) - position} octets left)")
                inputs[name] = codec.from_raw(name, datatype, shape,
                                              view[position:position + size])
                position += size
            else:
                if "data" not in spec:
                    raise InvalidInput(f"input {name!r} has neither data nor binary_data_size")
                data = spec["data"]
                if spans and isinstance(data, str) and data.startswith(PLACEHOLDER):
                    inputs[name] = _from_span(name, datatype, shape, view, spans, data)
                else:
                    inputs[name] = codec.from_list(name, datatype, shape, data)
        if position != len(view):
            raise InvalidInput(f"{len(view) - position} octets of binary data belong to no input")
        return inputs

    @staticmethod
    def _reply_parts(request_id, result, wanted: dict[str, bool],
                     binary_default: bool, targets: dict | None = None) -> tuple[bytes, list]:
        """The reply's JSON header and the binary parts that follow it (maybe none);
        outputs with ``targets`` are written to shared memory, not sent."""
        outputs, parts = [], []
        in_shm = shm.SystemSharedMemory.write(targets, result.outputs) if targets else {}
        for name, array in result.outputs.items():
            datatype = codec.datatype_of(array)
            entry = {"name": name, "datatype": datatype, "shape": list(array.shape)}
            if name in in_shm:
                entry["parameters"] = in_shm[name]
            elif wanted.get(name, binary_default):
                content = codec.to_raw(array, name)
                entry["parameters"] = {"binary_data_size": len(content)}
                parts.append(content)
            else:
                entry["data"] = _json_data(array, name)
            outputs.append(entry)
        reply = {"model_name": result.model, "model_version": result.version,
                 "outputs": outputs}
        if request_id is not None:
            reply["id"] = request_id
        return orjson.dumps(reply, option=orjson.OPT_SERIALIZE_NUMPY), parts

    async def _body(self, request: Request) -> bytes:
        """The body, decompressed (gzip, deflate), at most ``max_body_size`` octets."""
        limit = self.max_body_size
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise _too_large(int(length), limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(size, limit)
            chunks.append(chunk)
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return _decompress(body, request.headers.get("content-encoding", "identity").lower(),
                           limit)


def _extension_parameters(doc: dict) -> dict[str, int] | None:
    """:func:`codec.check_parameters` of a JSON request (its tensors' parameters)."""
    tensors = {}
    for kind in ("inputs", "outputs"):
        found = {}
        for tensor in doc.get(kind) or ():
            parameters = tensor.get("parameters") if isinstance(tensor, dict) else None
            if parameters:
                found[str(tensor.get("name"))] = _object(parameters, f"{kind} parameters")
        tensors[kind] = found
    request = doc.get("parameters")
    if not (request or tensors["inputs"] or tensors["outputs"]):
        return None
    return codec.check_parameters(request, tensors["inputs"], tensors["outputs"])


def _from_span(name: str, datatype: str, shape, view: memoryview, spans: Sequence,
               placeholder: str) -> np.ndarray:
    """An input whose ``data`` was a large numeric array, parsed from the body itself."""
    index = placeholder[len(PLACEHOLDER):]
    if not index.isdigit() or int(index) >= len(spans):
        raise InvalidInput(f"input {name!r}: data is not a list of values")
    start, end = spans[int(index)]
    dtype = codec.numpy_dtype(datatype, f"input {name!r}")
    if dtype.kind not in "iuf" or datatype == "BF16":
        # BOOL and BF16 through the general path
        return codec.from_list(name, datatype, shape, orjson.loads(view[start:end]))
    dims = codec.check_shape(shape, name)
    try:
        flat = parse_numbers(view, start, end, dtype)
    except ValueError as exc:
        raise InvalidInput(f"{name}: data does not fit {datatype}: {exc}") from None
    count = codec.element_count(dims)
    if flat.size != count:
        raise InvalidInput(f"{name}: shape {list(dims)} holds {count} elements, "
                           f"{flat.size} were sent")
    return flat.reshape(dims)


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """A body per its Content-Encoding (gzip, deflate, identity), at most ``limit`` octets."""
    if encoding == "identity":
        return body
    if encoding in ("gzip", "deflate"):
        decompressor = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
        try:
            plain = decompressor.decompress(body, limit + 1)
        except zlib.error as exc:
            raise InvalidInput(f"the {encoding} body does not decompress: {exc}") from None
        if len(plain) > limit or decompressor.unconsumed_tail:
            raise _too_large(len(plain), limit, "decompressed ")
        return plain
    raise InvalidInput(f"Content-Encoding {encoding!r} is not supported "
                       "(gzip, deflate, identity)")


async def _send_error(send, message: str, status: int, headers=()) -> None:
    body = orjson.dumps({"error": message})
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        *headers]})
    await send({"type": "http.response.body", "body": body})


def _too_large(size: int, limit: int, what: str = "") -> TooLarge:
    return TooLarge(f"{what}request body of {size} octets (or more) is over the limit of "
                    f"{limit} octets (--http-max-body-size)")


#: seconds a request runs before its client is watched for a disconnect: most requests
#: are answered sooner and never pay for the watcher task.
_WATCH_AFTER = 0.005


async def _unless_disconnected(receive, work: asyncio.Future):
    """Await ``work`` (a future); cancel it, so its request leaves the batch queue, when
    the client disconnects first (then raise :class:`~mip.errors.Cancelled`). The client is
    watched from :data:`_WATCH_AFTER` seconds on."""
    watcher: list = []

    async def disconnected() -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return

    def watch() -> None:
        if not work.done():
            task = asyncio.ensure_future(disconnected())
            task.add_done_callback(lambda w: work.cancel() if not w.cancelled() else None)
            watcher.append(task)

    timer = work.get_loop().call_later(_WATCH_AFTER, watch)
    try:
        return await work
    except asyncio.CancelledError:
        if watcher and watcher[0].done() and not watcher[0].cancelled():
            raise Cancelled("the client disconnected") from None
        work.cancel()
        raise
    finally:
        timer.cancel()
        if watcher:
            watcher[0].cancel()


async def _serving_error(request: Request, exc: ServingError) -> Response:
    return _error(str(exc), exc.http_status)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return _error(str(exc.detail), exc.status_code)


async def _bad_json(request: Request, exc: orjson.JSONDecodeError) -> Response:
    return _error(f"the request body is not valid JSON: {exc}", 400)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return _error(f"internal error: {type(exc).__name__}: {exc}", 500)


class _InferRoute:
    """``.../infer`` as a Starlette route (an ASGI endpoint): the same handler as the front's,
    so the route table is complete and other methods get 405."""

    def __init__(self, endpoints: _Endpoints):
        self.endpoints = endpoints

    async def __call__(self, scope, receive, send) -> None:
        params = scope["path_params"]
        await self.endpoints.fast_infer(scope, receive, send, params["name"],
                                        params.get("version"))


#: the last path segment of a model's endpoints -> its area (see mip.frontends.auth.AREAS)
_MODEL_AREAS = {"infer": "inference", "ready": None, "config": "metadata", "stats": "metrics"}


def area_of(path: str) -> str | None:
    """The area of :data:`mip.frontends.auth.AREAS` a REST path is in (``None``: health,
    and ``/v1``, which checks its own credentials). Paths under ``/v2`` that no endpoint
    serves are ``metadata``."""
    if path == "/metrics":
        return "metrics"
    if path != "/v2" and not path.startswith("/v2/"):
        return None
    parts = path.split("/")  # "", "v2", ...
    if len(parts) < 3:
        return "metadata"
    if parts[2] == "health":
        return None
    if parts[2] == "repository":
        return "control"
    if parts[2] in ("systemsharedmemory", "cudasharedmemory"):
        return "inference"  # what inference through shared memory needs
    if parts[2] == "models":
        if len(parts) == 4:  # /v2/models/stats, or a model's metadata
            return "metrics" if parts[3] == "stats" else "metadata"
        if len(parts) == 5:
            return _MODEL_AREAS.get(parts[4], "metadata")
        if len(parts) == 7 and parts[4] == "versions":
            return _MODEL_AREAS.get(parts[6], "metadata")
    return "metadata"


_CHALLENGE = (b"www-authenticate", b'Bearer realm="mip"')


async def _refused(send, exc: ServingError) -> None:
    """Answer 401 (with the challenge) or 429 (with Retry-After) for a refused request."""
    body = orjson.dumps({"error": str(exc)})
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    retry_after = getattr(exc, "retry_after", None)
    headers.append(_CHALLENGE if retry_after is None
                   else (b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": exc.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _InferFront:
    """The ASGI app: ``POST .../infer`` goes straight to :meth:`_Endpoints.fast_infer`,
    everything else to the Starlette app (whose attributes this object shows); with a
    guard, requests to the areas it protects are authenticated first."""

    def __init__(self, app: Starlette, endpoints: _Endpoints, guard=None):
        self.app = app
        self.endpoints = endpoints
        self.guard = guard

    def __getattr__(self, name):
        return getattr(self.app, name)

    async def _authenticate(self, scope) -> ServingError | None:
        """Why a request to a protected area is refused, or ``None`` when it may go on."""
        guard = self.guard
        headers = {}
        for key, value in scope["headers"]:
            if key == b"authorization" or key == b"x-api-key":
                headers[key.decode("latin-1")] = value.decode("latin-1")
        client = scope.get("client")
        host = client[0] if client else None
        try:
            if guard.immediate:
                guard.authenticate_now(headers, host)
            else:
                await guard.authenticate(headers, host)
        except (Unauthenticated, TooManyAuthFailures) as exc:
            return exc
        return None

    async def __call__(self, scope, receive, send) -> None:
        if (self.guard is not None and scope["type"] == "http"
                and self.guard.protects(area_of(scope["path"]))):
            refusal = await self._authenticate(scope)
            if refusal is not None:
                return await _refused(send, refusal)
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            if path.startswith("/v2/models/") and path.endswith("/infer"):
                parts = path[11:-6].split("/")
                if len(parts) == 1 and parts[0]:
                    return await self.endpoints.fast_infer(scope, receive, send, parts[0], None)
                if len(parts) == 3 and parts[1] == "versions" and parts[0] and parts[2]:
                    return await self.endpoints.fast_infer(scope, receive, send, parts[0],
                                                           parts[2])
        await self.app(scope, receive, send)


def build_app(engine, *, extra_routes: Sequence[BaseRoute] = (),
              metrics=None, max_body_size: int = DEFAULT_MAX_BODY_SIZE,
              request_timeout: float | None = None, guard=None, access_log=None,
              shared_memory=None):
    """The Starlette app of the protocol's REST form, for uvicorn or any ASGI server.

    Args:
        engine: the :class:`~mip.serving.engine.Engine` every frontend shares.
        extra_routes: more Starlette routes or ``Mount`` s served by the same app, e.g.
            ``[Mount("/v1", app=other)]``; they are matched after the ``/v2`` routes.
        metrics: a :class:`~mip.frontends.oip.metrics.Metrics` (shared with the gRPC
            frontend); ``None`` creates one for this app. ``/metrics`` renders it.
        max_body_size: largest request body, in octets (after decompression).
        request_timeout: seconds a request may take, queueing included (``None``: no
            limit beyond the request's ``timeout`` parameter).
        guard: a :class:`~mip.frontends.auth.Guard` whose protected areas need
            credentials (``None``: every ``/v2`` endpoint and ``/metrics`` are open).
        access_log: an :class:`~mip.frontends.access.AccessLog` for the inference
            requests, or ``None``.
        shared_memory: the :class:`~mip.frontends.oip.shm.SystemSharedMemory` regions
            (``None``: those every frontend of ``engine`` shares, see
            :func:`~mip.frontends.oip.shm.registry_of`).
    """
    if metrics is None:
        from mip.frontends.oip.metrics import Metrics

        metrics = Metrics(engine)
    endpoints = _Endpoints(DataPlane(engine, metrics, request_timeout, access_log),
                           max_body_size, metrics, shared_memory)
    infer = _InferRoute(endpoints)
    shm_root = "/v2/systemsharedmemory"
    routes = [
        Route("/v2/health/live", endpoints.live, methods=["GET"]),
        Route("/v2/health/ready", endpoints.ready, methods=["GET"]),
        Route("/v2", endpoints.server_metadata, methods=["GET"]),
        Route("/v2/models/stats", endpoints.model_stats, methods=["GET"]),
        Route("/v2/models/{name}/config", endpoints.model_config, methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}/config", endpoints.model_config,
              methods=["GET"]),
        Route("/v2/models/{name}/stats", endpoints.model_stats, methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}/stats", endpoints.model_stats,
              methods=["GET"]),
        Route("/v2/models/{name}", endpoints.model_metadata, methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}", endpoints.model_metadata,
              methods=["GET"]),
        Route("/v2/models/{name}/ready", endpoints.model_ready, methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}/ready", endpoints.model_ready,
              methods=["GET"]),
        Route("/v2/models/{name}/infer", infer, methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
        Route("/v2/repository/index", endpoints.repository_index, methods=["POST"]),
        Route("/v2/repository/models/{name}/load", endpoints.repository_load,
              methods=["POST"]),
        Route("/v2/repository/models/{name}/unload", endpoints.repository_unload,
              methods=["POST"]),
        Route(f"{shm_root}/region/{{region}}/register", endpoints.shm_register,
              methods=["POST"]),
        Route(f"{shm_root}/region/{{region}}/unregister", endpoints.shm_unregister,
              methods=["POST"]),
        Route(f"{shm_root}/unregister", endpoints.shm_unregister, methods=["POST"]),
        Route(f"{shm_root}/region/{{region}}/status", endpoints.shm_status, methods=["GET"]),
        Route(f"{shm_root}/status", endpoints.shm_status, methods=["GET"]),
        Route("/v2/cudasharedmemory/{rest:path}", endpoints.cuda_shm, methods=["GET", "POST"]),
        Route("/metrics", endpoints.metrics_text, methods=["GET"]),
        *extra_routes,
    ]
    app = Starlette(routes=routes, exception_handlers={
        ServingError: _serving_error,
        HTTPException: _http_error,
        orjson.JSONDecodeError: _bad_json,
        Exception: _unexpected,
    })
    app.state.metrics = metrics
    app.state.engine = engine
    return _InferFront(app, endpoints, guard)


class HttpServer:
    """Serve an ASGI app (such as :func:`build_app`'s) with uvicorn on the running loop.

    Args:
        app: the ASGI application.
        timeout_keep_alive: seconds an idle keep-alive connection (or a new one that has
            sent nothing) stays open.
        graceful_timeout: seconds :meth:`stop` waits for requests in progress.
        limits: connection, backpressure and timeout limits (:class:`HttpLimits`; its
            ``idle_timeout`` is ``timeout_keep_alive``).
        ssl_certfile / ssl_keyfile: serve HTTPS with this PEM certificate and key.
        ssl_ca_certs: require client certificates signed by these CAs (mutual TLS).
    """

    def __init__(self, app, *, timeout_keep_alive: float = 5.0, graceful_timeout: float = 5.0,
                 ssl_certfile: str | None = None, ssl_keyfile: str | None = None,
                 ssl_ca_certs: str | None = None, limits: HttpLimits | None = None):
        self.app = app
        limits = dataclasses.replace(limits or HttpLimits(), idle_timeout=timeout_keep_alive)
        self.listener = Listener(limits)
        self.ssl = {"ssl_certfile": ssl_certfile, "ssl_keyfile": ssl_keyfile,
                    "ssl_ca_certs": ssl_ca_certs} if ssl_certfile else {}
        self.timeout_keep_alive = timeout_keep_alive
        self.graceful_timeout = graceful_timeout
        self.address: str | None = None
        self._server = None
        self._ticker: asyncio.Task | None = None

    async def start(self, address: str, sock: socket.socket | None = None) -> str:
        """Listen on ``HOST:PORT`` (port 0: a free port), or accept on ``sock``, a listening
        socket bound to it elsewhere; returns the bound ``HOST:PORT``."""
        import uvicorn

        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"HTTP address must be HOST:PORT, not {address!r}")
        host = host.strip("[]")
        config = uvicorn.Config(self.app, host=host, port=int(port),
                                http=self.listener.protocol_class(), ws="none",
                                lifespan="off", log_level="warning", access_log=False,
                                log_config=None,  # the process's logging stays as it is
                                proxy_headers=False,
                                server_header=False, timeout_keep_alive=self.timeout_keep_alive,
                                timeout_graceful_shutdown=self.graceful_timeout, **self.ssl)
        if self.ssl.get("ssl_ca_certs"):
            config.ssl_cert_reqs = ssl.CERT_REQUIRED
        config.load()
        server = uvicorn.Server(config)
        # startup/main_loop/shutdown rather than serve(): serve() installs signal handlers,
        # and the process that embeds this server owns those.
        server.lifespan = config.lifespan_class(config)
        try:
            await server.startup(sockets=None if sock is None else [sock])
        except SystemExit:  # uvicorn exits when it cannot bind
            raise OSError(f"cannot listen for HTTP on {address}") from None
        if not server.started:
            raise OSError(f"cannot listen for HTTP on {address}")
        self._server = server
        self.listener.start()
        self._ticker = asyncio.ensure_future(server.main_loop())  # keeps the Date header fresh
        bound = server.servers[0].sockets[0].getsockname()[1]
        self.address = f"{host}:{bound}"
        return self.address

    async def stop(self) -> None:
        """Stop listening, let requests in progress finish (up to ``graceful_timeout``)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.should_exit = True
        self.listener.stop()
        if self._ticker is not None:
            await asyncio.gather(self._ticker, return_exceptions=True)
        await server.shutdown()
