"""``POST /v2/models/{name}[/versions/{v}]/infer``: the inference endpoint of the REST
frontend: through ASGI, and straight from the HTTP listener (no ASGI, no task a request:
see :mod:`mip.net.http_direct`), one :class:`InferCall` a request either way; no
framework request or response objects on this path.

Binary tensor data extension: a request whose ``Inference-Header-Content-Length`` header is
N carries N octets of JSON followed by the raw data of every input whose parameters hold
``binary_data_size``, in input order; those inputs become numpy views of the body. Outputs
asked for with the ``binary_data`` output parameter (or all of them, with the request
parameter ``binary_data_output``) are sent the same way after the JSON header. A client
that disconnects while its request waits has the request cancelled, so it leaves the batch
queue.

JSON headers are parsed on the event loop (the numbers of large arrays by
:mod:`mip.protocol.oip`, straight into numpy), except from :data:`_THREAD_ABOVE`
octets on, which go to a worker thread.

A model served by the engine process of ``mip serve --workers N --placement shared`` reads
a request's tensors in place in the shared arena (:mod:`mip.serving.arena`) when they are
there: a binary-extension body (with at least :data:`~mip.serving.arena.IN_PLACE_MIN`
octets of binary data) is received into a block of the worker's slice, its inputs are views
of it; the numbers of a large JSON array are parsed into a block of their own. Each block
goes back once the request is answered, failed or cancelled and the engine process no
longer reads it; when the slice has no room, requests are read as for any other model.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import orjson
from starlette.types import Receive, Scope, Send

from mip.errors import Cancelled, InvalidInput
from mip.frontends.dataplane import DataPlane, timeout_parameter
from mip.frontends.oip import codec, shm
from mip.net.http_body import Body, Octets, read_body
from mip.net.http_router import Reply, error_response, send_reply
from mip.protocol.oip import PLACEHOLDER, parse_numbers, split_numeric_arrays
from mip.serving.arena import IN_PLACE_MIN

__all__ = ["BODY_SIZE_SETTING", "InferCall", "InferEndpoint", "json_object"]

#: what sets the largest request body (named in the 413 reply)
BODY_SIZE_SETTING = "--http-max-body-size"
#: JSON request headers from this many octets on have their large numeric arrays parsed
#: straight into numpy (mip.protocol.oip) instead of into Python numbers.
_SPLIT_JSON_ABOVE = 64 << 10
#: ... and from this many octets on, their arrays of at least :data:`_SPLIT_SMALL_FROM`
#: octets, read to the same values as through Python numbers (the whole header is read
#: again as below this size when that fails, so errors are the same too)
_SPLIT_SMALL_ABOVE = 1 << 10
_SPLIT_SMALL_FROM = 512
#: JSON request headers from this many octets on are parsed in a worker thread. As
#: measured here, a hand-off to the thread costs about 50 us of CPU; a header of
#: 128 KiB takes about 0.7 ms to parse, mostly without the GIL (mip.protocol.oip), so
#: the loop goes on meanwhile for 7% more CPU. Smaller ones stay on the loop: below
#: _SPLIT_JSON_ABOVE orjson holds the GIL anyway, and the hand-off would cost 13% and more.
_THREAD_ABOVE = 128 << 10
_DECODE_THREADS = 2
#: replies whose binary parts add up to less than this many octets are sent in one write.
_JOIN_BELOW = 64 << 10
_JSON = (b"content-type", b"application/json")
_OCTETS = (b"content-type", b"application/octet-stream")
# orjson writes these numpy dtypes itself; others go through tolist().
_ORJSON_KINDS = {np.dtype(t) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64,
                                       np.uint8, np.uint16, np.uint32, np.uint64,
                                       np.float16, np.float32, np.float64)}


def json_object(value, what: str) -> dict:
    """``value``, a JSON object (``None``: an empty one); ``what`` names it in the error."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return value




class InferEndpoint:
    """The endpoint of ``.../infer``: body, checks, errors
    (:func:`~mip.net.http_router.error_response`) and cancellation. It answers through
    ASGI (``scope["path_params"]``: ``name``, maybe ``version``), and straight from the
    HTTP listener through :meth:`open` (see :mod:`mip.net.http_direct`). An
    ``X-Request-ID`` header is answered with the same header, and names the request in the
    access log (else its ``id`` does).

    Args:
        dataplane: what requests are submitted to.
        max_body_size: largest request body, in octets (after decompression).
        shared_memory: the shared-memory regions inputs and outputs may name.
    """

    def __init__(self, dataplane: DataPlane, max_body_size: int,
                 shared_memory: shm.SystemSharedMemory):
        self._decoder: concurrent.futures.ThreadPoolExecutor | None = None
        self.dataplane = dataplane
        self.max_body_size = max_body_size
        self.shm = shared_memory
        #: ``arena_memory(model)``: the allocator of the shared arena a request for ``model``
        #: is received into, or ``None`` (see the module)
        self.arena_memory = getattr(dataplane.engine, "arena_memory", None)

    def open(self, params: dict[str, str], headers: Iterable[tuple[bytes, bytes]],
             client: tuple[str, int] | None) -> InferCall:
        """A request of the path parameters ``params`` (``name``, maybe ``version``) with
        ``headers`` (lowercase names) from ``client`` (host, port), arrived now."""
        return InferCall(self, params, headers, client)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        call = self.open(scope["path_params"], scope["headers"], scope.get("client"))
        try:
            body = await read_body(receive, self.max_body_size, call.length, call.encoding,
                                   BODY_SIZE_SETTING, call.body_memory())
            reply = await _unless_disconnected(receive, call.answer(body))
        except Exception as exc:
            failure = call.failed(exc)
            if failure is None:  # the client is gone: nobody to answer
                return
            reply = failure
        await send_reply(send, reply)

    def parse_in_thread(self, body: Octets, header_length: str | None,
                        memory: Callable[[int], np.ndarray | None] | None = None
                        ) -> asyncio.Future:
        """:meth:`parse` in a worker thread: a large JSON header's numbers are read without
        the GIL, so the event loop and other requests go on meanwhile (and two large
        bodies parse on two cores). ``memory`` is called on the event loop."""
        if self._decoder is None:
            self._decoder = concurrent.futures.ThreadPoolExecutor(
                _DECODE_THREADS, thread_name_prefix="mip-json")
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._decoder, self.parse, body, header_length,
                                    None if memory is None else _on_loop(loop, memory))

    def parse(self, body: Octets, header_length: str | None,
              memory: Callable[[int], np.ndarray | None] | None = None):
        """A request body: ``(id, inputs, wanted outputs, binary_data_output, timeout,
        classification, outputs to shared memory)``; the numbers of large JSON arrays are
        parsed into ``memory(octets)`` (a ``uint8`` array) when it gives one."""
        if header_length is None:
            header_end = len(body)
            if header_end < _SPLIT_SMALL_ABOVE:
                return self._parse_doc(body, memoryview(body), header_end, (), None, False)
        else:
            if not header_length.isdigit() or int(header_length) > len(body):
                raise InvalidInput(f"Inference-Header-Content-Length {header_length!r} does not "
                                   f"fit a body of {len(body)} octets")
            header_end = int(header_length)
            kind = type(body)
            if header_end <= _PLAN_HEADER_MAX and (kind is bytes or kind is np.ndarray):
                key = bytes(body[:header_end])  # (for bytes: that slice, not copied again)
                plan = _PLANS.get(key)
                if plan is not None and len(body) - header_end == plan[0]:
                    return _planned(plan, body, header_end)
                layout: list = []
                parsed = self._parse(body, header_end, layout, memory)
                _remember(key, parsed, layout)
                return parsed
        return self._parse(body, header_end, None, memory)

    def _parse(self, body: Octets, header_end: int, layout: list | None = None,
               memory: Callable[[int], np.ndarray | None] | None = None,
               small_split: bool = True):
        view = memoryview(body)
        text = view[:header_end] if header_end != len(body) or type(body) is not bytes else body
        spans: list = []
        if header_end >= _SPLIT_JSON_ABOVE:
            # Large numeric arrays are read straight into numpy memory, not Python floats.
            text, spans = split_numeric_arrays(text, _SPLIT_JSON_ABOVE // 4)
        elif header_end >= _SPLIT_SMALL_ABOVE and small_split:
            text, spans = split_numeric_arrays(text, _SPLIT_SMALL_FROM)
            if spans:
                try:
                    return self._parse_doc(text, view, header_end, spans, layout, True, memory)
                except Exception:  # (its own error, from the path that reads it as a whole)
                    if layout is not None:
                        layout.clear()
                    return self._parse(body, header_end, layout, memory, False)
        return self._parse_doc(text, view, header_end, spans, layout, False, memory)

    def _parse_doc(self, text, view: memoryview, header_end: int, spans: Sequence,
                   layout: list | None, exact: bool,
                   memory: Callable[[int], np.ndarray | None] | None = None):
        try:
            doc = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"the request is not valid JSON: {exc}") from None
        if type(doc) is not dict:
            doc = json_object(doc, "the request")
        parameters = doc.get("parameters")
        specs = doc.get("inputs")
        requested = doc.get("outputs")
        if requested is not None and type(requested) is not list:
            # (iterated as a list would be: an object's names, a string's characters)
            requested = list(requested) if isinstance(requested, (dict, str)) else (
                [requested] if requested else [])
        classes = _extension_parameters(parameters, specs, requested)
        inputs = self._inputs(specs, view, header_end, spans, layout, exact, memory)
        binary_default = False
        timeout = None
        if parameters is not None:
            parameters = json_object(parameters, "parameters")
            binary_default = bool(parameters.get("binary_data_output", False))
            timeout = timeout_parameter(parameters.get("timeout"))
        wanted: dict[str, bool] = {}
        targets: dict[str, shm.OutputTarget] = {}
        for output in requested or ():
            if type(output) is not dict:
                output = json_object(output, "an output")
            output_name = output.get("name")
            if not isinstance(output_name, str):
                raise InvalidInput("every requested output needs a name")
            output_params = output.get("parameters")
            if output_params is None:
                wanted[output_name] = binary_default
                continue
            output_params = json_object(output_params, f"output {output_name!r} parameters")
            wanted[output_name] = bool(output_params.get("binary_data", binary_default))
            if "shared_memory_region" in output_params:
                targets[output_name] = self.shm.output(output_name, output_params)
        return doc.get("id"), inputs, wanted, binary_default, timeout, classes, targets

    def _inputs(self, specs, view: memoryview, position: int, spans: Sequence = (),
                layout: list | None = None, exact: bool = False,
                memory: Callable[[int], np.ndarray | None] | None = None
                ) -> dict[str, np.ndarray]:
        """The inputs ``specs`` describe; ``layout``, when given, has ``(name, dtype, shape,
        offset, count)`` appended for each input of fixed-size binary data, ``None`` for
        each other; ``memory``: see :meth:`parse`."""
        if type(specs) is not list:
            raise InvalidInput("the request needs an 'inputs' list")
        inputs: dict[str, np.ndarray] = {}
        for spec in specs:
            if type(spec) is not dict:
                spec = json_object(spec, "an input")
            name = spec.get("name")
            if not isinstance(name, str):
                raise InvalidInput("every input needs a name")
            if name in inputs:
                raise InvalidInput(f"input {name!r} appears twice")
            datatype = spec.get("datatype")
            shape = spec.get("shape")
            if not isinstance(datatype, str) or not isinstance(shape, list):
                raise InvalidInput(f"input {name!r} needs a datatype and a shape")
            parameters = spec.get("parameters")
            if parameters is not None:
                parameters = json_object(parameters, f"input {name!r} parameters")
                size = parameters.get("binary_data_size")
                if "shared_memory_region" in parameters:
                    inputs[name] = self.shm.input(name, datatype, shape, parameters)
                    if layout is not None:
                        layout.append(None)
                    continue
                if size is not None:
                    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                        raise InvalidInput(f"input {name!r}: binary_data_size must be an "
                                           "octet count")
                    if size > len(view) - position:
                        raise InvalidInput(f"input {name!r}: binary_data_size {size} runs past "
                                           f"the end of the body ({len(view) - position} "
                                           "octets left)")
                    inputs[name] = array = codec.from_raw(name, datatype, shape,
                                                          view[position:position + size])
                    if layout is not None:
                        layout.append(None if array.dtype.hasobject else
                                      (name, array.dtype, array.shape, position, array.size))
                    position += size
                    continue
            if "data" not in spec:
                raise InvalidInput(f"input {name!r} has neither data nor binary_data_size")
            data = spec["data"]
            if layout is not None:
                layout.append(None)
            if spans and isinstance(data, str) and data.startswith(PLACEHOLDER):
                inputs[name] = _from_span(name, datatype, shape, view, spans, data, exact,
                                          memory)
            else:
                inputs[name] = codec.from_list(name, datatype, shape, data)
        if position != len(view):
            raise InvalidInput(f"{len(view) - position} octets of binary data belong to no input")
        return inputs


class InferCall:
    """One inference request, from its headers to its :data:`~mip.net.http_router.Reply`:
    :meth:`body` reads it, :meth:`answer` parses and submits it, :meth:`failed` says what
    an error is answered with. A request refused before it reaches the data plane (it did
    not parse, its client left) is recorded there (the access log) once."""

    __slots__ = ("endpoint", "name", "version", "client", "started", "request_id", "echo",
                 "length", "encoding", "header_length", "recorded", "oip_id", "wanted",
                 "binary_default", "targets", "memory")
    # what the reply is encoded with, set when the request is submitted (before encode)
    oip_id: object
    wanted: dict[str, bool]
    binary_default: bool
    targets: dict[str, shm.OutputTarget]

    def __init__(self, endpoint: InferEndpoint, params: dict[str, str],
                 headers: Iterable[tuple[bytes, bytes]], client: tuple[str, int] | None):
        self.started = time.perf_counter()
        self.endpoint = endpoint
        self.name, self.version = params["name"], params.get("version")
        self.client = client
        self.request_id: str | None = None
        #: headers every reply carries (the client's X-Request-ID)
        self.echo: tuple[tuple[bytes, bytes], ...] = ()
        self.length = self.encoding = None
        self.header_length: str | None = None
        for key, value in headers:
            if key == b"content-length":
                self.length = value
            elif key == b"inference-header-content-length":
                self.header_length = value.decode("latin-1")
            elif key == b"content-encoding":
                self.encoding = value
            elif key == b"x-request-id":
                self.request_id = value.decode("latin-1")
                self.echo = ((b"x-request-id", value),)
        self.recorded = False  # submitted to the data plane, or reported refused there
        #: the shared arena's allocator its JSON numbers are parsed into (see the module)
        self.memory: Callable[[int], np.ndarray | None] | None = None

    def body(self) -> Body:
        """The reader of its body (:class:`~mip.errors.TooLarge` for a ``Content-Length``
        over the limit)."""
        return Body(self.endpoint.max_body_size, self.length, self.encoding,
                    BODY_SIZE_SETTING, self.body_memory())

    def body_memory(self) -> Callable[[int], np.ndarray | None] | None:
        """What its body is received into: the shared arena when its model reads it there
        and the body has enough binary data to be worth it (see the module), else
        ``None``."""
        find = self.endpoint.arena_memory
        if find is None:
            return None
        self.memory = memory = find(self.name)
        length, header = self.length, self.header_length
        if (memory is None or header is None or length is None or not header.isdigit()
                or not length.isdigit() or int(length) - int(header) < IN_PLACE_MIN):
            return None
        return memory

    def answer(self, body: Octets) -> asyncio.Future:
        """Parse ``body`` and submit the request: a future of its reply (cancel it when the
        client leaves: the request leaves the batch queue). A JSON header of
        :data:`_THREAD_ABOVE` octets or more is parsed in a worker thread. Raises what
        the request is refused for."""
        header_length = self.header_length
        size = len(body)
        if header_length is not None and header_length.isdigit():
            size = min(size, int(header_length))
        if size >= _THREAD_ABOVE:
            return asyncio.ensure_future(self._answer_later(body))
        return self._submit(self.endpoint.parse(body, header_length, self.memory))

    async def _answer_later(self, body: Octets) -> Reply:
        try:
            parsed = await self.endpoint.parse_in_thread(body, self.header_length,
                                                         self.memory)
        except asyncio.CancelledError:
            self._refused(Cancelled("the client disconnected"))
            raise
        return await self._submit(parsed)

    def _submit(self, parsed) -> asyncio.Future:
        oip_id, inputs, wanted, binary_default, timeout, classes, targets = parsed
        if self.request_id is None and oip_id is not None and oip_id != "":
            self.request_id = str(oip_id)
        self.oip_id, self.wanted, self.binary_default = oip_id, wanted, binary_default
        self.targets = targets
        client = self.client
        dataplane = self.endpoint.dataplane
        chosen = None
        names: list[str] | None = None
        if wanted:
            # outputs named as the model has them, in its order: as if none were named
            chosen = dataplane.resolve(self.name, self.version or None)
            specs = chosen.outputs
            if len(specs) != len(wanted) or (
                    specs[0].name not in wanted if len(specs) == 1
                    else tuple(wanted) != tuple(spec.name for spec in specs)):
                names = list(wanted)
        work = dataplane.submit(
            "http", self.name, self.version, inputs, names, timeout,
            then=self.encode, classes=classes, source=client[0] if client else None,
            chosen=chosen, peer=client, request_id=self.request_id, started=self.started)
        self.recorded = True
        return work

    def failed(self, exc: BaseException) -> Reply | None:
        """The reply to the request ended by ``exc`` (raised by :meth:`body`,
        :meth:`answer` or the body's reader, or set on the future of :meth:`answer`);
        ``None`` for :class:`~mip.errors.Cancelled`: the client is gone."""
        if not self.recorded:
            self._refused(exc)
        if isinstance(exc, Cancelled):
            return None
        version = f"/versions/{self.version}" if self.version else ""
        return error_response(exc, self.echo, f"POST /v2/models/{self.name}{version}/infer")

    def _refused(self, exc: BaseException) -> None:
        self.recorded = True
        self.endpoint.dataplane.refused("http", self.name, self.version, exc, peer=self.client,
                                        request_id=self.request_id, started=self.started)

    def encode(self, result) -> Reply:
        """The reply of ``result``: a JSON header, then the binary parts (maybe none);
        outputs with shared-memory targets are written there, not sent."""
        found = result.outputs
        if len(found) == 1 and not self.targets:
            (name, array), = found.items()
            oip_id = self.oip_id
            if (array.dtype in _ORJSON_KINDS and type(oip_id) in _PLAIN_IDS
                    and array.nbytes < _TEMPLATE_BELOW
                    and (type(oip_id) is not str or len(oip_id) <= _TEMPLATE_ID_MAX)):
                binary = self.wanted.get(name, self.binary_default)
                key = (result.model, result.version, oip_id, name, array.dtype, array.shape,
                       binary)
                done = _REPLIES.get(key)
                if done is None:
                    done = _reply_template(key, array)
                if done is not None and binary:
                    header, headers = done
                    return 200, [*headers, *self.echo], [header + codec.to_raw(array, name)]
                if done is not None:
                    before, after = done
                    body = b"".join((before, orjson.dumps(
                        array.ravel(), option=orjson.OPT_SERIALIZE_NUMPY), after))
                    return (200, [_JSON, (b"content-length", b"%d" % len(body)), *self.echo],
                            [body])
        outputs, parts = [], []
        binary_default, wanted, targets = self.binary_default, self.wanted, self.targets
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
        if self.oip_id is not None:
            reply["id"] = self.oip_id
        header = orjson.dumps(reply, option=orjson.OPT_SERIALIZE_NUMPY)
        if not parts:
            return 200, [_JSON, (b"content-length", b"%d" % len(header)), *self.echo], [header]
        parts.insert(0, header)
        total = sum(len(p) for p in parts)
        if total < _JOIN_BELOW:  # else the tensors go out as they are, not copied
            parts = [b"".join(parts)]
        return 200, [_OCTETS, (b"content-length", b"%d" % total),
                     (b"inference-header-content-length", b"%d" % len(header)),
                     *self.echo], parts


#: binary-extension requests whose JSON header is at most this many octets have what it
#: says kept (:func:`_remember`), keyed by the header's octets: a client sends the same
#: header again and again, only its tensors' octets change.
_PLAN_HEADER_MAX = 2048
_PLANS_KEPT = 256
#: JSON header -> (octets of binary data, ((name, dtype, dims, offset, count), ...), id,
#: wanted outputs, binary_data_output, timeout, classification)
_PLANS: dict[bytes, tuple] = {}


def _remember(key: bytes, parsed: tuple, layout: list) -> None:
    """Keep what the parse of a body with the JSON header ``key`` found (``layout``: its
    inputs, as :meth:`InferEndpoint._inputs` placed them), when a body with the same
    header parses the same whatever its binary data: every input is binary data of a
    fixed-size datatype, nothing is in shared memory, the id is a plain value (the wanted
    outputs and parameters are not changed once parsed)."""
    oip_id, inputs, wanted, binary_default, timeout, classes, targets = parsed
    if (targets or not layout or None in layout or len(layout) != len(inputs)
            or not (oip_id is None or type(oip_id) in (str, int, float, bool))):
        return
    if len(_PLANS) >= _PLANS_KEPT:
        _PLANS.clear()
    size = sum(dtype.itemsize * count for _, dtype, _, _, count in layout)
    _PLANS[key] = (size, tuple(layout), oip_id, wanted, binary_default, timeout, classes)


def _planned(plan: tuple, body: bytes, header_end: int) -> tuple:
    """What :meth:`InferEndpoint.parse` makes of ``body``, whose JSON header is that of
    ``plan`` (:func:`_remember`) and whose binary data is the size it says."""
    size, layout, oip_id, wanted, binary_default, timeout, classes = plan
    inputs = {name: np.frombuffer(body, dtype, count, offset).reshape(dims)
              for name, dtype, dims, offset, count in layout}
    return oip_id, inputs, wanted, binary_default, timeout, classes, _NO_TARGETS


_NO_TARGETS: dict = {}


#: ids that key a reply template (:func:`_reply_template`): of these types, and strings of
#: at most _TEMPLATE_ID_MAX characters (a JSON body's id is as long as its sender likes: the
#: templates kept stay small whatever the ids)
_PLAIN_IDS = frozenset((str, int, type(None)))
_TEMPLATE_ID_MAX = 256
_REPLIES_KEPT = 256
#: (model, version, id, output name, dtype, shape, binary) -> the reply's JSON around the
#: output's data: (header, headers) of a binary reply, (before, after) of a JSON one
_REPLIES: dict[tuple, tuple] = {}
#: outputs from this many octets on take the general path (a binary one is sent unjoined)
_TEMPLATE_BELOW = 16 << 10
_DATA_MARK = "\x00mip:data"
_DATA_MARK_JSON = orjson.dumps(_DATA_MARK)


def _reply_template(key: tuple, array: np.ndarray) -> tuple | None:
    """What :meth:`InferCall.encode` writes of a reply of one output of a fixed-size
    dtype but its data (kept in ``_REPLIES``): the same octets as the general path."""
    model, version, oip_id, name, _, shape, binary = key
    entry: dict = {"name": name, "datatype": codec.datatype_of(array), "shape": list(shape)}
    if binary:
        entry["parameters"] = {"binary_data_size": array.nbytes}
    else:
        entry["data"] = _DATA_MARK
    reply = {"model_name": model, "model_version": version, "outputs": [entry]}
    if oip_id is not None:
        reply["id"] = oip_id
    header = orjson.dumps(reply)
    if binary:
        done: tuple = (header, [_OCTETS, (b"content-length", b"%d" % (len(header) + array.nbytes)),
                                (b"inference-header-content-length", b"%d" % len(header))])
    else:
        before, mark, after = header.partition(_DATA_MARK_JSON)
        if not mark or _DATA_MARK_JSON in after:
            return None  # (names that hold the mark: the general path)
        done = (before, after)
    if len(_REPLIES) >= _REPLIES_KEPT:
        _REPLIES.clear()
    _REPLIES[key] = done
    return done


def _json_data(array: np.ndarray, name: str):
    if array.dtype.hasobject or array.dtype.kind in "SU":
        try:
            return [e.decode("utf-8") for e in codec.bytes_elements(array, name)]
        except UnicodeDecodeError:
            raise InvalidInput(f"output {name!r} holds BYTES that are not UTF-8: ask for it "
                               "with the binary_data output parameter") from None
    flat = array.ravel()  # (a view when it is contiguous)
    if flat.dtype in _ORJSON_KINDS:
        return flat  # orjson serializes it (OPT_SERIALIZE_NUMPY)
    return flat.astype(np.float32).tolist() if flat.dtype.name == "bfloat16" else flat.tolist()


_READ_BY_INPUTS = codec.PARAMETERS_READ["input"]
_READ_BY_OUTPUTS = codec.PARAMETERS_READ["output"]
_READ_BY_REQUEST = codec.PARAMETERS_READ["request"]


def _extension_parameters(request, specs, requested: list | None) -> dict[str, int] | None:
    """:func:`codec.check_parameters` of a JSON request (its parameters, its inputs' and
    outputs'), given only the tensors whose parameters it reads; not called at all when
    nothing it reads is there."""
    found: list[dict] = [{}, {}]
    for which, kind, tensors, read in ((0, "inputs", specs, _READ_BY_INPUTS),
                                       (1, "outputs", requested, _READ_BY_OUTPUTS)):
        if type(tensors) is not list:
            continue  # no inputs list: refused when the inputs are read
        for tensor in tensors:
            parameters = tensor.get("parameters") if type(tensor) is dict else None
            if parameters:
                if type(parameters) is not dict:
                    json_object(parameters, f"{kind} parameters")  # raises
                if not read.isdisjoint(parameters):
                    found[which][str(tensor.get("name"))] = parameters
    if request:
        request = json_object(request, "parameters")
        if _READ_BY_REQUEST.isdisjoint(request) and not (found[0] or found[1]):
            return None
    elif not (found[0] or found[1]):
        return None
    return codec.check_parameters(request or None, found[0], found[1])


def _from_span(name: str, datatype: str, shape, view: memoryview, spans: Sequence,
               placeholder: str, exact: bool = False,
               memory: Callable[[int], np.ndarray | None] | None = None) -> np.ndarray:
    """An input whose ``data`` was a large numeric array, parsed from the body itself
    (into ``memory(octets)`` when it gives an array: see :meth:`InferEndpoint.parse`)."""
    index = placeholder[len(PLACEHOLDER):]
    if not index.isdigit() or int(index) >= len(spans):
        raise InvalidInput(f"input {name!r}: data is not a list of values")
    start, end = spans[int(index)]
    dtype = codec.numpy_dtype(datatype, f"input {name!r}")
    if dtype.kind not in "iuf" or datatype == "BF16":
        # BOOL and BF16 through the general path
        return codec.from_list(name, datatype, shape, orjson.loads(view[start:end]))
    dims = codec.check_shape(shape, name)
    count = codec.element_count(dims)
    out = None
    if memory is not None and count * dtype.itemsize >= IN_PLACE_MIN:
        octets = memory(count * dtype.itemsize)
        out = None if octets is None else octets.view(dtype)
    try:
        flat = parse_numbers(view, start, end, dtype, exact, out)
    except ValueError as exc:
        raise InvalidInput(f"{name}: data does not fit {datatype}: {exc}") from None
    if flat.size != count:
        raise InvalidInput(f"{name}: shape {list(dims)} holds {count} elements, "
                           f"{flat.size} were sent")
    return flat.reshape(dims)


#: seconds a parsing thread waits for the event loop to allocate it a block of the arena
#: (then, or when the loop is gone, the numbers go to memory of its own)
_ALLOCATE_WAIT = 1.0


def _on_loop(loop: asyncio.AbstractEventLoop, memory: Callable[[int], np.ndarray | None]
             ) -> Callable[[int], np.ndarray | None]:
    """``memory`` called from another thread: run on ``loop`` (its allocator is the loop's
    alone), waited for at most :data:`_ALLOCATE_WAIT` seconds."""
    def allocate(size: int) -> np.ndarray | None:
        done: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            if done.set_running_or_notify_cancel():
                try:
                    done.set_result(memory(size))
                except Exception as exc:
                    done.set_exception(exc)

        try:
            loop.call_soon_threadsafe(run)
            return done.result(_ALLOCATE_WAIT)
        except (RuntimeError, concurrent.futures.TimeoutError):  # (the loop is closed)
            done.cancel()
            return None

    return allocate


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
