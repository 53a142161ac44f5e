"""Inference load generator: closed loop (concurrency) and open loop (request rate).

One request body is built per run and sent unchanged for every request, so the generator's
CPU goes to the protocol client, not to making data.  Replies are received whole and checked
for success (MIP ERROR frame, gRPC status, HTTP status); their tensors are not converted.

Closed loop: ``concurrency`` workers each send a request, wait for its reply, and send the
next.  Open loop: requests are scheduled at fixed times ``start + i / rate`` whatever the
server does, and latency runs from the *scheduled* time, so a server that falls behind shows
its queueing delay instead of slowing the generator down (no coordinated omission).

Every step is bounded in time (warm-up + duration, then at most ``timeout`` seconds for the
replies still in flight) and in count (``max_requests``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import platform
import time
import urllib.parse
from typing import Any, Callable

import numpy as np

__all__ = ["InferTarget", "Driver", "make_driver", "run_steps", "measure_step",
           "resolve_inputs", "SCHEMA"]

#: the ``schema`` field of every JSON document ``mip bench infer`` writes
SCHEMA = "mip-bench/infer/1"

PROTOCOLS = ("mip", "grpc", "http", "http-binary")


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
    """

    url: str
    protocol: str = "mip"
    model: str | None = None
    version: str | None = None
    inputs: list = dataclasses.field(default_factory=list)
    outputs: list = dataclasses.field(default_factory=list)
    connections: int = 1
    timeout: float = 10.0


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


def _raw_bytes(arr: np.ndarray) -> bytes:
    if arr.dtype == object:  # BYTES: u32 little-endian length + octets per element
        out = bytearray()
        for v in arr.reshape(-1):
            b = v if isinstance(v, bytes) else str(v).encode()
            out += len(b).to_bytes(4, "little") + b
        return bytes(out)
    return np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


class HttpStatusError(Exception):
    """An HTTP reply other than 200 (``status``; ``body``: its first octets)."""

    def __init__(self, status: int, body: bytes):
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status


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
        self.session = None

    async def open(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.limit, force_close=False),
            timeout=aiohttp.ClientTimeout(total=self.target.timeout),
            skip_auto_headers=("User-Agent",))

    async def call(self) -> None:
        async with self.session.post(self.url, data=self.body, headers=self.headers) as r:
            body = await r.read()
            if r.status != 200:
                raise HttpStatusError(r.status, body)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


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
    if target.protocol == "grpc":
        return GrpcDriver(target, arrays)
    if target.protocol in ("http", "http-binary"):
        return HttpDriver(target, arrays, target.protocol == "http-binary", concurrency)
    raise ValueError(f"unknown protocol {target.protocol!r} (one of {', '.join(PROTOCOLS)})")


# -- measurement ----------------------------------------------------------------------------

def error_kind(exc: BaseException) -> str:
    """A short, stable name for a failure, used to group errors in the report."""
    from mip.errors import RemoteError

    if isinstance(exc, RemoteError):
        code = getattr(exc, "error_code", None)
        name = getattr(code, "name", code)
        return f"mip error {name}"
    if isinstance(exc, HttpStatusError):
        return f"http {exc.status}"
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    code = getattr(exc, "code", None)
    if callable(code) and type(exc).__module__.startswith("grpc"):
        try:
            return f"grpc {code().name}"
        except Exception:  # pragma: no cover
            pass
    if isinstance(exc, (ConnectionError, OSError)):
        return f"connection ({type(exc).__name__})"
    return type(exc).__name__


class _Recorder:
    """Counts and latencies of the requests sent inside the measured window."""

    __slots__ = ("latencies", "requests", "errors", "error_kinds", "error_examples",
                 "sent_total", "last_done", "unsent")

    def __init__(self):
        self.latencies: list[float] = []
        self.requests = 0
        self.errors = 0
        self.error_kinds: dict[str, int] = {}
        self.error_examples: dict[str, str] = {}
        self.sent_total = 0  # warm-up included: the denominator of CPU per request
        self.last_done: float | None = None
        self.unsent = 0

    def fail(self, exc: BaseException, t_done: float) -> None:
        kind = error_kind(exc)
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1
        self.error_examples.setdefault(kind, str(exc)[:300])
        self.last_done = t_done


async def _closed_worker(call, rec: _Recorder, t_warm: float, t_end: float, budget: list) -> None:
    pc = time.perf_counter
    lat = rec.latencies
    while budget[0] > 0:
        t0 = pc()
        if t0 >= t_end:
            return
        measured = t0 >= t_warm
        rec.sent_total += 1
        if measured:
            budget[0] -= 1
            rec.requests += 1
        try:
            await call()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if measured:
                rec.fail(exc, pc())
            continue
        if measured:
            t1 = pc()
            lat.append(t1 - t0)
            rec.last_done = t1


async def _open_loop(call, rec: _Recorder, rate: float, t_start: float, t_warm: float,
                     t_end: float, max_inflight: int, budget: list) -> set:
    pc = time.perf_counter
    lat = rec.latencies
    sem = asyncio.Semaphore(max_inflight)
    tasks: set = set()

    async def one(t_sched: float, measured: bool) -> None:
        try:
            await call()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if measured:
                rec.fail(exc, pc())
            return
        finally:
            sem.release()
        if measured:
            t1 = pc()
            lat.append(t1 - t_sched)  # from the scheduled time: queueing delay included
            rec.last_done = t1

    interval = 1.0 / rate
    i = 0
    loop = asyncio.get_running_loop()
    while budget[0] > 0:
        t_sched = t_start + i * interval
        if t_sched >= t_end:
            break
        now = pc()
        if t_sched > now:
            await asyncio.sleep(t_sched - now)
        if sem.locked():  # at the in-flight cap: wait, the clock keeps running
            try:
                await asyncio.wait_for(sem.acquire(), max(0.0, t_end - pc()))
            except asyncio.TimeoutError:
                break
        else:
            await sem.acquire()
        measured = t_sched >= t_warm
        rec.sent_total += 1
        if measured:
            budget[0] -= 1
            rec.requests += 1
        task = loop.create_task(one(t_sched, measured))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
    # scheduled inside the window but never sent (the in-flight cap was reached)
    total = int(max(0.0, (t_end - max(t_warm, t_start))) * rate)
    rec.unsent = max(0, total - rec.requests) if budget[0] > 0 else 0
    return tasks


def _percentiles(latencies: list[float]) -> dict:
    if not latencies:
        return {k: None for k in ("min", "mean", "p50", "p90", "p99", "max")}
    a = np.asarray(latencies) * 1e3
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"min": float(a.min()), "mean": float(a.mean()), "p50": float(p50),
            "p90": float(p90), "p99": float(p99), "max": float(a.max())}


async def measure_step(driver_factory: Callable[[int], Driver], *, concurrency: int | None = None,
                       request_rate: float | None = None, duration: float = 3.0,
                       warmup: float = 1.0, max_requests: int = 10_000_000,
                       max_inflight: int = 1024, progress=None) -> dict:
    """Run one step and return its figures (the ``steps[]`` entry of the JSON document).

    Exactly one of ``concurrency`` (closed loop: requests in flight) and ``request_rate``
    (open loop: requests per second) is given.  ``duration`` and ``warmup`` are seconds;
    ``max_inflight`` caps requests in flight in the open loop (requests that could not be
    sent in time are reported as ``unsent``).
    """
    if (concurrency is None) == (request_rate is None):
        raise ValueError("give exactly one of concurrency and request_rate")
    if duration <= 0 or warmup < 0:
        raise ValueError("duration must be > 0 and warmup >= 0 seconds")
    driver = driver_factory(concurrency or max_inflight)
    await driver.open()
    rec = _Recorder()
    budget = [max_requests]
    ticker = None
    try:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        t_start = time.perf_counter()
        t_warm = t_start + warmup
        t_end = t_warm + duration
        if progress is not None:
            ticker = asyncio.get_running_loop().create_task(
                progress.follow(rec, t_start, t_warm, t_end))
        timeout = getattr(getattr(driver, "target", None), "timeout", 10.0)
        if concurrency is not None:
            workers = [asyncio.ensure_future(_closed_worker(driver.call, rec, t_warm, t_end, budget))
                       for _ in range(concurrency)]
            done, pending = await asyncio.wait(workers, timeout=(t_end - time.perf_counter())
                                               + timeout + 1.0)
        else:
            tasks = await _open_loop(driver.call, rec, request_rate, t_start, t_warm, t_end,
                                     max_inflight, budget)
            pending = set()
            if tasks:
                _, pending = await asyncio.wait(set(tasks), timeout=timeout + 1.0)
        for t in pending:  # stuck beyond every timeout: count them as timed out
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        cpu1, wall1 = time.process_time(), time.perf_counter()
    finally:
        if ticker is not None:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
        await driver.close()
    responses = len(rec.latencies)
    lost = rec.requests - responses - rec.errors
    if lost > 0:
        rec.errors += lost
        rec.error_kinds["timeout"] = rec.error_kinds.get("timeout", 0) + lost
    window = (rec.last_done - t_warm) if rec.last_done is not None else duration
    window = max(window, duration if responses == 0 else 1e-9)
    cpu = cpu1 - cpu0
    wall = wall1 - wall0
    return {
        "concurrency": concurrency,
        "request_rate": request_rate,
        "duration_s": float(window),
        "requests": rec.requests,
        "responses": responses,
        "errors": rec.errors,
        "error_kinds": dict(rec.error_kinds),
        "error_examples": dict(rec.error_examples),
        "unsent": rec.unsent,
        "throughput_rps": responses / window,
        "latency_ms": _percentiles(rec.latencies),
        "client_cpu_s": cpu,
        "client_cpu_percent": 100.0 * cpu / wall if wall > 0 else 0.0,
        "client_cpu_us_per_request": 1e6 * cpu / rec.sent_total if rec.sent_total else None,
        "request_bytes": driver.request_bytes,
    }


def machine_info() -> dict:
    """CPU model, logical CPUs, Python and OS of this machine."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "nproc": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "loop": _loop_name()}


def _loop_name() -> str:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return "none"
    return type(loop).__module__.split(".")[0]


async def run_steps(target: InferTarget, *, concurrencies: list[int] | None = None,
                    rates: list[float] | None = None, duration: float = 3.0, warmup: float = 1.0,
                    shapes=None, datatypes=None, max_requests: int = 10_000_000,
                    max_inflight: int = 1024, label: str | None = None,
                    progress_factory=None) -> dict:
    """Measure every step and return the JSON document (see :data:`SCHEMA`).

    ``concurrencies`` gives closed-loop steps, ``rates`` (requests/s) open-loop steps;
    ``duration``/``warmup`` are seconds per step.
    """
    import mip

    if not concurrencies and not rates:
        raise ValueError("give concurrency levels or request rates")
    if target.protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {target.protocol!r} (one of {', '.join(PROTOCOLS)})")
    await fill_from_metadata(target, shapes, datatypes)
    started = time.time()
    steps = []
    plan = [("concurrency", c) for c in (concurrencies or [])] + \
           [("rate", r) for r in (rates or [])]
    for kind, level in plan:
        progress = progress_factory(kind, level, duration, warmup) if progress_factory else None
        kwargs = {"concurrency": int(level)} if kind == "concurrency" else {"request_rate": float(level)}
        try:
            step = await measure_step(lambda c: make_driver(target, c), duration=duration,
                                      warmup=warmup, max_requests=max_requests,
                                      max_inflight=max_inflight, progress=progress, **kwargs)
        finally:
            if progress is not None:
                progress.close()
        steps.append(step)
    return {
        "schema": SCHEMA,
        "tool": "mip bench infer",
        "mip_version": mip.__version__,
        "label": label or f"{target.protocol} {_hostport(target.url)}",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "target": {"url": target.url, "protocol": target.protocol, "model": target.model,
                   "version": target.version,
                   "inputs": [{"name": n, "datatype": d, "shape": list(s)}
                              for n, d, s in target.inputs],
                   "outputs": list(target.outputs)},
        "config": {"mode": "rate" if rates and not concurrencies else
                   ("concurrency" if not rates else "mixed"),
                   "duration_s": duration, "warmup_s": warmup,
                   "connections": target.connections, "timeout_s": target.timeout,
                   "max_requests": max_requests, "max_inflight": max_inflight},
        "machine": machine_info(),
        "steps": steps,
    }
