"""Protocol clients for ``mip bench infer``: MIP, KServe v2 gRPC, KServe v2 REST.

Each :class:`Driver` turns one protocol into ``await call()``: the request is built once
(tensors from the model's metadata or the given shapes) and sent unchanged every time; the
reply is received whole and checked for success (MIP ERROR frame, gRPC status, HTTP status),
its tensors not converted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import urllib.parse
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import aiohttp

__all__ = ["PROTOCOLS", "CLIENTS", "InferTarget", "Driver", "MipDriver", "GrpcDriver",
           "NativeGrpcDriver", "HttpDriver", "NativeHttpDriver",
           "HttpStatusError", "guess_protocol", "resolve_inputs", "make_tensor",
           "fill_from_metadata", "make_driver"]

PROTOCOLS = ("mip", "grpc", "http", "http-binary")
#: ``native``: mip's own gRPC (libnghttp2) and HTTP/1.1 clients; ``library``: grpc.aio, aiohttp
CLIENTS = ("native", "library")


@dataclasses.dataclass
class InferTarget:
    """What to load and how.

    Attributes:
        url: ``tcp://HOST:PORT`` / ``unix:///PATH`` (MIP), ``grpc://HOST:PORT`` or
            ``http://HOST:PORT``.
        protocol: ``mip``, ``grpc``, ``http`` (JSON tensors) or ``http-binary`` (the binary
            tensor extension).
        model: model name (MIP: ``None`` sends plain requests to the server's default model).
        version: model version, or ``None``.
        inputs: ``[(name, datatype, shape)]``; filled from the server's metadata when empty
            (gRPC, HTTP).
        outputs: output names (HTTP binary asks for each of them as binary data).
        connections: MIP connections / gRPC channels; HTTP uses one connection per request in
            flight.
        timeout: seconds to wait for one reply.
        client: ``native`` (mip's own gRPC and HTTP/1.1 clients, a few tens of µs of CPU a
            request) or ``library`` (grpc.aio and aiohttp, what Python programs commonly use).
    """

    url: str
    protocol: str = "mip"
    model: str | None = None
    version: str | None = None
    inputs: list = dataclasses.field(default_factory=list)
    outputs: list = dataclasses.field(default_factory=list)
    connections: int = 1
    timeout: float = 10.0
    client: str = "native"


def guess_protocol(url: str) -> str:
    """The protocol a URL's scheme implies: tcp/unix -> mip, grpc -> grpc, http(s) -> http."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else "tcp"
    if scheme in ("tcp", "unix"):
        return "mip"
    if scheme == "grpc":
        return "grpc"
    if scheme in ("http", "https"):
        return "http"
    raise ValueError(f"cannot tell the protocol of {url!r}: use tcp://, unix://, grpc:// or "
                     f"http://, or give --protocol")


def _hostport(url: str) -> str:
    if "://" in url:
        url = url.split("://", 1)[1]
    return url.rstrip("/")


def _http_base(url: str) -> str:
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


# -- inputs ---------------------------------------------------------------------------------

def make_tensor(datatype: str, shape, seed: int = 0) -> np.ndarray:
    """A tensor of ``shape`` (ints) filled with seeded random data of an OIP ``datatype``."""
    import mip

    datatype = datatype.upper()
    rng = np.random.default_rng(seed)
    shape = tuple(int(d) for d in shape)
    if datatype == "BYTES":
        return np.full(shape, b"mip", dtype=object)
    if datatype == "BOOL":
        return rng.random(shape) < 0.5
    dtype = np.dtype(mip.DATATYPES[datatype])
    if dtype.kind in "iu":
        return rng.integers(0, 100, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def resolve_inputs(metadata_inputs: list[dict] | None, shapes: list[list[int]] | None,
                   datatypes: list[str] | None) -> list[tuple[str, str, list[int]]]:
    """Decide ``[(name, datatype, shape)]`` for the request.

    ``metadata_inputs`` (``[{"name", "datatype", "shape"}]`` from the server; dims of -1 become
    1) gives names and defaults; ``shapes``/``datatypes`` (one per input, or one for all)
    override them.  Without metadata, ``shapes`` is required and inputs are named
    ``input``, ``input_1``, ...
    """
    shapes = shapes or []
    datatypes = [d.upper() for d in (datatypes or [])]

    def pick(seq, i, default):
        if not seq:
            return default
        return seq[i] if i < len(seq) else seq[-1]

    if metadata_inputs:
        out = []
        for i, spec in enumerate(metadata_inputs):
            default_shape = [1 if int(d) < 0 else int(d) for d in spec.get("shape", [])]
            out.append((spec["name"], pick(datatypes, i, spec["datatype"].upper()),
                        pick(shapes, i, default_shape)))
        return out
    if not shapes:
        raise ValueError("the input shape is unknown: give --shape (MIP has no metadata call)")
    n = max(len(shapes), len(datatypes), 1)
    return [("input" if i == 0 else f"input_{i}", pick(datatypes, i, "FP32"), pick(shapes, i, None))
            for i in range(n)]


# -- drivers --------------------------------------------------------------------------------

class Driver:
    """One protocol's client, reduced to ``await call()``: send the prebuilt request, wait
    for its reply, raise on failure.  ``request_bytes`` is the size of one request body."""

    request_bytes = 0

    async def open(self) -> None:
        """Connect (and warm the connections up)."""

    async def call(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    async def close(self) -> None:
        """Close every connection."""


class MipDriver(Driver):
    """MIP over ``mip.net.mip_client.AsyncClient`` (pipelined on ``connections`` sockets)."""

    def __init__(self, target: InferTarget, arrays: list[np.ndarray]):
        import mip
        from mip.net.mip_client import AsyncClient

        self.target = target
        self.batch = [list(arrays)]
        # No per-call timer (asyncio.wait_for costs a task per call): the step bounds the
        # wait for replies instead, and cancels what is still pending after `timeout`.
        self.client = AsyncClient(target.url, connections=max(1, target.connections),
                                  timeout=None)
        self.request_bytes = sum(memoryview(b).nbytes for b in mip.encode_request_buffers(
            self.batch, model=target.model, version=target.version))

    async def open(self) -> None:
        for _ in range(max(1, self.target.connections)):
            await self.client.ping()

    async def call(self) -> None:
        # The batch is built once; encoding it is a header write plus views of its memory.
        await self.client.infer_message(self.batch, self.target.model, self.target.version)

    async def close(self) -> None:
        await self.client.close()


def _grpc_modules():
    try:  # the project's own stubs (package ``inference``, the same wire as Triton's)
        from mip.frontends.oip import inference_pb2, inference_pb2_grpc
        return inference_pb2, inference_pb2_grpc
    except ImportError:
        from tritonclient.grpc import service_pb2, service_pb2_grpc
        return service_pb2, service_pb2_grpc


_GRPC_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


async def grpc_metadata(target: InferTarget) -> dict:
    """The model's metadata over KServe v2 gRPC, as the REST JSON shape."""
    import grpc

    pb, pb_grpc = _grpc_modules()
    async with grpc.aio.insecure_channel(_hostport(target.url), options=_GRPC_OPTIONS) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        r = await stub.ModelMetadata(pb.ModelMetadataRequest(name=target.model,
                                                             version=target.version or ""),
                                     timeout=target.timeout)
    return {"name": r.name, "platform": r.platform,
            "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                       for t in r.inputs],
            "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                        for t in r.outputs]}


class GrpcDriver(Driver):
    """KServe v2 gRPC ``ModelInfer`` through ``grpc.aio``; the request is serialized once and
    sent as bytes (no per-request protobuf work on the way out)."""

    def __init__(self, target: InferTarget, arrays: list[np.ndarray]):
        pb, _ = _grpc_modules()
        self.target = target
        req = pb.ModelInferRequest(model_name=target.model, model_version=target.version or "",
                                   id="mip-bench")
        for (name, datatype, _), arr in zip(target.inputs, arrays):
            req.inputs.add(name=name, datatype=datatype, shape=list(arr.shape))
            req.raw_input_contents.append(_raw_bytes(arr))
        self.payload = req.SerializeToString()
        self.request_bytes = len(self.payload)
        self.channels: list = []
        self.methods: list = []
        self._next = 0

    async def open(self) -> None:
        import grpc

        for _ in range(max(1, self.target.connections)):
            ch = grpc.aio.insecure_channel(_hostport(self.target.url), options=_GRPC_OPTIONS)
            await asyncio.wait_for(ch.channel_ready(), self.target.timeout)
            self.channels.append(ch)
            # No serializers: bytes go out as they are, and the reply stays bytes.
            self.methods.append(ch.unary_unary("/inference.GRPCInferenceService/ModelInfer"))

    async def call(self) -> None:
        i = self._next
        self._next = (i + 1) % len(self.methods)
        await self.methods[i](self.payload, timeout=self.target.timeout)

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()
        self.channels.clear()


class NativeGrpcDriver(GrpcDriver):
    """KServe v2 gRPC ``ModelInfer`` through :class:`mip.net.grpc_client.GrpcChannel`:
    mip's HTTP/2 client on libnghttp2, the serialized request sent unchanged, calls
    multiplexed on ``connections`` HTTP/2 connections."""

    _PATH = b"/inference.GRPCInferenceService/ModelInfer"

    async def open(self) -> None:
        from mip.net.grpc_client import GrpcChannel

        for _ in range(max(1, self.target.connections)):
            channel = GrpcChannel(_hostport(self.target.url))
            await asyncio.wait_for(channel.connect(), self.target.timeout)
            self.channels.append(channel)
        # one call on each, so connection set-up is not measured (a refused request is
        # fine here: the step counts it)
        from mip.errors import RpcError

        for ch in self.channels:
            try:
                await asyncio.wait_for(ch.unary(self._PATH, self.payload), self.target.timeout)
            except RpcError:
                pass

    async def call(self) -> None:
        i = self._next
        self._next = (i + 1) % len(self.channels)
        # No per-call deadline (a timer a call on both sides): the step bounds the wait.
        await self.channels[i].unary(self._PATH, self.payload)


def _raw_bytes(arr: np.ndarray) -> bytes:
    if arr.dtype == object:  # BYTES: u32 little-endian length + octets per element
        from mip.protocol import encode_bytes

        return encode_bytes(arr)
    return np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


class HttpStatusError(Exception):
    """An HTTP reply other than 200 (``status``; ``body``: its first octets)."""

    def __init__(self, status: int, body: bytes):
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status
        self.body = body[:1000]


async def http_metadata(target: InferTarget) -> dict:
    """The model's metadata over KServe v2 REST (``GET /v2/models/NAME[/versions/V]``)."""
    import aiohttp

    url = _http_base(target.url) + _model_path(target)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=target.timeout)) as s:
        async with s.get(url) as r:
            body = await r.read()
            if r.status != 200:
                raise HttpStatusError(r.status, body)
            return json.loads(body)


def _model_path(target: InferTarget) -> str:
    path = f"/v2/models/{urllib.parse.quote(target.model or '', safe='')}"
    if target.version:
        path += f"/versions/{urllib.parse.quote(target.version, safe='')}"
    return path


class HttpDriver(Driver):
    """KServe v2 REST ``POST .../infer`` through ``aiohttp``, JSON tensors or (``binary``)
    the binary tensor extension (``Inference-Header-Content-Length``)."""

    def __init__(self, target: InferTarget, arrays: list[np.ndarray], binary: bool,
                 concurrency: int):
        self.target = target
        self.url = _http_base(target.url) + _model_path(target) + "/infer"
        self.limit = max(concurrency, target.connections, 1)
        header: dict[str, Any] = {"id": "mip-bench", "inputs": []}
        if binary:
            raws = []
            for (name, datatype, _), arr in zip(target.inputs, arrays):
                raw = _raw_bytes(arr)
                raws.append(raw)
                header["inputs"].append({"name": name, "datatype": datatype,
                                         "shape": list(arr.shape),
                                         "parameters": {"binary_data_size": len(raw)}})
            if target.outputs:
                header["outputs"] = [{"name": o, "parameters": {"binary_data": True}}
                                     for o in target.outputs]
            head = json.dumps(header, separators=(",", ":")).encode()
            self.body = head + b"".join(raws)
            self.headers = {"Content-Type": "application/octet-stream",
                            "Inference-Header-Content-Length": str(len(head))}
        else:
            for (name, datatype, _), arr in zip(target.inputs, arrays):
                data = ([v.decode() if isinstance(v, bytes) else v for v in arr.reshape(-1)]
                        if arr.dtype == object else arr.reshape(-1).tolist())
                header["inputs"].append({"name": name, "datatype": datatype,
                                         "shape": list(arr.shape), "data": data})
            self.body = json.dumps(header, separators=(",", ":")).encode()
            self.headers = {"Content-Type": "application/json"}
        self.request_bytes = len(self.body)
        self.session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.limit, force_close=False),
            timeout=aiohttp.ClientTimeout(total=self.target.timeout),
            skip_auto_headers=("User-Agent",))

    async def call(self) -> None:
        assert self.session is not None, "call() before open()"
        async with self.session.post(self.url, data=self.body, headers=self.headers) as r:
            body = await r.read()
            if r.status != 200:
                raise HttpStatusError(r.status, body)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


class _Http1(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time (httptools parses)."""

    def __init__(self):
        import httptools

        self.parser = httptools.HttpResponseParser(self)
        self.transport = None
        self.future = None
        self.body = []
        self.lost = None

    def connection_made(self, transport) -> None:
        import socket

        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception as exc:
            self._fail(ConnectionError(f"bad HTTP reply: {exc}"))
            self.transport.close()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        future, self.future = self.future, None
        status = self.parser.get_status_code()
        body, self.body = self.body, []
        if future is not None and not future.done():
            if status == 200:
                future.set_result(None)
            else:
                future.set_exception(HttpStatusError(status, b"".join(body)))

    def connection_lost(self, exc) -> None:
        self.lost = ConnectionError(f"connection lost: {exc}" if exc else "connection closed")
        self._fail(self.lost)

    def _fail(self, exc: Exception) -> None:
        future, self.future = self.future, None
        if future is not None and not future.done():
            future.set_exception(exc)


class NativeHttpDriver(HttpDriver):
    """KServe v2 REST through a lean HTTP/1.1 client: the whole request (head and body)
    built once and written in one call, the reply parsed by httptools; one keep-alive
    connection per request in flight."""

    async def open(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError("the native HTTP client speaks plain http://HOST[:PORT]/; use "
                             "--client library for https")
        self.host, self.port = parts.hostname, parts.port or 80
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        head = [f"POST {path} HTTP/1.1", f"Host: {parts.netloc}",
                f"Content-Length: {len(self.body)}"]
        head += [f"{k}: {v}" for k, v in self.headers.items()]
        self.request = ("\r\n".join(head) + "\r\n\r\n").encode() + self.body
        self.idle: list[_Http1] = []
        loop = asyncio.get_running_loop()
        self._loop = loop
        conns = await asyncio.gather(*(loop.create_connection(_Http1, self.host, self.port)
                                       for _ in range(self.limit)))
        self.idle = [protocol for _, protocol in conns]
        warm = await asyncio.gather(*(self._send(c) for c in list(self.idle)),
                                    return_exceptions=True)  # warm up
        for error in warm:  # a refused request is fine here: the step counts it
            if isinstance(error, BaseException) and not isinstance(error, HttpStatusError):
                raise error

    async def _send(self, conn: _Http1) -> None:
        conn.future = future = self._loop.create_future()
        conn.transport.write(self.request)
        await future

    async def call(self) -> None:
        conn = self.idle.pop() if self.idle else None
        if conn is None or conn.lost is not None or conn.transport.is_closing():
            _, conn = await self._loop.create_connection(_Http1, self.host, self.port)
        try:
            await self._send(conn)
        except BaseException:
            conn.transport.close()
            raise
        self.idle.append(conn)

    async def close(self) -> None:
        for conn in self.idle:
            conn.transport.close()
        self.idle = []


async def fill_from_metadata(target: InferTarget, shapes, datatypes) -> None:
    """Complete ``target.inputs`` (and ``outputs``): from gRPC/HTTP metadata, else from the
    given shapes and datatypes."""
    meta = None
    if target.protocol == "grpc":
        if not target.model:
            raise ValueError("--model is required for gRPC")
        meta = await grpc_metadata(target)
    elif target.protocol in ("http", "http-binary"):
        if not target.model:
            raise ValueError("--model is required for HTTP")
        meta = await http_metadata(target)
    target.inputs = resolve_inputs(meta["inputs"] if meta else None, shapes, datatypes)
    if meta and not target.outputs:
        target.outputs = [o["name"] for o in meta.get("outputs", [])]


def make_driver(target: InferTarget, concurrency: int = 1) -> Driver:
    """The driver for ``target.protocol``, with a request built from ``target.inputs``."""
    arrays = [make_tensor(dt, shape, seed=i) for i, (_, dt, shape) in enumerate(target.inputs)]
    if target.protocol == "mip":
        return MipDriver(target, arrays)
    native = target.client == "native"
    if target.protocol == "grpc":
        return (NativeGrpcDriver if native else GrpcDriver)(target, arrays)
    if target.protocol in ("http", "http-binary"):
        if native and target.url.startswith("https"):
            native = False
        return (NativeHttpDriver if native else HttpDriver)(
            target, arrays, target.protocol == "http-binary", concurrency)
    raise ValueError(f"unknown protocol {target.protocol!r} (one of {', '.join(PROTOCOLS)})")
