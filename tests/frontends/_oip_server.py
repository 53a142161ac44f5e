"""A real engine with the gRPC and HTTP frontends, on its own event loop in a thread.

The official ``tritonclient`` (sync and aio) talks to it over 127.0.0.1 free ports.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

from mip.frontends.oip.grpc import GrpcServer
from mip.frontends.oip.metrics import Metrics
from mip.frontends.oip.rest import build_app
from mip.net.http_server import HttpServer
from mip.serving.engine import Engine
from mip.serving.repository import ModelRepository

ROOT = Path(__file__).resolve().parents[2]
FASHION_MNIST = ROOT / "tests" / "data" / "fashion_mnist" / "fashion_mnist.onnx"


def onnx_model(nodes, inputs, outputs, initializers=()) -> bytes:
    """A serialized ONNX model from ``onnx.helper`` parts (opset 13, IR 8)."""
    from onnx import helper

    graph = helper.make_graph(nodes, "model", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def identity(elem_type, shape=("batch", 4)) -> bytes:
    """``input`` -> ``output`` unchanged, of one ONNX element type."""
    from onnx import helper

    return onnx_model([helper.make_node("Identity", ["input"], ["output"])],
                      [helper.make_tensor_value_info("input", elem_type, list(shape))],
                      [helper.make_tensor_value_info("output", elem_type, list(shape))])


def add_model(repo: Path, name: str, data: bytes, version: str = "1",
              config: dict | None = None) -> None:
    """Write ``repo/name/version/model.onnx`` (and ``config.json``)."""
    folder = repo / name / version
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(data)
    if config is not None:
        (repo / name / "config.json").write_text(json.dumps(config))


def grpc_implementations() -> list:
    """Both gRPC transports as pytest parameters: mip's own HTTP/2 (skipped where it is
    not built) and grpcio's."""
    import pytest

    from mip.frontends.oip.grpc import native_available

    native = pytest.param("native", marks=pytest.mark.skipif(
        not native_available(), reason="mip.protocol._h2 not built (no libnghttp2 headers)"))
    return [native, "grpcio"]


class OipServer:
    """Engine + gRPC + HTTP on a private loop in a daemon thread.

    Attributes:
        grpc_url / http_url: ``127.0.0.1:PORT`` of each listener.
        engine, metrics: the live objects (touch them only through :meth:`call`).

    ``guard``: a function returning the :class:`~mip.frontends.auth.Guard` both listeners
    check (called on the server's loop; closed with the server). ``http_limits``: the
    HTTP listener's :class:`~mip.net.http_server.HttpLimits` (``http_idle_timeout``: its
    keep-alive timeout, seconds); ``access_log``: the REST frontend's
    :class:`~mip.frontends.access.AccessLog`.
    """

    def __init__(self, repo: Path, *, models=None, grpc_max_message_size: int = 64 << 20,
                 http_max_body_size: int = 64 << 20, grpc_implementation: str | None = None,
                 guard=None, http_limits=None, access_log=None, http_idle_timeout: float = 5.0):
        self.repo = repo
        self._make_guard = guard
        self.guard = None
        self._grpc_impl = grpc_implementation
        self._models = models
        self._grpc_max = grpc_max_message_size
        self._http_max = http_max_body_size
        self._http_limits = http_limits
        self._access_log = access_log
        self._idle_timeout = http_idle_timeout
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="oip-server")

    def call(self, coroutine, timeout: float = 20.0):
        """Run ``coroutine`` on the server's loop; bounded by ``timeout`` seconds."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _start(self):
        self.engine = Engine(ModelRepository(self.repo), models=self._models)
        await self.engine.start()
        self.metrics = Metrics(self.engine)
        if self._make_guard is not None:
            self.guard = self._make_guard()
        self.grpc = GrpcServer(self.engine, metrics=self.metrics,
                               max_message_size=self._grpc_max,
                               implementation=self._grpc_impl, guard=self.guard)
        self.grpc_url = await self.grpc.start("127.0.0.1:0")
        self.app = build_app(self.engine, metrics=self.metrics,
                             max_body_size=self._http_max, guard=self.guard,
                             access_log=self._access_log)
        self.http = HttpServer(self.app, limits=self._http_limits,
                               timeout_keep_alive=self._idle_timeout)
        self.http_url = await self.http.start("127.0.0.1:0")

    async def _stop(self):
        await self.http.stop()
        await self.grpc.stop(0.5)
        if self.guard is not None:
            await self.guard.close()
        await self.engine.stop()

    def __enter__(self) -> OipServer:
        self._thread.start()
        self.call(self._start(), timeout=60.0)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.call(self._stop(), timeout=20.0)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10.0)


SLEEPY_MODEL = '''
import time
import numpy as np

class Sleepy:
    """y = x; sleeps max(x) seconds (at most 2) first."""
    inputs = [("x", "FP32", [-1, 1])]
    outputs = [("y", "FP32", [-1, 1])]

    def infer(self, inputs):
        x = inputs["x"]
        time.sleep(min(float(x.max()), 2.0) if x.size else 0.0)
        return {"y": np.array(x, copy=True)}
'''


IDENTITY_MODEL = '''
class Identity:
    inputs = [("input", "{0}", [-1, 4])]
    outputs = [("output", "{0}", [-1, 4])]

    def infer(self, inputs):
        return {{"output": inputs["input"]}}
'''
#: served by a Python identity: the ONNX Runtime provider takes neither bfloat16 numpy
#: arrays nor bytes elements for string tensors.
PYTHON_IDENTITIES = ("BF16", "BYTES")


def add_python_model(repo: Path, name: str, source: str, config: dict | None = None) -> None:
    """Write ``repo/name/1/model.py`` (and ``config.json``)."""
    folder = repo / name / "1"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.py").write_text(source)
    if config is not None:
        (repo / name / "config.json").write_text(json.dumps(config))


#: protocol datatype -> (ONNX element type name, numpy dtype used by the client)
DATATYPES = {
    "BOOL": ("BOOL", "bool"), "UINT8": ("UINT8", "uint8"), "UINT16": ("UINT16", "uint16"),
    "UINT32": ("UINT32", "uint32"), "UINT64": ("UINT64", "uint64"), "INT8": ("INT8", "int8"),
    "INT16": ("INT16", "int16"), "INT32": ("INT32", "int32"), "INT64": ("INT64", "int64"),
    "FP16": ("FLOAT16", "float16"), "FP32": ("FLOAT", "float32"), "FP64": ("DOUBLE", "float64"),
    "BF16": ("BFLOAT16", "bfloat16"), "BYTES": ("STRING", "object"),
}


WIDE_DATATYPES = ("FP32", "FP64", "FP16", "INT32", "UINT8", "INT64", "INT8")


def build_repository(repo: Path) -> Path:
    """Every model the frontend tests use, built with onnx.helper (plus Fashion-MNIST)."""
    import shutil

    from onnx import TensorProto, helper

    from mip.serving.demo import build_demo_repository

    build_demo_repository(repo)
    for datatype, (onnx_name, _) in DATATYPES.items():
        if datatype in PYTHON_IDENTITIES:
            add_python_model(repo, f"id_{datatype.lower()}", IDENTITY_MODEL.format(datatype))
        else:
            add_model(repo, f"id_{datatype.lower()}", identity(getattr(TensorProto, onnx_name)))
    for datatype in WIDE_DATATYPES:  # rows of 2048: JSON bodies of hundreds of KiB
        add_model(repo, f"wide_{datatype.lower()}",
                  identity(getattr(TensorProto, DATATYPES[datatype][0]), ("batch", 2048)))
    f = TensorProto.FLOAT
    add_model(repo, "two", onnx_model(
        [helper.make_node("Add", ["a", "b"], ["sum"]),
         helper.make_node("Mul", ["a", "b"], ["product"])],
        [helper.make_tensor_value_info(n, f, ["n", 4]) for n in ("a", "b")],
        [helper.make_tensor_value_info(n, f, ["n", 4]) for n in ("sum", "product")]))
    # versions 1 and 2 of "versioned": y = x * version
    for version in (1, 2):
        add_model(repo, "versioned", onnx_model(
            [helper.make_node("Mul", ["x", "k"], ["y"])],
            [helper.make_tensor_value_info("x", f, ["n", 2])],
            [helper.make_tensor_value_info("y", f, ["n", 2])],
            [helper.make_tensor("k", f, [], [float(version)])]), version=str(version),
            config={"version_policy": {"all": {}}})
    add_python_model(repo, "sleepy", SLEEPY_MODEL, {
        "max_batch_size": 4,
        "dynamic_batching": {"max_queue_delay_us": 0, "max_queue_size": 1}})
    (repo / "fashion_mnist" / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy(FASHION_MNIST, repo / "fashion_mnist" / "1" / "model.onnx")
    return repo


def sample(datatype: str, shape, seed: int = 0):
    """A tensor for ``datatype`` that survives the client's conversions exactly."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if datatype == "BYTES":
        flat = np.array([f"item-{i}-\u00e9".encode() for i in range(int(np.prod(shape)))],
                        dtype=object)
        return flat.reshape(shape)
    if datatype == "BOOL":
        return rng.integers(0, 2, shape).astype(bool)
    if datatype in ("FP16", "FP32", "FP64", "BF16"):
        # quarters of small integers: exact in every float type, bfloat16 included
        values = rng.integers(-64, 64, shape) / 4
        if datatype == "BF16":
            import ml_dtypes

            return values.astype(ml_dtypes.bfloat16)
        return values.astype(DATATYPES[datatype][1])
    dtype = np.dtype(DATATYPES[datatype][1])
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -1000), min(info.max, 1000), shape, dtype=dtype)
